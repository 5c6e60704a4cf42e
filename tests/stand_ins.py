"""Small stand-in networks shared by the workflow tests."""

import torch
from torch import nn


class CopyNet(nn.Module):
    """Stand-in CAM network: tumour map = the input slice, healthy map = 0."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))

    def features(self, x):
        return x

    def forward(self, x):
        return self.classifier(self.features(x))
