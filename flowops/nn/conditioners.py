"""Conditioner builders whose last layer starts at zero (the coupling starts as the identity)."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def _hidden(hidden) -> tuple:
    if isinstance(hidden, int):
        return (hidden, hidden)
    return tuple(int(h) for h in hidden)


def mlp(in_features: int, out_features: int, hidden: int | Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear -> activation -> ... -> zero-initialized Linear. ``hidden`` int means two layers of that width."""
    widths = (in_features, *_hidden(hidden))
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), activation()]
    last = nn.Linear(widths[-1], out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def conv_net(in_channels: int, out_channels: int, hidden: int = 128) -> nn.Sequential:
    """Glow's conditioner: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialized conv3x3."""
    last = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        last,
    )
