"""RESULTS.md tables and plots from the benchmark's JSON.

    python benchmarks/report.py benchmarks/results/results.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def fmt(v, digits=2):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def table(results: dict) -> str:
    rows = ["| method | top-1 (95% CI) | top-5 | tiny64 agreement | eq. bits | budget | artifact bytes | calib s | iters |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        if "error" in r:
            rows.append(f"| {name} | cannot run: {r['error']} | | | | | | | |")
            continue
        ci = f"{r['top1']:.2f} ({r['top1_lo']:.1f}-{r['top1_hi']:.1f})"
        rows.append(f"| {name} | {ci} | {r['top5']:.2f} | {fmt(r.get('tiny_agreement'))} | {r['equivalent_bits']:.3f} | "
                    f"{fmt(r.get('budget'), 4)} | {r['artifact_bytes']:,} | {r['calib_seconds']:.0f} | {r.get('iterations', 0)} |")
    return "\n".join(rows)


def latency_table(results: dict) -> str:
    """Median ms of float and quantized, interleaved, per mode and batch (`benchmarks/latency.py`)."""
    rows = ["| method | mode | batch | float ms | quantized ms | ratio |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for key, v in (r.get("latency") or {}).items() if isinstance(r, dict) else ():
            mode, batch = key.rsplit("_b", 1)
            rows.append(f"| {name} | {mode} | {batch} | {v['float_ms']:.1f} | {v['quantized_ms']:.1f} | {v['ratio']:.2f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


ZOOM_MB, ZOOM_TOP1 = (1.5, 2.8), 64.0  # the inset of the Pareto plot


#: where a point's label may go (offset in points, horizontal alignment), tried in this order
LABEL_SPOTS = [(4, 4, "left"), (4, -10, "left"), (-4, 4, "right"), (-4, -10, "right"), (4, 12, "left"),
               (-4, 12, "right"), (4, -18, "left"), (-4, -18, "right"), (10, -3, "left"), (-10, -3, "right")]


def place_labels(fig, labels: list) -> None:
    """Annotate each (axes, x, y, text) at the first spot in `LABEL_SPOTS` that overlaps no earlier label,
    no marker of its axes and does not run past the axes' edge (greedy; the least crowded spot if none is
    free). Call after the layout is final."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # inset axes get their final place only when drawn
    renderer = fig.canvas.get_renderer()
    half = 3 * fig.dpi / 72  # every marker is an obstacle, as a 6x6-point box around the point
    taken = {}
    for target, x, y, _ in labels:
        cx, cy = target.transData.transform((x, y))
        taken.setdefault(target, []).append(Bbox.from_extents(cx - half, cy - half, cx + half, cy + half))
    for target, x, y, text in labels:
        frame = target.get_window_extent(renderer)
        best = None  # (overlap, spot, box)
        for dx, dy, ha in LABEL_SPOTS:
            trial = target.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=6, ha=ha)
            box = trial.get_window_extent(renderer)
            trial.remove()
            clash = sum(overlap_area(box, other) for other in taken[target])
            clash += box.width * box.height - overlap_area(box, frame)  # the part cut off by the axes' edge
            if best is None or clash < best[0]:
                best = (clash, (dx, dy, ha), box)
            if clash == 0:
                break
        _, (dx, dy, ha), box = best
        target.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=6, ha=ha)
        taken[target].append(box)


def overlap_area(a, b) -> float:
    """Area shared by two display-space boxes (matplotlib Bboxes)."""
    from matplotlib.transforms import Bbox

    shared = Bbox.intersection(a, b)
    return 0.0 if shared is None else shared.width * shared.height


#: "AIMET AdaRound (500 steps) W4": a peer re-run with a longer schedule than its own row's
LONGER_SCHEDULE = re.compile(r"(?P<method>.+) \((?P<steps>\d+) steps\) (?P<bits>W\d+)$")


def plot_family(name: str) -> str:
    """The line a row belongs to: its name up to the bit-width ("CoRa recommended W4 b=0.02" ->
    "CoRa recommended"), or up to the budget for mixed-precision rows, which get lines of their own
    ("CoRa recommended W4 mixed @4.0 b=0.01" -> "CoRa recommended W4 mixed @4.0"). A peer's re-runs
    with longer schedules share one line per bit-width ("AIMET AdaRound (500 steps) W4" ->
    "AIMET AdaRound W4 (steps per layer)")."""
    if name == "float":
        return name
    if " mixed @" in name:
        return name.split(" b=")[0]
    longer = LONGER_SCHEDULE.match(name)
    if longer:
        return f"{longer['method']} {longer['bits']} (steps per layer)"
    return name.split(" W")[0] + (" + finetune" if name.endswith(" + finetune") else "")


