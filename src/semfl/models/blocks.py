"""Convolutional building blocks shared by the CSC encoder and the classifier."""
from __future__ import annotations

from typing import Callable

from torch import nn

Norm = Callable[[int], nn.Module]


def group_norm(channels: int) -> nn.Module:
    # Federated models avoid BatchNorm: running statistics do not average well across
    # non-IID users and cannot be used under torch.func.vmap.
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, norm: Norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm: Norm):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = norm(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def resnet_stages(block: type, cin: int, widths: list[int], depths: list[int], strides: list[int],
                  norm: Norm) -> tuple[nn.Sequential, int]:
    layers = []
    for width, depth, stride in zip(widths, depths, strides):
        for i in range(depth):
            layers.append(block(cin, width, stride if i == 0 else 1, norm))
            cin = width * block.expansion
    return nn.Sequential(*layers), cin
