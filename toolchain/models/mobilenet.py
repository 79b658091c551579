"""MobileNetV2 (Sandler et al., 2018) in plain PyTorch, with seeded weights.

torchvision's ``mobilenet_v2`` layout (width 1.0: inverted residual blocks with ReLU6, 3.5 M
parameters, ~0.3 GFLOP at 224×224) without torchvision. Seeded initialisation as in
``resnet.seed_weights``, BatchNorm statistics measured on seeded synthetic images
(``edgenet.calibrate_batchnorm``) and a centred head (``resnet.centre_head``), so outputs follow the input. ``module:callable`` for
``edgesmith build``: ``edgesmith.toolchain.models.mobilenet:mobilenet_v2`` with
``--input-shape 1,3,224,224``.
"""

from __future__ import annotations

import torch
from torch import nn

from edgesmith.toolchain.models.edgenet import calibrate_batchnorm
from edgesmith.toolchain.models.resnet import centre_head, seed_weights

IMAGE_SIZE = 224
# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    """1×1 expansion, 3×3 depthwise, linear 1×1 projection; a shortcut when the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [] if expansion == 1 else [_conv_bn_relu6(cin, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.shortcut else y


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [_conv_bn_relu6(3, 32, 3, 2)], 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(seed: int = 0, classes: int = 1000) -> MobileNetV2:
    """MobileNetV2 with seeded weights, BatchNorm statistics measured on 224×224 synthetic images and
    a centred head."""
    model = MobileNetV2(classes)
    seed_weights(model, seed)
    calibrate_batchnorm(model, batches=2, batch_size=16, seed=seed + 1, size=IMAGE_SIZE)
    return centre_head(model, model.classifier, seed=seed + 2)