def point_label(name: str, family: str) -> str:
    """What tells a point from the others on its line: "W3 b=0.02", "500 steps"."""
    longer = LONGER_SCHEDULE.match(name)
    if longer:
        return f"{longer['steps']} steps"
    return name[len(family.removesuffix(" + finetune")):].removesuffix(" + finetune").strip() or name


def plot_lines(results: dict) -> dict[str, list[tuple[float, float, str]]]:
    """(MB, top-1, row name) per `plot_family`, in the order the families first appear. Rows that could
    not run and rows marked ``superseded_by`` (an older version of a method, kept in the table) are left out."""
    families: dict[str, list[tuple[float, float, str]]] = {}
    for name, r in results.items():
        if name.startswith("_") or "error" in r or "top1" not in r or r.get("superseded_by"):
            continue
        families.setdefault(plot_family(name), []).append((r["artifact_bytes"] / 1e6, r["top1"], name))
    return families


def pareto_plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6.2))
    families = plot_lines(results)
    # more families than the default 10-colour cycle: the 10 dark, then the 10 light; in the order the
    # families first appear in results.json, so that a family added at the end recolours no other
    colors = plt.get_cmap("tab20").colors
    zoom = ax.inset_axes([0.45, 0.2, 0.38, 0.65])  # the crowded top-left corner, drawn in the empty 5-40 MB band
    zoom_top = ZOOM_TOP1 + 1.0
    labels = []
    for index, (family, pts) in enumerate(families.items()):
        pts.sort()
        style = dict(marker="os^D"[index % 4], color=colors[(2 * index) % 20 + index // 10])
        mixed = " mixed @" in family  # a tight cluster near 1.9 MB: the legend names its budgets, no point labels
        legend = f"{family}\n(b = {', '.join(n.split(' b=')[1] for _, _, n in pts)} from the left)" if mixed else family
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=legend, **style)
        inside = [p for p in pts if ZOOM_MB[0] <= p[0] <= ZOOM_MB[1] and p[1] >= ZOOM_TOP1]
        if inside:
            zoom_top = max(zoom_top, max(p[1] for p in inside) + 2.0)  # room for the labels above the top points
            zoom.plot([p[0] for p in inside], [p[1] for p in inside], **style)
        if mixed:
            continue
        for x, y, name in pts:
            labels.append((zoom if (x, y, name) in inside else ax, x, y, point_label(name, family)))
    zoom.set_xlim(*ZOOM_MB)
    zoom.set_ylim(ZOOM_TOP1, zoom_top)
    zoom.tick_params(labelsize=7)
    zoom.grid(True, alpha=0.3)
    zoom.set_title(f"zoom: {ZOOM_MB[0]}-{ZOOM_MB[1]} MB, top-1 >= {ZOOM_TOP1}", fontsize=7)
    ax.indicate_inset_zoom(zoom, edgecolor="gray")
    ax.set_xscale("log")
    ticks = [1, 1.5, 2, 3, 4, 6, 10, 15, 30, 50]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("artifact size (MB, log scale)")
    ax.set_ylabel("top-1 on eval (%)")
    ax.set_title("Accuracy vs artifact size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: points reach every corner
    fig.tight_layout()
    place_labels(fig, labels)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ranks_plot(record: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = record["extra"]
    names = list(extra["ranks"])
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(names)), 5))
    ax.bar([i - 0.2 for i in x], [extra["ranks"][n] for n in names], width=0.4, label="searched rank")
    ax.bar([i + 0.2 for i in x], [extra["heuristic"][n] for n in names], width=0.4, label="heuristic floor(b*R)")
    ax.plot(list(x), [extra["max_ranks"][n] for n in names], "k.", label="max rank R")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("rank (symlog)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else Path(__file__).resolve().parent / "results" / "results.json")
    results = json.loads(path.read_text())
    print(table(results))
    print("\n" + latency_table(results))
    pareto_plot(results, path.with_name("pareto.png"))
    searched = [n for n, r in results.items() if n == "CoRa recommended W4" and "extra" in r]
    if searched:
        ranks_plot(results[searched[0]], path.with_name("ranks.png"), searched[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
