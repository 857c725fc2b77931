"""How each step's cost grows with the model: time and memory against a float training step of the same net.

    python -m benchmarks.scaling --batch 16 --threads 2
    python -m benchmarks.scaling --batch 32 --threads 2
    python -m benchmarks.scaling --pipeline resnet50 convnext_tiny --batch 32 --iterations 10

Table mode: for each torchvision architecture (random weights: their shapes are what matters) and the
``recommended(4, act_bits=8)`` config (so that every step runs: activation ranges, GPTQ rounding, the search,
BatchNorm correction, convert, ONNX export), each step is timed and its peak memory (resident set size above
what the process held when the step began) is sampled. Both are divided by one float forward+backward step of
the same net at the same batch (all weights trainable), measured in the same process before and after the
architecture; one table per batch size. The search step is the steady state: (12 steps - 2 steps) / 10 on two
cycled batches whose float outputs are cached after the first pass; its setup (the search's copy of the model,
the first two steps) is a row of its own; ``search_step_bf16`` is the same step under bfloat16 autocast
(``search.autocast``). Results go to benchmarks/results/scaling.json.

Pipeline mode (``--pipeline``): `quantize_cora` with ``recommended(4)`` (weight-only) on each named
architecture in a child process of its own, ``--batch`` images per batch, with ``--iterations`` search steps
(the search's memory does not grow with its step count: its history holds scalars), and reports the child's
peak resident memory, its major page faults and the swap in use before and after.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import torchvision

from cora_fx import CoRaConfig, convert_cora, prepare_cora, quantize_cora, search_ranks, summary
from cora_fx.calibrate.activations import calibrate_activations
from cora_fx.calibrate.batchnorm import correct_batchnorm
from cora_fx.calibrate.rounding import calibrate_rounding

ARCHITECTURES = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "resnet18", "resnet50",
                 "convnext_tiny"]
OUT = Path(__file__).parent / "results" / "scaling.json"
PAGE = resource.getpagesize()


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next step's baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@contextmanager
def peak_memory(record: dict, key: str, interval: float = 0.002) -> Iterator[None]:
    """Sample the resident set size while the block runs; ``record[key]`` = peak minus the start (bytes)."""
    release_memory()
    start = rss_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        record[key] = max(peak[0], rss_bytes()) - start


def timed(fn: Callable[[], Any], seconds: dict, memory: dict, key: str) -> Any:
    """Run ``fn`` once: its wall time into ``seconds[key]``, its peak extra memory into ``memory[key]``."""
    with peak_memory(memory, key):
        start = time.perf_counter()
        out = fn()
        seconds[key] = time.perf_counter() - start
    return out


def float_step(model: torch.nn.Module, batch: tuple, steps: int, memory: dict) -> float:
    """Mean seconds of a float forward+backward step (all weights trainable); its peak extra memory."""
    def run() -> None:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(batch[0]), batch[1]).backward()
        model.zero_grad(set_to_none=True)

    seconds: dict = {}
    timed(run, seconds, memory, "float_step")
    return seconds["float_step"] / steps


def random_batches(count: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, 1000, (batch,), generator=generator)) for _ in range(count)]


def gflops(model: torch.nn.Module, size: int) -> float:
    """Multiply-adds x 2 of one image, from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def measure_steps(model: torch.nn.Module, calib: list, export_dir: Path) -> tuple[dict, dict, dict]:
    """Seconds and peak extra bytes of every step of recommended(4, act_bits=8) on ``model``; extras."""
    seconds: dict = {}
    memory: dict = {}
    cfg = CoRaConfig.recommended(4, act_bits=8, target_bits=None)
    prepared = timed(lambda: prepare_cora(model, cfg, progress=False), seconds, memory, "prepare")
    timed(lambda: calibrate_activations(prepared, calib, progress=False), seconds, memory, "activations")
    timed(lambda: calibrate_rounding(prepared, calib, progress=False), seconds, memory, "rounding")
    two = calib[:2]
    timed(lambda: search_ranks(prepared, two, iterations=2, progress=False), seconds, memory, "search_setup")
    timed(lambda: search_ranks(prepared, two, iterations=12, progress=False), seconds, memory, "search_12")
    seconds["search_step"] = (seconds.pop("search_12") - seconds["search_setup"]) / 10
    memory["search_step"] = memory.pop("search_12")
    seconds["search_setup"] -= 2 * seconds["search_step"]
    for steps in (2, 12):  # the same under bfloat16 autocast (search.autocast)
        timed(lambda: search_ranks(prepared, two, iterations=steps, progress=False, autocast="bfloat16"), seconds,
              memory, f"bf16_{steps}")
    seconds["search_step_bf16"] = (seconds.pop("bf16_12") - seconds.pop("bf16_2")) / 10
    memory["search_step_bf16"] = memory.pop("bf16_12")
    memory.pop("bf16_2")
    timed(lambda: correct_batchnorm(prepared, calib), seconds, memory, "batchnorm")
    converted = timed(lambda: convert_cora(prepared), seconds, memory, "convert")
    extras = dict(equivalent_bits=summary(converted).equivalent_bits)
    try:
        from cora_fx import export_onnx

        path = export_dir / "model.onnx"
        timed(lambda: export_onnx(converted, (calib[0][0][:1],), path), seconds, memory, "export")
        extras["onnx_bytes"] = path.stat().st_size
    except Exception as err:  # noqa: BLE001 - a failed export is a result of its own
        extras["export_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return seconds, memory, extras


def table_row(arch: str, batch: int, size: int, calib_batches: int, float_steps: int) -> dict:
    """One architecture: the float step before and after, every step's ratios."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    calib = random_batches(calib_batches, batch, size)
    float_memory: dict = {}
    float_step(model, calib[0], 1, {})  # warm-up
    before = float_step(model, calib[0], float_steps, float_memory)
    with tempfile.TemporaryDirectory() as tmp:
        seconds, memory, extras = measure_steps(model, calib, Path(tmp))
    after = float_step(model, calib[0], float_steps, float_memory)
    step_s = (before + after) / 2
    step_bytes = float_memory["float_step"]
    params = sum(p.numel() for p in model.parameters())
    return dict(arch=arch, params_m=params / 1e6, gflops=gflops(model, size), float_step_seconds=step_s,
                float_step_bytes=step_bytes, seconds=seconds, bytes=memory,
                time_ratio={k: v / step_s for k, v in seconds.items()},
                memory_ratio={k: v / max(step_bytes, 1) for k, v in memory.items()}, **extras)


def pipeline_child(arch: str, batch: int, size: int, calib_batches: int, iterations: int) -> dict:
    """recommended(4) through `quantize_cora` in this process; its peak memory and time."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    calib = random_batches(calib_batches, batch, size)
    cfg = CoRaConfig.recommended(4, target_bits=None).replace(iterations=iterations)
    start = time.perf_counter()
    converted = quantize_cora(model, calib, cfg, progress=False)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return dict(arch=arch, batch=batch, calib_batches=calib_batches, iterations=iterations, seconds=seconds,
                peak_rss_bytes=usage.ru_maxrss * 1024, major_faults=usage.ru_majflt,
                equivalent_bits=summary(converted).equivalent_bits)


def swap_used() -> int:
    """Bytes of swap in use on the machine (0 where there is no swap)."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda key: int(info.get(key, "0 kB").split()[0])  # noqa: E731
    return (kib("SwapTotal") - kib("SwapFree")) * 1024


def run_pipeline_mode(args: argparse.Namespace, results: dict) -> None:
    for arch in args.pipeline:
        swap_before = swap_used()
        command = [sys.executable, "-m", "benchmarks.scaling", "--child", arch, "--batch", str(args.batch),
                   "--size", str(args.size), "--calib-batches", str(args.calib_batches),
                   "--iterations", str(args.iterations), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(swap_before_bytes=swap_before, swap_after_bytes=swap_used(),
                   total_memory_bytes=int(Path("/proc/meminfo").read_text().split()[1]) * 1024)
        results.setdefault("pipeline", {})[arch] = row
        print(f"{arch}: recommended(4), batch {args.batch}, {args.iterations} search steps: {row['seconds']:.0f} s, "
              f"peak {row['peak_rss_bytes'] / 2**30:.2f} GiB, major faults {row['major_faults']}, "
              f"swap {swap_before} -> {row['swap_after_bytes']} bytes", flush=True)


def _migrated(results: dict) -> dict:
    """A results file with one ``table`` (one batch size) as ``tables`` keyed by batch size."""
    if "table" in results:
        meta = results.pop("table_meta")
        results.setdefault("tables", {})[str(meta["batch"])] = results.pop("table")
        results.setdefault("tables_meta", {})[str(meta["batch"])] = meta
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=ARCHITECTURES)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--float-steps", type=int, default=2, help="float steps per block (one block before and "
                                                                   "one after each architecture)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipeline", nargs="*", default=None, help="architectures for the pipeline mode")
    parser.add_argument("--iterations", type=int, default=10, help="search steps in the pipeline mode")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(pipeline_child(args.child, args.batch, args.size, args.calib_batches, args.iterations)))
        return 0
    out = Path(args.out)
    results = _migrated(json.loads(out.read_text())) if out.is_file() else {}
    if args.pipeline is not None:
        run_pipeline_mode(args, results)
    else:
        rows = results.setdefault("tables", {}).setdefault(str(args.batch), {})
        results.setdefault("tables_meta", {})[str(args.batch)] = dict(batch=args.batch, size=args.size,
                                                                       calib_batches=args.calib_batches)
        for arch in args.arch:
            row = table_row(arch, args.batch, args.size, args.calib_batches, args.float_steps)
            rows[arch] = row
            print(f"{arch}: float step {row['float_step_seconds']:.2f} s / {row['float_step_bytes'] / 2**20:.0f} MiB; "
                  + ", ".join(f"{k} {row['time_ratio'][k]:.2f}x/{row['memory_ratio'].get(k, 0):.2f}m"
                              for k in row["seconds"]) + f" {row.get('export_error', '')}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    command = "python -m benchmarks.scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = results.get("_meta", {})
    commands = [c for c in meta.get("commands", []) if c != command] + [command]
    results["_meta"] = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                            torch=torch.__version__, commands=commands)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
