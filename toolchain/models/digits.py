"""A small CNN for scikit-learn's ``digits`` images (1×8×8 inputs, 10 classes).

Weights are seeded, so every build of the same model is the same model; ``digits_cnn`` is the
``module:callable`` that ``edgesmith build`` takes: ``edgesmith.toolchain.models.digits:digits_cnn``.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def digits_cnn(seed: int = 0) -> DigitsCNN:
    """The demo CNN with seeded random weights and BatchNorm statistics measured on seeded
    standard-normal inputs (the distribution `edgesmith build` samples from): with made-up
    statistics a random net answers the same class for every input, and a monitor could then never
    see its output distribution move."""
    generator = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the calibration batch
        model.train()
        model(torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 1)))
        for norm in norms:
            norm.momentum = 0.1
    return model.eval()
