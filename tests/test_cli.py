"""The `cora-fx` commands, run for real in a subprocess on a tiny model and a few written images."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO

TINY_MODEL = '''
import torch
from torch import nn


def make(num_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )
'''


def run(*args: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, extra_path) if p)
    return subprocess.run([sys.executable, "-m", "cora_fx", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cora-fx: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """tinymodel.py + weights, 12 images as an ImageFolder and as a path,label,split CSV."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    (root / "tinymodel.py").write_text(TINY_MODEL)
    sys.path.insert(0, str(root))
    try:
        import tinymodel

        torch.save(tinymodel.make().state_dict(), root / "tiny.pth")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("tinymodel", None)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        label = i % 3
        folder = root / "images" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        rows.append((f"images/class{label}/img{i}.png", label, "calib" if i < 8 else "eval"))
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *rows])
    return root


def test_quantize_summary_evaluate_end_to_end(workspace):
    out = workspace / "out" / "tiny.pt2"
    proc = run("quantize", "--model", "tinymodel:make", "--weights", "tiny.pth", "--calib", "labels.csv",
               "--split", "calib", "--bits", "4", "--target-bits", "none", "--budget", "0.1", "--iterations", "4",
               "--finetune-iterations", "2",
               "--batch-size", "4", "--image-size", "16", "--resize", "18", "--out", str(out), "--quiet",
               cwd=workspace, extra_path=workspace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress bars
    assert "equivalent bits" in proc.stdout and "wrote" in proc.stdout
    for suffix in (".pt2", ".json", "_ranks.png", "_search.png"):
        path = out.with_name("tiny" + suffix) if suffix.startswith("_") else out.with_suffix(suffix)
        assert path.is_file() and path.stat().st_size > 0, path
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["artifact_bytes"] == out.stat().st_size
    assert report["search"]["iterations"] == 4 and report["budget"] <= 0.1 + 1e-9
    assert report["finetune"]["iterations"] == 2
    assert [layer["name"] for layer in report["layers"]] == ["0", "2", "4", "8"]

    proc = run("summary", str(out), cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert "conv params" in proc.stdout and f"{out.stat().st_size:,} bytes on disk" in proc.stdout
    proc = run("summary", str(out), "--json", cwd=workspace)
    assert json.loads(proc.stdout)["conv_params"] == report["conv_params"]

    proc = run("evaluate", "--program", str(out), "--data", "images", "--model", "tinymodel:make",
               "--weights", "tiny.pth", "--image-size", "16", "--resize", "18", "--batch-size", "5",
               cwd=workspace, extra_path=workspace)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("program  top-1") and lines[1].startswith("float    top-1") and "(12 images)" in lines[0]
    # 3 classes: top-k is reported with k = 3 and is always 100 %
    assert all("top-3 100.00%" in line for line in lines)


def test_quantize_with_heuristic_ranks_on_an_imagefolder(workspace):
    out = workspace / "heur.pt2"
    proc = run("quantize", "--model", "tinymodel:make", "--calib", "images", "--bits", "3", "--per-channel", "--ranks",
               "heuristic", "--target-bits", "none", "--image-size", "16", "--resize", "16", "--out", str(out),
               "--quiet", cwd=workspace, extra_path=workspace)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["ranks_from"] == "heuristic" and all(layer["bits"] == 3 for layer in report["layers"])
    assert out.with_name("heur_ranks.png").is_file() and not out.with_name("heur_search.png").exists()


@pytest.mark.parametrize("allocation", ["bits", "joint"])
def test_quantize_with_a_target_bit_width_mixes_precision(workspace, allocation):
    out = workspace / "mixed.pt2"
    proc = run("quantize", "--model", "tinymodel:make", "--calib", "labels.csv", "--split", "calib", "--bits", "4",
               "--budget", "0.05", "--target-bits", "4.0", "--iterations", "2", "--batch-size", "4",
               "--allocation", allocation, "--image-size", "16", "--resize", "16", "--out", str(out), "--quiet",
               cwd=workspace, extra_path=workspace)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["layer_bits"] and set(report["layer_bits"].values()) == {3}
    assert {layer["name"]: layer["bits"] for layer in report["layers"]
            if layer["name"] in report["layer_bits"]} == report["layer_bits"]
    assert report["equivalent_bits"] <= 4.0 + 1e-9
    assert report["config"]["search"]["allocation"] == allocation
    assert report["ranks_from"] == ("joint allocation" if allocation == "joint" else "search")



def test_evaluate_scores_the_exported_onnx_file_like_the_program(workspace):
    pytest.importorskip("onnx", reason="the [onnx] extra (onnx, onnxscript) is not installed")
    pytest.importorskip("onnxscript", reason="the [onnx] extra (onnx, onnxscript) is not installed")
    pytest.importorskip("onnxruntime", reason="onnxruntime (the [onnx] extra) is not installed")
    out = workspace / "ship.pt2"
    proc = run("quantize", "--model", "tinymodel:make", "--weights", "tiny.pth", "--calib", "labels.csv", "--split",
               "calib", "--bits", "4", "--ranks", "heuristic", "--target-bits", "none", "--image-size", "16",
               "--resize", "18", "--dynamic-size", "--out", str(out), "--quiet", cwd=workspace, extra_path=workspace)
    assert proc.returncode == 0, proc.stderr
    proc = run("export", str(out), "--quiet", cwd=workspace)  # fixed 16 x 16: the size the program was traced at
    assert proc.returncode == 0, proc.stderr
    data = ["--data", "images", "--resize", "18", "--batch-size", "5"]
    scores = {}
    for program in ("ship.pt2", "ship.onnx"):
        proc = run("evaluate", "--program", program, *data, "--image-size", "16", "--quiet", cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        scores[program] = proc.stdout.strip()
    assert scores["ship.onnx"] == scores["ship.pt2"]  # weight-only: the same top-1 and top-3, image for image
    assert scores["ship.onnx"].startswith("program  top-1") and "(12 images)" in scores["ship.onnx"]
    proc = run("evaluate", "--program", "ship.pt2", *data, "--image-size", "12", "--quiet", cwd=workspace)
    assert proc.returncode == 0, proc.stderr  # quantized with --dynamic-size: any image size
    proc = run("evaluate", "--program", "ship.onnx", *data, "--image-size", "12", "--quiet", cwd=workspace)
    assert_one_line_error(proc, "ship.onnx", "16x16", "--image-size 16")


QUANTIZE = ["quantize", "--calib", "labels.csv", "--image-size", "16", "--resize", "16", "--iterations", "1",
            "--finetune-iterations", "1", "--quiet"]


@pytest.mark.parametrize("case,args,fragments", [
    ("missing weights", QUANTIZE + ["--model", "tinymodel:make", "--weights", "nope.pth"], ["--weights", "nope.pth"]),
    ("unknown torchvision model", QUANTIZE + ["--model", "torchvision:resnet19"], ["resnet19"]),
    ("unknown module", QUANTIZE + ["--model", "nomodule_here:make"], ["nomodule_here"]),
    ("bits out of range", QUANTIZE + ["--model", "tinymodel:make", "--bits", "9"], ["--bits", "2..8"]),
    ("unreachable target bits", QUANTIZE + ["--model", "tinymodel:make", "--target-bits", "1.0"],
     ["--target-bits", "target_bits=1.0"]),
    ("missing calib", ["quantize", "--model", "tinymodel:make", "--calib", "nope.csv"], ["--calib", "nope.csv"]),
    ("bad csv row", ["quantize", "--model", "tinymodel:make", "--calib", "bad.csv"], ["bad.csv:3", "not an integer"]),
    ("weights of another model", QUANTIZE + ["--model", "torchvision:resnet18", "--weights", "tiny.pth"],
     ["--weights", "does not fit"]),
    ("missing artifact", ["summary", "nope.pt2"], ["nope.pt2"]),
    ("truncated artifact", ["summary", "truncated.pt2"], ["truncated.pt2", "truncated or corrupted"]),
    ("no command", [], ["command"]),
])
def test_user_mistakes_give_one_line_and_nonzero_exit(workspace, case, args, fragments):
    (workspace / "bad.csv").write_text("path,label\nimages/class0/img0.png,0\nimages/class1/img1.png,one\n")
    (workspace / "truncated.pt2").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    proc = run(*args, cwd=workspace, extra_path=workspace)
    assert_one_line_error(proc, *fragments)


def test_quantize_defaults_to_the_recommended_config_and_options_override_it():
    import argparse

    from cora_fx import CoRaConfig
    from cora_fx.allocation.bits import MIXED_BUDGET
    from cora_fx.tools.cli import quantize_config

    def args(**kw):
        base = dict(config="recommended", bits=4, seed=0, adapter_bits=None, budget=None, clipping=None, depthwise=None,
                    loss=None, iterations=None, per_channel=False, per_tensor=False,
                    finetune_iterations=None, adapter_form=None, target_bits=None, allocation=None,
                    reconstruct_iterations=None)
        return argparse.Namespace(**{**base, **kw})

    assert quantize_config(args()) == CoRaConfig.recommended(4)
    assert quantize_config(args(config="paper", bits=3)) == CoRaConfig().replace(bits=3)
    tuned = quantize_config(args(budget=0.1, per_tensor=True, clipping="normal", iterations=7))
    assert (tuned.search.budget, tuned.quant.granularity, tuned.quant.clipping, tuned.search.iterations) == (
        0.1, "per_tensor", "normal", 7)
    assert tuned.rounding.method == "gptq"  # the rest stays recommended
    # joint: one bit budget, no b to set
    assert quantize_config(args(target_bits=4.0)) == CoRaConfig.recommended(4, target_bits=4.0)
    separate = quantize_config(args(target_bits=4.0, allocation="bits"))
    assert separate == CoRaConfig.recommended(4, budget=MIXED_BUDGET, allocation="bits", target_bits=4.0)
    assert quantize_config(args(target_bits=4.0, budget=0.05)).search.budget == 0.05  # an explicit --budget wins
    # the paper's settings stay
    assert quantize_config(args(config="paper", target_bits=4.0)) == CoRaConfig().replace(target_bits=4.0)
    # --bits 2: recommended's W2 is a planned target; --target-bits replaces it, --allocation bits takes b = 0.02
    assert quantize_config(args(bits=2)) == CoRaConfig.recommended(2)
    assert quantize_config(args(target_bits="none")) == CoRaConfig.recommended(4, target_bits=None)  # uniform
    assert quantize_config(args(bits=2, target_bits=2.25)).search.target_bits == 2.25
    assert quantize_config(args(bits=2, allocation="bits")).search.budget == MIXED_BUDGET
    plain = quantize_config(args(finetune_iterations=0, adapter_form="parallel"))
    assert (plain.refine.finetune_iterations, plain.adapter.form) == (0, "parallel")
    assert quantize_config(args(reconstruct_iterations=50)).reconstruct.iterations == 50
