"""The torchvision model-zoo sweep (benchmarks/zoo_sweep.py) as tests.

Fast tier (default run): one model per family, small inputs. Slow tier (``python -m pytest -m slow
tests/test_zoo.py``): every other model of the zoo. Each model must pass every check (coverage,
Theorem-1 exactness, convert == prepared, export == eager, input model not mutated) or be refused
with a CoRaError; models above the sweep's parameter cap are not run (stated in the table).
"""
from __future__ import annotations

import gc

import pytest
import torch

from benchmarks.zoo_sweep import FAST, FULL_RANK_TOL, ZooRow, sweep_model, zoo

pytestmark = pytest.mark.benchmark  # drives a benchmark script on small inputs

ZOO = zoo()
SLOW = [name for name in ZOO if name not in FAST]
#: The fast tier's largest models (over 10 s each on 2 cores): with -m slow, to keep the default run short.
HEAVY = {"vgg11", "densenet121", "inception_v3"}


@pytest.fixture(autouse=True)
def _release_compiled_graphs():
    """Drop torch.export's compiled state and the model after each test: without it the slow tier, run in one
    process, grew past 24 GB and was killed; with it its peak is about 15 GB."""
    yield
    torch._dynamo.reset()
    gc.collect()


def check(row: ZooRow) -> None:
    assert row.status in ("pass", "refused", "not run"), f"{row.model}: {row.status}: {row.reason}"
    if row.status == "pass":
        assert row.convs > 0 and row.rewritten + row.skipped == row.convs
        assert row.full_rank_err is not None and row.full_rank_err <= FULL_RANK_TOL
    if row.status == "refused":  # a clear refusal names what to do
        assert "CoRa" in row.reason and row.reason.split(":", 1)[1].strip()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in FAST])
def test_zoo_fast(name):
    row = sweep_model(ZOO[name])
    assert row.status == "pass", f"{name}: {row.reason}"
    check(row)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_zoo_full_sweep(name):
    check(sweep_model(ZOO[name]))


def test_every_torchvision_classifier_is_in_the_sweep():
    import torchvision

    classifiers = set(torchvision.models.list_models(module=torchvision.models))
    assert classifiers <= set(ZOO)
    assert len(set(FAST)) == len(FAST) and set(FAST) <= set(ZOO)
