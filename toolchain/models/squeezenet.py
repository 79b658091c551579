"""SqueezeNet 1.1 (Iandola et al., 2016) in plain PyTorch, with seeded weights.

Same architecture, parameter count (1.24 M) and FLOPs (~0.35 GFLOP at 224×224) as torchvision's
``squeezenet1_1``, without torchvision (whose PyPI build does not load beside this torch). The
weights are random but seeded and real tensors, so outputs depend on the input: good for
correctness and latency work, not for accuracy. ``module:callable`` for ``edgesmith build``:
``edgesmith.toolchain.models.squeezenet:squeezenet`` with ``--input-shape 1,3,224,224``.
"""

from __future__ import annotations

import torch
from torch import nn


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(inplanes, squeeze, 1), nn.ReLU())
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand1x1, 1), nn.ReLU())
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand3x3, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(nn.Conv2d(512, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet(seed: int = 0) -> SqueezeNet:
    """SqueezeNet 1.1 initialised as torchvision does (Kaiming-uniform convs, zero biases, a small
    normal final conv), under a fixed seed: activations keep their scale, so outputs follow the input."""
    generator = torch.Generator().manual_seed(seed)
    model = SqueezeNet()
    with torch.no_grad():
        final = model.classifier[0]
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                if module is final:
                    module.weight.normal_(0.0, 0.01, generator=generator)
                else:
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    bound = (6.0 / fan_in) ** 0.5
                    module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.zero_()
    return model.eval()
