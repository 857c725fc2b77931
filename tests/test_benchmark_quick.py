"""The ImageNet benchmark's --quick smoke test (real weights and images; skipped without them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cora_fx.tools.datasets import default_data_dir

pytestmark = pytest.mark.benchmark  # drives a benchmark script on small inputs

REPO = Path(__file__).resolve().parents[1]
DATA = default_data_dir()


@pytest.mark.skipif(not (DATA / "imagenet" / "labels.csv").is_file(),
                    reason=f"real data not found in {DATA} (set CORA_FX_DATA)")
def test_benchmark_quick_mode_runs_end_to_end(tmp_path):
    env = dict(os.environ, CORA_FX_BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.imagenet_bench", "--quick", "--peers", "", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results_quick.json").read_text())
    assert results["float"]["top1"] > 50
    names = [n for n in results if not n.startswith("_") and n != "float"]
    assert len(names) == 4 and all("error" not in results[n] for n in names), results
    for name in names:
        assert 0 <= results[name]["top1"] <= 100 and results[name]["artifact_bytes"] > 0
    rec = results["CoRa recommended W4"]
    assert rec["latency"]["eager_b1"]["ratio"] > 0
    assert rec["equivalent_bits"] < 5
    assert rec["extra"]["finetune_iterations"] == 2  # the quick row fine-tunes 2 steps after its search

    # --ranks-from: the searched row rebuilt from its recorded ranks, without the search, is the same model
    name = "CoRa searched per-channel W4"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.imagenet_bench", "--quick", "--peers", "", "--no-latency", "--only", name,
         "--ranks-from", str(tmp_path / "results_quick.json"), "--out", str(tmp_path / "rebuilt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = json.loads((tmp_path / "rebuilt" / "results_quick.json").read_text())[name]
    assert rebuilt["extra"]["ranks_recorded"] and rebuilt["iterations"] == 0
    assert rebuilt["extra"]["ranks"] == results[name]["extra"]["ranks"]
    assert (rebuilt["top1"], rebuilt["tiny_agreement"]) == (results[name]["top1"], results[name]["tiny_agreement"])


def test_report_writes_tables_and_plots_from_results_json(tmp_path, capsys):
    from benchmarks import report

    def row(name, top1, mbytes, **extra):
        return dict(name=name, top1=top1, top1_lo=top1 - 3, top1_hi=top1 + 3, top5=top1, tiny_agreement=50.0,
                    equivalent_bits=4.0, budget=0.05, artifact_bytes=int(mbytes * 1e6), calib_seconds=1.0,
                    iterations=0, **extra)

    ranks = dict(ranks={"conv": 2}, heuristic={"conv": 1}, max_ranks={"conv": 4})
    results = {"float": row("float", 79.0, 14.0), "RTN W4": row("RTN W4", 10.0, 1.7),
               "CoRa recommended W4": row("CoRa recommended W4", 79.0, 2.0, extra=ranks,  # inside the zoom inset
                                          latency={"eager_b1": dict(float_ms=1.0, quantized_ms=1.5, ratio=1.5)}),
               "peer W4": row("peer W4", 5.0, 4.0, error="ImportError: no peer"), "_meta": {}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    point = dict(family="base", target_bits=4.0, equivalent_bits=3.99, top1=78.0, top1_lo=75.0, top1_hi=81.0,
                 tiny_agreement=60.0, tiny_kl=0.1, calib_seconds=1.0)
    frontier = {"float": {"family": "float", "top1": 79.0}, "base @4.0": point,
                "joint @4.0": {**point, "family": "joint", "tiny_kl": 0.09, "vs_base": {"kl": [-0.01, -0.02, -0.005]}}}
    (tmp_path / "frontier.json").write_text(json.dumps(frontier))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| CoRa recommended W4 | 79.00 (76.0-82.0) |" in out and "cannot run: ImportError" in out
    assert "| CoRa recommended W4 | eager | 1 | 1.0 | 1.5 | 1.50 |" in out
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "ranks.png").stat().st_size > 0
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert "| 4.0 | joint | 3.990 |" in (tmp_path / "RESULTS.md").read_text()


def test_frontier_differences_are_paired_and_called_only_outside_their_interval():
    import torch

    from benchmarks import frontier

    g = torch.Generator().manual_seed(0)
    base = {"hit": (torch.rand(700, generator=g) < 0.8).float(), "agree": (torch.rand(2000, generator=g) < 0.6).float(),
            "kl": torch.rand(2000, generator=g)}
    same = frontier.versus(base, base)
    assert all(v == [0.0, 0.0, 0.0] for v in same.values())
    # a uniform 2% KL cut is invisible next to the per-image spread unpaired, but certain paired
    better = frontier.versus({**base, "kl": base["kl"] * 0.98}, base)
    assert better["kl"][2] < 0
    mean, lo, hi = frontier.interval(base["kl"])
    assert lo < mean < hi and lo < float((base["kl"] * 0.98).mean()) < hi
    assert frontier.main_bits(3.0) == 3 and frontier.main_bits(3.25) == 4 and frontier.main_bits(2.5) == 3


def test_pareto_point_labels_avoid_each_other():
    """Three labelled points a few pixels apart: the greedy placement keeps every label box disjoint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks import report

    fig, ax = plt.subplots(figsize=(3, 3))
    points = [(2.0, 79.4), (2.02, 79.3), (2.04, 79.35)]
    ax.plot(*zip(*points), "o")
    ax.set_xlim(1.5, 2.8)
    ax.set_ylim(64, 82)
    report.place_labels(fig, [(ax, x, y, f"W4 b=0.0{i}") for i, (x, y) in enumerate(points)])
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    plt.close(fig)
    assert len(boxes) == 3
    assert all(report.overlap_area(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_pareto_point_label_stays_inside_the_axes():
    """A point at the right edge: its label goes to the left instead of being cut off by the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks import report

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.plot([1.0, 50.0], [10.0, 55.0], "o")
    ax.set_xlim(0.5, 52.0)
    ax.set_ylim(0, 80)
    report.place_labels(fig, [(ax, 50.0, 55.0, "W4 (a long label)")])
    renderer = fig.canvas.get_renderer()
    (text,) = ax.texts
    box, frame = text.get_window_extent(renderer), ax.get_window_extent(renderer)
    plt.close(fig)
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_pareto_lines_group_rows_by_method_and_mixed_rows_by_target():
    from benchmarks import report

    assert report.plot_family("float") == "float"
    assert report.plot_family("CoRa recommended W4 b=0.02") == "CoRa recommended"
    assert report.plot_family("CoRa recommended W3 + finetune") == "CoRa recommended + finetune"
    assert report.plot_family("torchao IntxWeightOnly W4 per-channel") == "torchao IntxWeightOnly"
    assert report.plot_family("CoRa recommended W4 mixed @4.0 b=0.01") == "CoRa recommended W4 mixed @4.0"
    assert (report.plot_family("CoRa recommended heuristic-ranks W4 mixed @4.0 b=0.045")
            == "CoRa recommended heuristic-ranks W4 mixed @4.0")


def test_a_peers_longer_schedules_share_one_line_labelled_by_steps():
    from benchmarks import report

    family = report.plot_family("AIMET AdaRound (500 steps) W4")
    assert family == report.plot_family("AIMET AdaRound (1000 steps) W4") == "AIMET AdaRound W4 (steps per layer)"
    assert report.plot_family("AIMET AdaRound W4") == "AIMET AdaRound"  # its own schedule: the W3/W4/W5 line
    assert report.point_label("AIMET AdaRound (500 steps) W4", family) == "500 steps"
    assert report.point_label("CoRa recommended W3 b=0.02", "CoRa recommended") == "W3 b=0.02"
    assert report.point_label("CoRa recommended W3 + finetune", "CoRa recommended + finetune") == "W3"


def test_pareto_lines_leave_out_rows_that_failed_or_were_superseded():
    from benchmarks import report

    def row(top1, mb, **extra):
        return dict(top1=top1, artifact_bytes=int(mb * 1e6), **extra)

    results = {"_meta": {}, "float": row(79.0, 14.0), "peer W4": dict(error="ImportError"),
               "CoRa recommended W4 mixed[greedy] @4.0 b=0.01":
                   row(78.7, 1.85, superseded_by="CoRa recommended W4 mixed @4.0 b=0.01"),
               "CoRa recommended W4 mixed @4.0 b=0.01": row(79.0, 1.86), "CoRa recommended W4": row(79.4, 2.0)}
    lines = report.plot_lines(results)
    assert list(lines) == ["float", "CoRa recommended W4 mixed @4.0", "CoRa recommended"]
    assert lines["CoRa recommended W4 mixed @4.0"] == [(1.86, 79.0, "CoRa recommended W4 mixed @4.0 b=0.01")]


def test_allocation_noise_plans_come_from_the_mean_of_the_first_k_batches():
    from benchmarks import allocation_noise

    # either layer alone saves enough (need 0.2): the first batch favours "a", the mean of two or three "b"
    measured = {"start": 4.2, "saved": {"a": 0.3, "b": 0.3}, "kl": {"a": [0.1, 0.5, 0.5], "b": [0.2, 0.2, 0.2]}}
    assert allocation_noise.plans(measured, [1, 2, 3]) == {1: ("a",), 2: ("b",), 3: ("b",)}


def test_search_speed_measures_every_speed_up_in_turn(tmp_path):
    from benchmarks import search_speed
    from cora_fx.calibrate import rank_search

    out = tmp_path / "speed.json"
    search_speed.main(["--arch", "mobilenet_v2", "--batch", "2", "--size", "32", "--steps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == [v[0] for v in search_speed.VARIANTS]
    assert all(r["search_step_seconds"] > 0 and r["float_step_seconds"] > 0 for r in rows)
    assert rank_search.search_copy.__name__ == "search_copy"  # the BatchNorm switch was put back


def test_frontier_runs_merge_into_one_results_file_and_peers_are_not_paired(tmp_path, monkeypatch):
    import torch

    from benchmarks import frontier

    monkeypatch.setattr(frontier, "SAMPLES", tmp_path / "samples")
    frontier.SAMPLES.mkdir()
    g = torch.Generator().manual_seed(0)
    base = {"hit": (torch.rand(50, generator=g) < 0.8).float(), "agree": torch.ones(80),
            "kl": torch.rand(80, generator=g)}
    better = {**base, "kl": base["kl"] * 0.5}
    for key, s in (("base @4.0", base), ("joint @4.0", better), ("brevitas @4.0", base)):
        torch.save(s, frontier.sample_path(key))
    out = tmp_path / "frontier.json"
    frontier.merge(out, {"base @4.0": {"family": "base", "target_bits": 4.0, "equivalent_bits": 3.99}})
    frontier.merge(out, {"brevitas @4.0": {"family": "brevitas", "target_bits": 4.0, "equivalent_bits": 4.12}})
    merged = frontier.merge(out, {"joint @4.0": {"family": "joint", "target_bits": 4.0, "equivalent_bits": 4.0},
                                  "joint @4.25": {"family": "joint", "target_bits": 4.25, "equivalent_bits": 4.25}})
    assert set(merged) == {"base @4.0", "brevitas @4.0", "joint @4.0", "joint @4.25"}
    assert json.loads(out.read_text()) == merged
    assert merged["joint @4.0"]["vs_base"]["kl"][2] < 0 and "vs_base" not in merged["brevitas @4.0"]
    # a peer is compared with the joint row at no more bits than its own: here joint @4.0, whose KL is half
    peer = merged["brevitas @4.0"]["vs_joint"]
    assert peer["row"] == "joint @4.0" and peer["kl"][1] > 0 and peer["hit"] == [0.0, 0.0, 0.0]
    assert frontier.eight_bit_layers(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3, groups=4),
                                                         torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(8, 2, 1))) \
        == ["0", "1", "3"]
