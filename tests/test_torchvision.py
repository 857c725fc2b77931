"""torchvision resnet18 / mobilenet_v2 end to end (random weights), and the budget after a real search."""
from __future__ import annotations

import pytest
import torch
import torchvision

from cora_fx import CoRaConfig, convert_cora, prepare_cora, search_ranks, summary

from .conftest import random_batches


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_prepare_search_convert_export_compile(arch):
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    prepared = prepare_cora(model, example_inputs=(x,))
    result = search_ranks(prepared, random_batches(2, batch=4, size=32), iterations=3, progress=False)
    assert result.iterations == 3 and result.budget <= 0.05 + 1e-9
    converted = convert_cora(prepared)
    with torch.no_grad():
        eager = converted(x)
        torch.testing.assert_close(eager, prepared(x), rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
        exported = torch.export.export(converted, (x,))
        scale = float(eager.abs().max())
        torch.testing.assert_close(exported.module()(x), eager, rtol=1e-5, atol=1e-5 * scale)
        compiled = torch.compile(converted)(x)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * scale)
    s = summary(converted)
    assert s.equivalent_bits <= 4 + 8 * 0.05 + 1e-9
    assert s.nbytes < 0.2 * sum(p.numel() * 4 for p in model.parameters()) + 200_000


def test_budget_is_met_after_a_search_with_enough_iterations():
    """The soft penalty alone misses the budget; the projection must hold it exactly."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    prepared = prepare_cora(model, CoRaConfig().replace(budget=0.05))
    result = search_ranks(prepared, random_batches(4, batch=4, size=32), iterations=60, lr=0.02, progress=False)
    assert result.iterations == 60
    assert 0 < result.budget <= 0.05 + 1e-9
    assert result.history.budget[-1] < result.history.budget[0]  # the penalty pushes the running budget down
    assert sum(1 for r in result.ranks.values() if r > 0) >= len(result.ranks) // 2
