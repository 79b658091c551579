"""ResNet-18 (He et al., 2015) in plain PyTorch, with seeded weights.

torchvision's ``resnet18`` layout (7×7/2 stem, max-pool, BasicBlocks 2-2-2-2 of widths 64-512,
1×1 projection shortcuts, 11.7 M parameters, ~1.8 GFLOP at 224×224) without torchvision, whose
PyPI build does not load beside this torch. Weights are seeded (torchvision's Kaiming-normal
initialisation, BatchNorm affine parameters near 1 and 0) and the BatchNorm statistics are
measured on seeded synthetic images (``edgenet.calibrate_batchnorm``), so outputs follow the
input: good for correctness and latency work, not for accuracy. ``module:callable`` for
``edgesmith build``: ``edgesmith.toolchain.models.resnet:resnet18`` with ``--input-shape 1,3,224,224``.
"""

from __future__ import annotations

import torch
from torch import nn

from edgesmith.toolchain.models.edgenet import calibrate_batchnorm, synthetic_images

IMAGE_SIZE = 224


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def seed_weights(model: nn.Module, seed: int) -> None:
    """torchvision's initialisation under a fixed seed: Kaiming-normal convolutions (fan-out),
    BatchNorm scale near 1 and shift near 0 (random, so layers differ), a small normal head."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
                module.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.num_features, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.num_features, generator=generator))
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.01, generator=generator)
                module.bias.zero_()


@torch.no_grad()
def centre_head(model: nn.Module, head: nn.Linear, seed: int, size: int = IMAGE_SIZE, count: int = 16) -> nn.Module:
    """Fold the standardisation of the head's input features, measured on seeded synthetic images,
    into the head. Pooled post-ReLU features are all positive: random head weights would add the
    same large offset to every input's logits and one class would win everywhere. A trained head
    learns its own centring; here the data gives it."""
    features = []
    hook = head.register_forward_hook(lambda _module, args, _out: features.append(args[0]))
    try:
        model.eval()(synthetic_images(count, seed=seed, size=size))
    finally:
        hook.remove()
    mean, std = features[0].mean(0), features[0].std(0) + 1e-3
    head.weight.div_(std)
    head.bias.copy_(-(head.weight @ mean))
    return model.eval()


def resnet18(seed: int = 0, classes: int = 1000) -> ResNet18:
    """ResNet-18 with seeded weights, BatchNorm statistics measured on 224×224 synthetic images and
    a centred head."""
    model = ResNet18(classes)
    seed_weights(model, seed)
    calibrate_batchnorm(model, batches=2, batch_size=16, seed=seed + 1, size=IMAGE_SIZE)
    return centre_head(model, model.fc, seed=seed + 2)
