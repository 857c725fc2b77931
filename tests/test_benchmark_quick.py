"""The ImageNet benchmark's --quick smoke test (real weights and images; skipped without them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cora_fx.data import default_data_dir

REPO = Path(__file__).resolve().parents[1]
DATA = default_data_dir()


@pytest.mark.skipif(not (DATA / "imagenet" / "labels.csv").is_file(), reason=f"real data not found in {DATA} (set CORA_FX_DATA)")
def test_benchmark_quick_mode_runs_end_to_end(tmp_path):
    env = dict(os.environ, CORA_FX_BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "benchmarks/imagenet_bench.py", "--quick", "--peers", "", "--out", str(tmp_path)],
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
