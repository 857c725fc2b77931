"""The search's speed-ups change nothing but time: micro-batches, channels-last, cached float outputs,
the start on the budget; pointwise / strided second moments; the Gram-matrix SVD; progress bars."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cora_fx import CoRaConfig, prepare_cora, search_ranks
from cora_fx.calibrate import objective
from cora_fx.calibrate.rounding import collect_input_moments, im2col
from cora_fx.quant.residual import thin_svd
from tests.conftest import random_batches, summation_tolerance

# the recommended search settings, without data-aware rounding (not what is tested here)
CFG = CoRaConfig.recommended(2, target_bits=None).replace(rounding="nearest", svd="weight", budget=0.05)


ITERATIONS = 4


def _search(model: nn.Module, batches: list, **overrides) -> tuple[dict, list]:
    prepared = prepare_cora(model, CFG, progress=False)
    result = search_ranks(prepared, batches, progress=False, **{"iterations": ITERATIONS, **overrides})
    return result.soft_ranks, result.history.task_loss


def _tolerance(model: nn.Module) -> float:
    """Kernels and batch splits change only the order of float32 additions: each of the search's steps (a forward
    and a backward pass, feeding the next step) may differ by the summation bound (a real difference in the
    objective, e.g. a chunk weighted wrongly, moves the losses by orders of magnitude more)."""
    return summation_tolerance(model, passes=2 * (ITERATIONS + 1))


@pytest.mark.parametrize("overrides", [{"micro_batch": 3}, {"micro_batch": "auto"}, {"channels_last": False}])
def test_micro_batches_and_memory_format_give_the_same_search(small_net, overrides):
    batches = random_batches(3, batch=8)
    reference = _search(small_net, batches, micro_batch=None, channels_last=True)
    ranks, losses = _search(small_net, batches, **overrides)
    assert ranks.keys() == reference[0].keys()
    tol = _tolerance(small_net)
    assert tol < 1e-3  # still a test: the search moves the losses by about 1e-1 in these steps
    for name, value in ranks.items():
        assert value == pytest.approx(reference[0][name], rel=tol, abs=tol), name
    assert losses == pytest.approx(reference[1], rel=tol)


@pytest.mark.unit
def test_micro_batches_split_batch_mean_losses_only():
    x, y = torch.randn(10, 3, 4, 4), torch.arange(10)
    chunks = objective.micro_batches((x,), y, 4, "kl")
    assert [len(c[0][0]) for c in chunks] == [4, 4, 2] and sum(c[2] for c in chunks) == pytest.approx(1.0)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert len(objective.micro_batches((x,), y, 4, "mse")) == 1  # normalized by the batch's own scale
    assert len(objective.micro_batches((x,), y, 4, lambda o, f, lab: o.sum())) == 1
    assert len(objective.micro_batches((x, torch.randn(3)), y, 4, "kl")) == 1  # no shared batch dimension
    assert len(objective.micro_batches((x,), y, None, "kl")) == 1
    # "auto" on a CPU: about 8 ImageNet images' worth of input values per chunk
    big = torch.randn(20, 3, 224, 224)
    assert [len(c[0][0]) for c in objective.micro_batches((big,), None, "auto", "ce")] == [8, 8, 4]


def test_float_outputs_are_computed_once_per_listed_batch(small_net, monkeypatch):
    calls = []
    original = objective.teacher_output
    monkeypatch.setattr(objective, "teacher_output", lambda *a: calls.append(1) or original(*a))
    batches = random_batches(2, batch=4)
    _search(small_net, batches, iterations=6, micro_batch=None)
    assert len(calls) == 2  # a list repeats: 6 steps, 2 batches
    calls.clear()
    _search(small_net, iter(batches * 3), iterations=6, micro_batch=None)
    assert len(calls) == 6  # a one-shot iterator (or a shuffling loader) may not repeat: every step


class FlattensWithView(nn.Module):
    """``view`` on a conv output: impossible in channels-last memory format."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).view(x.shape[0], -1))


@pytest.mark.unit
def test_a_model_that_cannot_run_channels_last_falls_back_by_itself():
    model = FlattensWithView().eval()
    with pytest.raises(RuntimeError, match="view"):
        model(torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    batches = random_batches(2, batch=4)
    (ranks, losses), (ranks_contiguous, losses_contiguous) = (_search(model, batches, channels_last=flag)
                                                              for flag in (True, False))
    tol = _tolerance(model)
    assert ranks["conv"] == pytest.approx(ranks_contiguous["conv"], rel=tol)
    assert losses == pytest.approx(losses_contiguous, rel=tol)


@pytest.mark.unit
def test_start_on_the_budget(small_net):
    cfg = CFG.replace(init_rank="budget", budget=0.3)  # above every layer's rank-1 floor
    result = search_ranks(prepare_cora(small_net, cfg, progress=False), random_batches(1), iterations=0, progress=False)
    assert result.soft_budget == pytest.approx(0.3, rel=1e-3)
    assert CFG.replace(init_rank="budget").search.start_rank == CFG.search.budget


@pytest.mark.unit
@pytest.mark.parametrize("kernel,stride,groups", [(1, 1, 1), (1, 2, 1), (3, 2, 8), (1, 1, 2)])
def test_second_moments_of_pointwise_strided_and_grouped_convs(kernel, stride, groups):
    model = nn.Sequential(nn.Conv2d(8, 8, kernel, stride=stride, padding=kernel // 2, groups=groups)).eval()
    batches = [(torch.randn(5, 8, 9, 9), None) for _ in range(2)]
    moment = collect_input_moments(prepare_cora(model, CFG, progress=False), batches, 2)["0"]
    x = torch.cat([b[0] for b in batches]).double()
    spec = prepare_cora(model, CFG, progress=False).get_submodule("0").quantized.spec
    cols = im2col(x, spec, (kernel, kernel))
    cols = cols.reshape(cols.shape[0], groups, -1, cols.shape[-1])
    dense = torch.einsum("bgdl,bgel->gde", cols, cols) / (cols.shape[0] * cols.shape[-1])
    torch.testing.assert_close(moment.blocks[0], dense, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(1, 64, 600), (2, 300, 40), (1, 512, 4608), (3, 7, 7)])
def test_residual_svd_is_exact_at_full_rank_and_orders_triplets(shape):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -3, shape[-1], dtype=torch.float64)
    u, s, vh = thin_svd(m)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, m, rtol=1e-10, atol=1e-10)
    assert (s[..., :-1] >= s[..., 1:]).all()
    reference = torch.linalg.svdvals(m)
    torch.testing.assert_close(s[..., :8], reference[..., :8], rtol=1e-9, atol=1e-12)  # the triplets kept first
    torch.testing.assert_close(u.mT @ u, torch.eye(u.shape[-1], dtype=m.dtype).expand_as(u.mT @ u), atol=1e-10,
                               rtol=0)


@pytest.mark.unit
def test_prepare_shows_progress_unless_silenced(small_net, capsys):
    prepare_cora(small_net, CFG, progress=False)
    assert "cora prepare" not in capsys.readouterr().err
    prepare_cora(small_net, CFG, progress=True)
    assert "cora prepare" in capsys.readouterr().err
