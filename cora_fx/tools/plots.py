"""Figures of a CoRa run (matplotlib, the ``plot`` extra): per-layer ranks and the search curves.

`plot_ranks` is the paper's Fig. 3b (chosen rank vs the heuristic floor(b * R) and the
maximum rank R per layer), `plot_search` its Fig. 3a (loss and running budget per iteration).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

from cora_fx.calibrate.rank_search import RankSearchResult
from cora_fx.io.summary import CoRaSummary

PathLike = Union[str, Path]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError('cora_fx plots need matplotlib: pip install "cora-fx[plot]"') from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def rank_table(source: Union[RankSearchResult, CoRaSummary]) -> list[tuple[str, int, int, int]]:
    """``(layer, chosen rank, heuristic rank, max rank)`` for every searched layer."""
    if isinstance(source, RankSearchResult):
        b = source.target_budget
        return [(n, r, math.floor(b * source.max_ranks[n]), source.max_ranks[n]) for n, r in source.ranks.items()]
    if isinstance(source, CoRaSummary):
        b = source.target_budget
        return [(layer.name, layer.rank, math.floor(b * layer.max_rank), layer.max_rank)
                for layer in source.layers if layer.kind == "conv" and layer.policy == "search"]
    raise TypeError(f"plot_ranks: expected a RankSearchResult or CoRaSummary, got {type(source).__name__}")


def plot_ranks(source: Union[RankSearchResult, CoRaSummary], path: PathLike, title: str = "") -> Path:
    """Horizontal bars per layer: max rank R, chosen rank, heuristic floor(b * R); log rank axis."""
    rows = rank_table(source)
    if not rows:
        raise ValueError("plot_ranks: no searched layer to plot")
    plt = _pyplot()
    names = [r[0] for r in rows]
    y = list(range(len(rows)))
    height = max(3.0, 0.28 * len(rows) + 1.6)
    width = 7.0 + 0.06 * max(len(n) for n in names)
    fig, ax = plt.subplots(figsize=(width, height))
    ax.barh(y, [r[3] for r in rows], height=0.8, color="#dddddd", label="max rank R")
    ax.barh(y, [max(r[1], 0.5) if r[1] else 0 for r in rows], height=0.5, color="#1f77b4", label="chosen rank")
    ax.scatter([max(r[2], 0.5) for r in rows], y, marker="|", s=160, color="#d62728", zorder=3,
               label="heuristic floor(b·R) (0 drawn at 0.5)")
    ax.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlim(0.4, max(r[3] for r in rows) * 1.5)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("rank (log scale)")
    ax.set_ylabel("layer")
    budget = source.budget
    ax.set_title(title or f"CoRa per-layer ranks (budget {budget:.4f}, target {source.target_budget:.4f})", fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0 + 0.35 / height), ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_search(result: RankSearchResult, path: PathLike, title: str = "") -> Path:
    """Loss (total and task) and running budget per search iteration, the target budget dashed."""
    if not isinstance(result, RankSearchResult):
        raise TypeError(f"plot_search: expected a RankSearchResult, got {type(result).__name__}")
    if not result.history.loss:
        raise ValueError("plot_search: the search ran no iteration")
    plt = _pyplot()
    steps = range(1, len(result.history.loss) + 1)
    fig, (ax_loss, ax_budget) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot(steps, result.history.loss, label="loss (task + penalty)")
    ax_loss.plot(steps, result.history.task_loss, label="task loss", alpha=0.8)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_budget.plot(steps, result.history.budget, color="#2ca02c", label="running budget (soft ranks)")
    ax_budget.axhline(result.target_budget, color="#d62728", linestyle="--",
                      label=f"target b = {result.target_budget:g}")
    ax_budget.axhline(result.budget, color="#9467bd", linestyle=":",
                      label=f"final budget {result.budget:.4f} (projected)")
    ax_budget.set_xlabel("iteration")
    ax_budget.set_ylabel("adapter params / conv params")
    ax_budget.legend(fontsize=8)
    ax_budget.grid(alpha=0.3)
    fig.suptitle(title or f"CoRa rank search ({result.iterations} iterations, {result.seconds:.1f} s)", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
