"""Data-parallel calibration: 2 CPU processes (gloo) against one process on the same global batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cora_fx import CoRaConfig, convert_cora, prepare_cora, run_pipeline
from cora_fx.allocation import allocate_bits
from cora_fx.allocation.bits import planned_bits
from cora_fx.calibrate.distributed import shard
from tests.conftest import SmallNet, random_batches

WORLD = 2


def _config() -> CoRaConfig:
    """Every data-parallel step: GPTQ + activation SVD, the search, BatchNorm correction, fine-tuning (and,
    before them, `allocate_bits`)."""
    return CoRaConfig.recommended(4, target_bits=None).replace(rounding_batches=2, iterations=4, bn_correction=2,
                                             finetune_iterations=3, budget=0.2)


def _quantize(batches: list) -> tuple[dict, dict, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = SmallNet().eval()
    start = planned_bits(prepare_cora(model, _config(), progress=False), {}, _config().search.budget)
    plan = allocate_bits(model, batches, _config(), start - 0.5, max_batches=2, progress=False)
    prepared = prepare_cora(model, _config())
    result = run_pipeline(prepared, batches, progress=False)
    converted = convert_cora(prepared)
    probe = random_batches(1, batch=4)[0][0]
    with torch.no_grad():
        output = converted(probe)
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    return result.search.ranks, state, output, plan


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ranks, state, output, plan = _quantize(shard(random_batches(8)))
        torch.save({"ranks": ranks, "state": state, "output": output, "plan": plan}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _joined(batches: list) -> list:
    """The global batches of WORLD processes at step t: the batches tW .. tW + W - 1 joined."""
    return [(torch.cat([b[0] for b in batches[i:i + WORLD]]), torch.cat([b[1] for b in batches[i:i + WORLD]]))
            for i in range(0, len(batches), WORLD)]


def test_two_processes_equal_one_process_on_the_joined_batches(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # every process ends with the same bit plan, ranks and bit-identical converted weights
    assert runs[0]["plan"] == runs[1]["plan"] and runs[0]["plan"]
    assert runs[0]["ranks"] == runs[1]["ranks"]
    for key, value in runs[0]["state"].items():
        assert torch.equal(value, runs[1]["state"][key]), key
    # and with what one process computes on the same global batches, within float reduction tolerance
    ranks, state, output, plan = _quantize(_joined(random_batches(8)))
    assert runs[0]["plan"] == plan
    assert runs[0]["ranks"] == ranks
    codes = [k for k, v in state.items() if not v.is_floating_point()]
    assert codes
    differing = sum(int((state[k] != runs[0]["state"][k]).sum()) for k in codes)
    assert differing <= 1e-3 * sum(state[k].numel() for k in codes)
    torch.testing.assert_close(runs[0]["output"], output, rtol=2e-3, atol=2e-3)


def test_shard_takes_every_world_size_th_batch_without_a_process_group():
    batches = list(range(5))
    assert shard(batches) == batches  # one process: everything


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun's rendezvous on localhost")
def test_cli_quantize_under_torchrun_writes_files_on_rank_zero_only(tmp_path):
    from PIL import Image

    rows = []
    for i in range(8):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(path)
        rows.append(f"{path},{i % 2}")
    csv = tmp_path / "calib.csv"
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "q.pt2"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "cora_fx", "quantize", "--model", "tests.conftest:SmallNet", "--calib", str(csv),
               "--image-size", "16", "--resize", "16", "--batch-size", "2", "--iterations", "2", "--quiet",
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
