"""Shared fixtures: the real-data folder, small models, hypothesis profiles."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
FLOAT32_EPS = torch.finfo(torch.float32).eps


def summation_tolerance(model: torch.nn.Module, passes: int = 1) -> float:
    """Relative tolerance between two float32 runs of ``model`` that add the same products in another order
    (other CPU kernels, memory formats, batch splits): the recursive-summation bound n * eps of a dot product of
    length n, added over the model's conv and linear layers (n = fan-in), times the ``passes`` through which a
    difference is carried (a search step is a forward and a backward pass, and feeds the next step)."""
    fan_ins = [m.weight[0].numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return FLOAT32_EPS * sum(fan_ins) * passes


def assert_same_up_to_summation(actual: torch.Tensor, expected: torch.Tensor, model: torch.nn.Module,
                                passes: int = 2) -> None:
    """``actual`` equals ``expected`` up to `summation_tolerance`, relative to the output's scale (the two sides
    compute the same model through other ops: folded BatchNorm, unpacked codes, another kernel)."""
    atol = summation_tolerance(model, passes) * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def shared_data_dir() -> Path:
    """$CORA_FX_DATA, else ../shared/data next to the repository."""
    return Path(os.environ.get("CORA_FX_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class SmallNet(torch.nn.Module):
    """A residual ConvNet with grouped, depthwise, 1x1 and strided convs and a Linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
            nn.Conv2d(32, 16, 3, padding=1, groups=4),
        )
        self.down = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        x = torch.relu(self.down(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def small_net() -> SmallNet:
    return SmallNet().eval()


def random_batches(n: int, batch: int = 8, size: int = 16, classes: int = 10) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]
