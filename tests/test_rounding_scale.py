"""Calibrated rounding on wide layers: block-diagonal second moments and the Gram-matrix SVD."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cora_fx.quant.residual as residual_module
from cora_fx import CoRaConfig, calibrate_rounding, prepare_cora, set_ranks, summary
from cora_fx.calibrate.rounding import SecondMoment, collect_input_moments, gptq_quantize, im2col
from cora_fx.quant.observers import make_observer
from cora_fx.quant.residual import ResidualFactors, gram_svd, thin_svd
from cora_fx.quant.uniform import QuantizedWeight, quantize_weight

from .conftest import random_batches

pytestmark = pytest.mark.unit


def test_gram_svd_matches_lapack_and_reconstructs_exactly():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 12, 300, generator=g, dtype=torch.float64)
    wide[1, -3:] = 0  # rank-deficient block
    u, s, vh = gram_svd(wide)
    torch.testing.assert_close(s, torch.linalg.svdvals(wide), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, wide, rtol=1e-9, atol=1e-9)


def test_thin_svd_takes_the_gram_route_above_the_size_limit(monkeypatch):
    monkeypatch.setattr(residual_module, "GRAM_ELEMENTS", 100)
    tall = torch.randn(1, 200, 10, dtype=torch.float64)
    u, s, vh = thin_svd(tall)
    assert u.shape == (1, 200, 10) and vh.shape == (1, 10, 10)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, tall, rtol=1e-9, atol=1e-9)


class Wide(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(24, 8, 3, padding=1, groups=groups)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


def _batches(n: int = 2) -> list:
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(24, 4, generator=g)  # channels correlated across blocks
    return [(torch.einsum("cr,brhw->bchw", mix, torch.randn(4, 4, 6, 6, generator=g))
             + 0.1 * torch.randn(4, 24, 6, 6, generator=g), None) for _ in range(n)]


@pytest.mark.parametrize("groups", [1, 2])
def test_blocks_are_the_diagonal_blocks_of_the_exact_second_moment(groups):
    model = Wide(groups).eval()
    cfg = CoRaConfig.recommended(4, target_bits=None)
    exact = collect_input_moments(prepare_cora(model, cfg), _batches(), 2)["conv"]
    blocked = collect_input_moments(prepare_cora(model, cfg.replace(max_block=50)), _batches(), 2)["conv"]
    assert exact.exact and not blocked.exact
    assert [b - a for a, b in blocked.bounds] == [45] * (24 // groups // 5) + [(24 // groups % 5) * 9]
    x = torch.cat([b[0] for b in _batches()])
    spec = prepare_cora(model, cfg).get_submodule("conv").quantized.spec
    cols = im2col(x, spec, (3, 3)).reshape(8, groups, -1, 36).double()
    dense = torch.einsum("bgdl,bgel->gde", cols, cols) / (8 * 36)
    torch.testing.assert_close(exact.blocks[0], dense, rtol=1e-5, atol=1e-5)
    for block, (a, b) in zip(blocked.blocks, blocked.bounds):
        assert block.dtype == torch.float32  # blocks are stored in float32, the exact moment in float64
        torch.testing.assert_close(block.double(), dense[:, a:b, a:b], rtol=1e-5, atol=1e-5)


def test_blockwise_gptq_equals_dense_gptq_on_a_block_diagonal_second_moment():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 4, 3, 3, generator=g)
    x = torch.randn(2, 36, 36, generator=g, dtype=torch.float64)
    blocks = [x[0, :18] @ x[0, :18].T / 36, x[1, 18:] @ x[1, 18:].T / 36]
    dense = torch.block_diag(*blocks)
    observer = make_observer("minmax", 3, True)
    qw = quantize_weight(weight, observer, 3)
    a = gptq_quantize(weight, dense.unsqueeze(0), qw)
    b = gptq_quantize(weight, SecondMoment([blk.unsqueeze(0) for blk in blocks], [(0, 18), (18, 36)]), qw)
    assert isinstance(b, QuantizedWeight)
    assert torch.equal(a.codes, b.codes)


def test_block_whitened_factors_are_exact_at_full_rank():
    g = torch.Generator().manual_seed(5)
    residual = torch.randn(8, 4, 3, 3, generator=g)
    lower = [torch.linalg.cholesky(torch.eye(n) + m @ m.T / n).unsqueeze(0)
             for n, m in ((18, torch.randn(18, 18, generator=g)), (18, torch.randn(18, 18, generator=g)))]
    factors = ResidualFactors(residual, 1, lower)
    torch.testing.assert_close(factors.folded_delta(torch.ones(factors.max_rank)), residual, rtol=1e-4, atol=1e-5)


def test_calibration_with_blocks_is_reported_and_stays_exact_at_full_rank():
    model = Wide().eval()
    cfg = CoRaConfig.recommended(4, target_bits=None).replace(max_block=50, adapter_bits=None, quantize_linear=False)
    prepared = prepare_cora(model, cfg)
    calibrate_rounding(prepared, _batches(), progress=False)
    notes = summary(prepared).rounding_notes
    assert set(notes) == {"conv"} and "5 diagonal blocks of at most 50 columns (fan-in 216)" in notes["conv"]
    assert "rounding: second moment" in str(summary(prepared))
    set_ranks(prepared, "full")
    x = _batches(1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-3, atol=1e-4)


def test_blocks_cost_little_on_a_small_net():
    """Output error of the GPTQ model with blocks of 9 columns (one channel of a 3x3 conv) vs the exact moment
    (the Linear head, 9 channels a block there, stays float)."""
    from .conftest import SmallNet

    model = SmallNet().eval()
    batches = random_batches(2)
    errors = {}
    for block in (4096, 9):
        config = CoRaConfig.recommended(3, target_bits=None).replace(max_block=block, quantize_linear=False)
        prepared = prepare_cora(model, config)
        calibrate_rounding(prepared, batches, progress=False)
        x = batches[0][0]
        with torch.no_grad():
            errors[block] = (prepared(x) - model(x)).pow(2).mean().item()
    assert errors[9] < 3 * errors[4096]
