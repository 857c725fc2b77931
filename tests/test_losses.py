"""Label-free objectives for any output, and the normal clipping range."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cora_fx import CoRaConfig, CoRaError, prepare_cora, quantize_cora, set_ranks
from cora_fx.calibrate.distillation import OBJECTIVES, distillation_loss
from cora_fx.config import LOSSES
from cora_fx.prepare import adapters
from cora_fx.quant.observers import make_observer

from .conftest import SmallNet, random_batches

pytestmark = pytest.mark.unit


def _pair(*shape):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(*shape, generator=g)
    return ref + 0.3 * torch.randn(*shape, generator=g), ref


def test_every_config_loss_but_ce_is_an_objective():
    assert set(LOSSES) == {"ce", *OBJECTIVES}


def test_kl_on_class_logits_is_torchs_batchmean_kl():
    out, ref = _pair(8, 10)
    expected = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(distillation_loss("kl")(out, ref), expected)


def test_kl_over_the_class_dim_of_maps_and_on_probabilities():
    out, ref = _pair(2, 5, 4, 4)
    logits = distillation_loss("kl", dim=1)(out, ref)
    probabilities = distillation_loss("kl", dim=1)(out.softmax(1), ref.softmax(1))
    torch.testing.assert_close(logits, probabilities, rtol=1e-4, atol=1e-6)
    per_pixel = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), reduction="none", log_target=True)
    torch.testing.assert_close(logits, per_pixel.sum(1).mean())


def test_kl_on_a_single_value_per_distribution_is_refused():
    out, ref = _pair(8, 1)
    with pytest.raises(CoRaError, match="one value per distribution.*'bce'"):
        distillation_loss("kl")(out, ref)
    with pytest.raises(CoRaError, match="no such dimension"):
        distillation_loss("kl", dim=3)(*_pair(8, 4))


def test_bce_on_probabilities_equals_bce_on_their_logits_and_refuses_logits():
    out, ref = _pair(8, 360)
    probs = distillation_loss("bce")(out.sigmoid(), ref.sigmoid())
    torch.testing.assert_close(probs, distillation_loss("bce_logits")(out, ref), rtol=1e-4, atol=1e-6)
    assert distillation_loss("bce")(ref.sigmoid(), ref.sigmoid()) < 1e-5
    with pytest.raises(CoRaError, match=r"needs probabilities in \[0, 1\].*'bce_logits'"):
        distillation_loss("bce")(out, ref)


def test_mse_is_scale_free():
    out, ref = _pair(4, 16)
    torch.testing.assert_close(distillation_loss("mse")(out * 1e3, ref * 1e3), distillation_loss("mse")(out, ref))


def test_structured_outputs_sum_per_tensor_and_must_match():
    (a, ra), (b, rb) = _pair(4, 10), _pair(4, 3)
    loss = distillation_loss("mse")
    expected = loss(a, ra) + loss(b, rb)
    torch.testing.assert_close(loss({"x": a, "y": (b, 7)}, {"x": ra, "y": (rb, 7)}), expected)
    with pytest.raises(CoRaError, match="do not match"):
        loss({"x": a}, {"z": ra})
    with pytest.raises(CoRaError, match="shape"):
        loss(a, rb)


def test_recommended_takes_any_objective_and_keeps_its_other_choices():
    base = CoRaConfig.recommended(4)
    for loss in ("bce", "mse", lambda out, ref, labels: (out - ref).abs().mean()):
        cfg = CoRaConfig.recommended(4, loss=loss, loss_dim=-1)
        assert cfg.search.loss is loss and cfg.search.loss_dim == -1
        assert cfg.replace(loss=base.search.loss, loss_dim=1) == base
    with pytest.raises(ValueError, match="loss"):
        CoRaConfig.recommended(4, loss="hinge")


class SigmoidNet(nn.Module):
    """Independent-label probabilities, the output of pitch and multi-label models."""

    def __init__(self) -> None:
        super().__init__()
        self.body = SmallNet(classes=12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x))


def test_search_with_bce_on_a_sigmoid_model_and_a_clear_error_for_kl_on_one_output():
    batches = random_batches(2)
    cfg = CoRaConfig().replace(iterations=3, loss="bce")
    q = quantize_cora(SigmoidNet().eval(), batches, cfg, progress=False)
    assert q.meta["cora_fx"].search_result.history.task_loss
    single = nn.Sequential(SmallNet(classes=1), nn.Sigmoid()).eval()
    with pytest.raises(CoRaError, match="one value per distribution"):
        quantize_cora(single, batches, cfg.replace(loss="kl"), progress=False)


def test_normal_range_stays_within_the_weights_and_the_paper_formula_is_kept():
    w = torch.randn(8, 4, 3, 3)
    for per_channel in (False, True):
        clipped, paper = (make_observer(c, 3, per_channel, k=4.0) for c in ("normal", "normal_paper"))
        clipped(w)
        paper(w)
        rows = w.reshape(8, -1) if per_channel else w.reshape(1, -1)
        assert (clipped.min_val >= rows.min(1).values.squeeze() - 1e-6).all()
        assert (clipped.max_val <= rows.max(1).values.squeeze() + 1e-6).all()
        assert (paper.max_val > clipped.max_val).any()


def test_normal_clipping_within_minmax_cuts_the_output_error_of_a_small_net_at_3_bits():
    model = SmallNet().eval()
    x = random_batches(1)[0][0]
    errors = {}
    for clipping in ("normal", "normal_paper"):
        cfg = CoRaConfig().replace(bits=3, clipping=clipping, quantize_linear=False, adapter_bits=None)
        prepared = prepare_cora(model, cfg)
        set_ranks(prepared, {n: 0 for n, a in adapters(prepared).items() if a.searchable})
        with torch.no_grad():
            errors[clipping] = F.mse_loss(prepared(x), model(x)).item()
    assert errors["normal"] < 0.5 * errors["normal_paper"], errors
