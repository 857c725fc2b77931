"""plot_ranks / plot_search write readable PNGs from a search result or a summary."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from cora_fx import CoRaConfig, convert_cora, plot_ranks, plot_search, prepare_cora, search_ranks, summary
from cora_fx.tools.plots import rank_table

from .conftest import SmallNet, random_batches

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def searched():
    torch.manual_seed(0)
    prepared = prepare_cora(SmallNet().eval(), CoRaConfig().replace(budget=0.2),
                            example_inputs=(torch.randn(2, 3, 16, 16),))
    result = search_ranks(prepared, random_batches(3), iterations=6, progress=False)
    return result, summary(convert_cora(prepared))


def test_rank_table_from_result_and_summary_agree(searched):
    result, report = searched
    rows = rank_table(result)
    assert rows == rank_table(report)
    for name, rank, heuristic, max_rank in rows:
        assert rank == result.ranks[name] and max_rank == result.max_ranks[name]
        assert heuristic == math.floor(0.2 * max_rank)
    assert "block.2" not in {r[0] for r in rows}  # depthwise (policy off) is not a searched layer


def test_plots_are_written(searched, tmp_path):
    result, report = searched
    for path in (plot_ranks(result, tmp_path / "a" / "ranks.png"), plot_ranks(report, tmp_path / "ranks2.png"),
                 plot_search(result, tmp_path / "search.png")):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_bad_inputs_and_missing_matplotlib(searched, tmp_path, monkeypatch):
    result, _ = searched
    with pytest.raises(TypeError, match="RankSearchResult"):
        plot_ranks({"a": 1}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="RankSearchResult"):
        plot_search(summary, tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"cora-fx\[plot\]"):
        plot_search(result, tmp_path / "x.png")
