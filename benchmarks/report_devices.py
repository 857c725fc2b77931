"""RESULTS.md sections on cost and devices: how each step scales with the model (scaling.json, scaling.png),
the search under bfloat16 autocast (mixed_precision.json) and the GPU check (gpu_check.json)."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

#: The steps of the scaling table, in pipeline order, with their column names.
STEPS = {"prepare": "prep.", "activations": "act.", "rounding": "GPTQ", "search_setup": "setup",
         "search_step": "step", "search_step_bf16": "bf16 step", "batchnorm": "BN", "convert": "conv.",
         "export": "ONNX"}


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _wrap(text: str) -> str:
    return textwrap.fill(text, 118, break_on_hyphens=False)


def _commands(meta: dict) -> str:
    return "```bash\n" + "\n".join(meta.get("commands", [])) + "\n```"


def scaling_section(folder: Path, plots: str = "results") -> list[str]:
    """Per architecture and step: time (one table per batch size) and peak extra memory (the largest batch) as
    multiples of one float training step."""
    data = _load(folder, "scaling.json")
    if not data or not data.get("tables"):
        return []
    tables, metas = data["tables"], data["tables_meta"]
    batches = sorted(tables, key=int)
    size, calib = metas[batches[0]]["size"], metas[batches[0]]["calib_batches"]
    parts = ["## Scaling: cost per step as the model grows", _wrap(
        f"Each step of `recommended(4, act_bits=8)` (so that every step runs) on torchvision architectures with "
        f"random weights, {size} px images, {calib} calibration batches, at batch " + " and ".join(batches) + "; "
        "time and peak memory (resident set above what the process held when the step began, sampled every 2 ms) "
        "as multiples of one float forward+backward step of the same net at the same batch, measured in the same "
        "process. The search step is the steady state of 12 steps on two cycled batches. GFLOPs per image count a "
        "multiply-add as two. " + str(data.get("_meta", {}).get("machine", "")) + "."),
        _commands(data.get("_meta", {})), _wrap(
        "prep. `prepare_cora`; act. `calibrate_activations`; GPTQ `calibrate_rounding`; setup the search's copy "
        "of the model and first steps; step one search step (float32), bf16 step one under bfloat16 autocast; BN "
        "`correct_batchnorm` (- where the net has no BatchNorm); conv. `convert_cora`; ONNX `export_onnx`.")]
    for batch in batches:
        parts += [f"Time of each step / float training step, batch {batch}:",
                  _ratio_table(tables[batch], "time_ratio", "float s", lambda r: f"{r['float_step_seconds']:.2f}")]
    parts.append(_wrap("A search step at or below 0.6 float training steps: " + "; ".join(
        f"batch {b}, float32: {_within(tables[b], 'search_step')}, bfloat16: {_within(tables[b], 'search_step_bf16')}"
        for b in batches) + "."))
    parts += [f"Peak extra memory of each step / the float training step's, batch {batches[-1]}:",
              _ratio_table(tables[batches[-1]], "memory_ratio", "float MiB",
                           lambda r: f"{r['float_step_bytes'] / 2**20:.0f}")]
    pipeline = data.get("pipeline")
    if pipeline:
        parts += [_wrap("`recommended(4)` (weight-only) end to end through `quantize_cora`, each in a process of its "
                        "own: peak resident memory of the process, major page faults and the machine's swap in use "
                        "before and after."), _pipeline_table(pipeline)]
    parts.append(f"![time per step against GFLOPs]({plots}/scaling.png)")
    return parts


def _within(rows: dict, step: str, limit: float = 0.6) -> str:
    """The architectures whose ``step`` costs at most ``limit`` float training steps ("none" if none does)."""
    names = [arch for arch, r in rows.items() if r["time_ratio"].get(step, math.inf) <= limit]
    return ", ".join(names) if names else "none"


def _ran(row: dict, step: str) -> bool:
    """False for a step that had nothing to do (under a hundredth of a training step: `correct_batchnorm` on a
    network without BatchNorm)."""
    return row["time_ratio"].get(step, 0.0) >= 0.01


def _ratio_table(rows: dict, field: str, unit: str, reference) -> str:
    """One row per architecture (by GFLOPs): its size, the float step, and ``field`` of every step."""
    lines = [f"| architecture | params M | GFLOPs | {unit} | " + " | ".join(STEPS.values()) + " |",
             "|---|" + "---:|" * (3 + len(STEPS))]
    for arch, r in sorted(rows.items(), key=lambda kv: kv[1]["gflops"]):
        cells = [f"{r[field][k]:.2f}" if _ran(r, k) else "-" for k in STEPS]
        lines.append(f"| {arch} | {r['params_m']:.1f} | {r['gflops']:.2f} | {reference(r)} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def _pipeline_table(pipeline: dict) -> str:
    lines = ["| architecture | batch | calib. batches | search steps | s | peak GiB | major faults | "
             "swap MiB before/after | RAM GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, r in pipeline.items():
        lines.append(f"| {arch} | {r['batch']} | {r['calib_batches']} | {r['iterations']} | {r['seconds']:.0f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['major_faults']} | {r['swap_before_bytes'] / 2**20:.0f} "
                     f"/ {r['swap_after_bytes'] / 2**20:.0f} | {r['total_memory_bytes'] / 2**30:.1f} |")
    return "\n".join(lines)


def scaling_plot(folder: Path) -> Path | None:
    """scaling.png: each step's time ratio against the architecture's GFLOPs (log x)."""
    data = _load(folder, "scaling.json")
    if not data or not data.get("tables"):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(data["tables"], key=int)
    rows = sorted(data["tables"][batch].items(), key=lambda kv: kv[1]["gflops"])
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 5.5))
    x = list(range(len(rows)))  # by GFLOPs: MobileNetV3 0.4 ... ConvNeXt-Tiny 8.9 per image
    for index, (key, label) in enumerate(STEPS.items()):
        for ax, field in ((time_ax, "time_ratio"), (memory_ax, "memory_ratio")):
            points = [(i, r[field][key]) for i, (_, r) in zip(x, rows) if _ran(r, key)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^vD<>ph"[index % 9], label=label)
    for ax, name in ((time_ax, "time"), (memory_ax, "peak extra memory")):
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{arch}\n{r['gflops']:.2f} GFLOPs" for arch, r in rows], rotation=45, ha="right",
                      fontsize=7)
        ax.set_ylabel(f"{name} / float training step (log)")
        ax.grid(True, which="both", alpha=0.3)
    time_ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    time_ax.axhline(0.6, color="purple", linestyle=":", linewidth=0.8, label="0.6: the search step's target")
    memory_ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    handles, labels = time_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=9, fontsize=8)
    fig.suptitle(f"Cost of each step as a multiple of one float training step of the same net (batch {batch}; "
                 "architectures by GFLOPs)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = folder / "scaling.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def mixed_precision_section(folder: Path) -> list[str]:
    """recommended(4) with the search in float32 and under bfloat16 autocast, paired image by image."""
    data = _load(folder, "mixed_precision.json")
    if not data:
        return []
    meta = data["_meta"]
    lines = ["| search | search s | s per step / float step | top-1 % (95% CI) | tiny64 agr. % | tiny64 KL | bits |",
             "|---|---|---|---|---|---|---|"]
    for name in ("float32", "bfloat16"):
        r = data[name]
        lines.append(f"| {name} | {r['search_seconds']:.0f} | {r['search_step_ratio']:.2f} | {r['top1']:.2f} "
                     f"({r['top1_lo']:.1f}-{r['top1_hi']:.1f}) | {r['tiny_agreement']:.2f} | {r['tiny_kl']:.4f} | "
                     f"{r['equivalent_bits']:.3f} |")
    vs, ranks = data["bfloat16"]["vs_float32"], data["bfloat16"]["ranks_vs_float32"]
    paired = "; ".join(f"{label} {v[0]:+.{d}f} ({v[1]:+.{d}f}, {v[2]:+.{d}f})"
                       for label, key, d in (("top-1", "hit", 2), ("tiny64 agreement", "agree", 2),
                                             ("tiny64 KL", "kl", 4)) for v in [vs[key]])
    return ["## Mixed precision: the search under bfloat16 autocast", _wrap(
        "`recommended(4)` on MobileNetV2 (genuine weights, the 1,600 calibration images at batch 32) with the "
        "search as it ships (float32) and with `search.autocast=\"bfloat16\"` (the teacher's and the soft model's "
        "forward passes under `torch.autocast`; ranks and their gradients float32). " + meta["machine"] + "."),
        "```bash\n" + meta["command"] + "\n```", "\n".join(lines), _wrap(
        f"bfloat16 minus float32, image by image (95% paired bootstrap intervals): {paired}. Ranks: "
        f"{ranks['equal']} of {ranks['layers']} layers equal, the largest difference {ranks['max_abs']} "
        f"(sums {ranks['sum_float32']} and {ranks['sum_bfloat16']}).")]


def gpu_section(folder: Path) -> list[str]:
    """The GPU check's figures, with the device they ran on (gpu_check.json), when it has run."""
    data = _load(folder, "gpu_check.json")
    if not data or data.get("device") is None or "cuda" not in data.get("command", "") + str(data.get("tests")):
        return []
    lines = ["| architecture | float step ms | search | total s | prepare | rounding | search | convert | "
             "peak GPU GiB | ratio to 250 float steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, row in data.items():
        if not isinstance(row, dict) or "float32" not in row:
            continue
        for name in ("float32", "bfloat16"):
            r, t = row[name], row[name]["seconds"]
            lines.append(f"| {arch} | {1000 * row['float_step_seconds']:.0f} | {name} | {t['total']:.0f} | "
                         f"{t.get('prepare_cora', 0):.1f} | {t.get('calibrate_rounding', 0):.1f} | "
                         f"{t.get('search_ranks', 0):.1f} | {t.get('convert_cora', 0):.1f} | "
                         f"{(r['peak_gpu_bytes'] or 0) / 2**30:.2f} | {r['ratio_to_250_float_steps']:.2f} |")
    return ["## On a GPU", _wrap(f"`recommended(4)` on {data['device']} (torch {data['torch']}), random weights and "
                                 "images; the `cuda` tests' summary: " + " ".join(data.get("tests", {}).get(
                                     "summary", [])[-1:]) + "."),
            "```bash\n" + data["command"] + "\n```", "\n".join(lines)]
