"""EdgeNet: a small edge-vision CNN (3×96×96 inputs, 10 classes) in plain PyTorch, with seeded weights.

The layer mix of the models edge boards really run: a strided stem, ResNet basic blocks, and
MobileNet depthwise-separable blocks, each convolution followed by BatchNorm and ReLU/ReLU6, then
global average pooling and a linear head (about 50 MFLOP, 0.11 M parameters).

Random weights alone make a poor test model: with BatchNorm's default statistics (mean 0, var 1)
activations blow up or die layer by layer and every input ends in the same class. So the
BatchNorm statistics are measured on seeded synthetic images (smooth random fields with shapes
drawn on them), as a real model's come from its training data; outputs then follow the input.
``module:callable`` for ``edgesmith build``: ``edgesmith.toolchain.models.edgenet:edgenet`` with
``--input-shape 1,3,96,96``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 96


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions and an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(channels, channels, 3), nn.ReLU(), *_conv_bn(channels, channels, 3))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


class SeparableBlock(nn.Module):
    """MobileNet's depthwise-separable block: a depthwise 3×3 then a pointwise 1×1, with a shortcut
    when the shape allows one."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU6(),
                                  *_conv_bn(cin, cout, 1), nn.ReLU6())
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.shortcut else y


class EdgeNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, 16, 3, stride=2), nn.ReLU6(),  # 48×48
            BasicBlock(16),
            SeparableBlock(16, 32, stride=2),            # 24×24
            SeparableBlock(32, 32, stride=1),
            SeparableBlock(32, 64, stride=2),            # 12×12
            BasicBlock(64),
            SeparableBlock(64, 128, stride=2),           # 6×6
            SeparableBlock(128, 128, stride=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        # The pooled features are all positive; without centring them, random head weights add the
        # same large offset to every input's logits and one class wins everywhere. A trained head
        # learns its own centring; here a BatchNorm measured on data does it.
        self.neck = nn.BatchNorm1d(128)
        self.classifier = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.neck(self.features(x)))


def synthetic_images(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``count`` seeded images (N×3×size×size, roughly zero mean and unit variance like normalised
    photos): smooth random fields over several scales, with filled rectangles and discs on top."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 3, size, size)
    for cells, weight in ((2, 1.0), (4, 0.7), (8, 0.5), (16, 0.3)):
        coarse = torch.randn(count, 3, cells, cells, generator=generator)
        images += weight * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for n in range(count):
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            cy, cx, r = torch.rand(3, generator=generator).tolist()
            cy, cx, radius = cy * size, cx * size, 4 + r * size / 4
            if torch.rand(1, generator=generator) < 0.5:
                mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius ** 2
            else:
                mask = ((ys - cy).abs() <= radius) & ((xs - cx).abs() <= radius * 0.6)
            colour = torch.randn(3, 1, generator=generator) * 1.5
            images[n][:, mask] = colour
    return (images - images.mean()) / images.std()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: int = 2, batch_size: int = 32, seed: int = 1,
                        size: int = IMAGE_SIZE) -> nn.Module:
    """Set every BatchNorm's running statistics to their average over seeded synthetic images (size×size).

    Computed on one thread: with more, PyTorch splits the reductions differently, the statistics
    differ in their last bits, and the same ``seed`` would give another model (another ONNX hash)
    in a process that runs with another thread count."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all batches, not an exponential one
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in range(batches):
            model(synthetic_images(batch_size, seed=seed * 1000 + b, size=size))
    finally:
        torch.set_num_threads(threads)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def edgenet(seed: int = 0, classes: int = 10) -> EdgeNet:
    """EdgeNet with seeded weights (PyTorch's default initialisation under ``seed``, BatchNorm
    affine parameters drawn near 1 and 0) and BatchNorm statistics measured on synthetic images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EdgeNet(classes)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.num_features, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.num_features, generator=generator))
    return calibrate_batchnorm(model, seed=seed + 1)
