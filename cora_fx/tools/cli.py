"""The ``cora-fx`` command: ``demo``, ``quantize``, ``evaluate``, ``summary`` (also ``python -m cora_fx``).

User mistakes (missing file, unknown model, bad CSV row, bits out of range, ...) end with one
line ``cora-fx: error: ...`` on stderr and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NoReturn, Optional, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from cora_fx.config import CoRaConfig

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A mistake the user can fix; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"cora-fx: error: {message} (see {self.prog} --help)\n")


def _int_in(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value
    return parse


def _positive_int(text: str) -> int:
    return _int_in(1, 1 << 30)(text)


#: ``--target-bits none``: no plan, every conv at ``--bits`` with searched ranks (the uniform recipe)
NO_TARGET = "none"


def _target_bits(text: str) -> Any:
    if text.strip().lower() == NO_TARGET:
        return NO_TARGET
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


# ---------------------------------------------------------------- building blocks
def build_model(spec: str, num_classes: Optional[int] = None) -> nn.Module:
    """``torchvision:NAME`` or ``package.module:factory`` (a callable returning an nn.Module)."""
    if ":" not in spec:
        raise UsageError(f"--model {spec!r}: expected 'torchvision:NAME' or 'package.module:factory'")
    module_name, attr = spec.split(":", 1)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if module_name == "torchvision":
        import torchvision

        if attr not in torchvision.models.list_models():
            raise UsageError(f"--model {spec!r}: unknown torchvision model '{attr}' "
                             "(see torchvision.models.list_models())")
        return torchvision.models.get_model(attr, weights=None, **kwargs)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"--model {spec!r}: cannot import '{module_name}' ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: '{module_name}' has no callable '{attr}'")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict (or a checkpoint dict holding one under 'state_dict'/'model'), weights_only."""
    if not path.is_file():
        raise UsageError(f"--weights: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"--weights {path}: not a loadable state dict "
                         f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise UsageError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise UsageError(f"--weights {path} does not fit the model: "
                         f"{lines[0] if lines else str(err).splitlines()[0]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(f"--weights {path} does not fit the model: {len(result.missing_keys)} missing keys "
                         f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:2]})")


def open_dataset(path: Path, split: Optional[str], image_size: int, resize: int, limit: Optional[int],
                 flag: str) -> Any:
    """An ImageFolder directory or a ``path,label[,split]`` CSV, with the ImageNet preprocessing."""
    from cora_fx.tools.datasets import CsvImageDataset, imagenet_transform

    transform = imagenet_transform(image_size, resize)
    if path.is_dir():
        if split is not None:
            raise UsageError(f"--split only applies to a CSV, but {flag} {path} is a directory")
        from torchvision.datasets import ImageFolder

        try:
            dataset: Any = ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as err:
            raise UsageError(f"{flag} {path}: not an ImageFolder ({err})") from None
        if limit is not None:
            dataset = torch.utils.data.Subset(
                dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit].tolist())
    elif path.is_file():
        try:
            dataset = CsvImageDataset(path, split=split, transform=transform, limit=limit)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None
    else:
        raise UsageError(f"{flag}: no such file or directory: {path}")
    if len(dataset) == 0:
        raise UsageError(f"{flag} {path}: no images" + (f" with split '{split}'" if split else ""))
    return dataset


def _loader(dataset: Any, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(0) if shuffle else None)


#: Calibration sets up to this size (as float tensors) are decoded once and kept in memory.
IN_MEMORY_BYTES = 4 << 30


def _calibration_batches(dataset: Any, batch_size: int, quiet: bool, image_values: int) -> Any:
    """The calibration batches, shuffled once: decoded into a list when they fit `IN_MEMORY_BYTES` (every
    search step then skips JPEG decoding, and the float model's outputs are computed once per batch),
    else a shuffling DataLoader (``image_values``: values per decoded image). Under ``torchrun`` each process
    takes every world-size-th image."""
    from tqdm.auto import tqdm

    from cora_fx.calibrate import distributed

    if distributed.active():
        dataset = torch.utils.data.Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = _loader(dataset, batch_size, shuffle=True)
    if len(dataset) * image_values * 4 > IN_MEMORY_BYTES:
        return loader
    return list(tqdm(loader, desc="loading calibration images", disable=not distributed.shows_progress(not quiet),
                     leave=False))


def resolve_device(text: str) -> torch.device:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (any torch device); under ``torchrun`` a bare ``cuda`` is this
    process's GPU (``LOCAL_RANK``). Refused with a clear error where torch sees no such GPU."""
    import os

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device cpu, or a torch build with CUDA on a machine with a GPU")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    if device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    torch.cuda.set_device(device)
    return device


def _first_image(dataset: Any, flag: str) -> torch.Tensor:
    try:
        return dataset[0][0]
    except (FileNotFoundError, OSError) as err:
        raise UsageError(f"{flag}: cannot read the first image ({err})") from None


class OnnxProgram(nn.Module):
    """An ONNX file run by onnxruntime (CPU, default session options), called like a loaded .pt2 program."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise UsageError(f"--program {path}: scoring an ONNX file needs onnxruntime: "
                             "pip install 'cora-fx[onnx]'") from None
        if not path.is_file():
            raise UsageError(f"--program: no such file: {path}")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for unreadable models
            raise UsageError(f"--program {path}: not a loadable ONNX model ({_first_line(err)})") from None
        self.path = path
        self.input = self.session.get_inputs()[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_size(images)
        try:
            outputs = self.session.run(None, {self.input.name: images.numpy()})
        except Exception as err:
            raise UsageError(f"--program {self.path}: onnxruntime cannot run it on a batch of shape "
                             f"{tuple(images.shape)} ({_first_line(err)})") from None
        return torch.from_numpy(outputs[0])

    def _check_size(self, images: torch.Tensor) -> None:
        """Refuse images of another height or width than the file's fixed input size."""
        fixed = list(self.input.shape[2:])  # ints, or names for symbolic dims
        given = list(images.shape[2:])
        if any(isinstance(f, int) and f != g for f, g in zip(fixed, given)):
            square = len(set(fixed)) == 1 and isinstance(fixed[0], int)
            option = f"--image-size {fixed[0]}" if square else "an --image-size that fits it"
            raise UsageError(f"--program {self.path} takes {'x'.join(map(str, fixed))} images but the data is "
                             f"cropped to {'x'.join(map(str, given))}: evaluate it with {option} (or export the "
                             "program with cora-fx export --dynamic-size)")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _open_program(path: Path, device: torch.device) -> nn.Module:
    """The program ``--program`` names: an ``.onnx`` file run by onnxruntime (on the CPU, whatever ``device``),
    else a ``.pt2`` (`cora_fx.load`) on ``device``."""
    if path.suffix.lower() == ".onnx":
        return OnnxProgram(path)
    from cora_fx.io.serialization import load

    return load(path, device=None if device.type == "cpu" else device)


def _evaluate(model: nn.Module, loader: Any, quiet: bool, desc: str) -> dict[int, float]:
    """Top-1 and top-5 (top-k with k = number of classes when there are fewer than 5)."""
    from tqdm.auto import tqdm

    from cora_fx.devices import model_device
    from cora_fx.tools.datasets import evaluate_topk

    with torch.no_grad():
        classes = model(next(iter(loader))[0].to(model_device(model))).shape[-1]
    return evaluate_topk(model, tqdm(loader, desc=desc, disable=quiet, leave=False), ks=(1, min(5, classes)))


def _write_plots(result: Any, out: Path, log: Any) -> list[Path]:
    try:
        from cora_fx.calibrate.rank_search import RankSearchResult
        from cora_fx.tools.plots import plot_ranks, plot_search

        paths = [plot_ranks(result, out.with_name(out.stem + "_ranks.png"))]
        if isinstance(result, RankSearchResult) and result.history.loss:
            paths.append(plot_search(result, out.with_name(out.stem + "_search.png")))
        return paths
    except ImportError as err:
        log(f"note: plots skipped: {err}")
        return []


# ---------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from cora_fx.tools.demo import FAST_ENV, DemoError, run_demo

    fast = args.fast or os.environ.get(FAST_ENV, "") not in ("", "0")
    try:
        run_demo(fast=fast, out_dir=Path(args.out_dir), progress=not args.quiet, retrain=args.train)
    except DemoError as err:
        raise UsageError(str(err)) from None
    return 0


def quantize_config(args: argparse.Namespace) -> "CoRaConfig":
    """``--config`` (recommended by default, or the paper's) with the options given explicitly on top;
    with ``--target-bits``, ``--allocation bits`` and no ``--budget``, recommended takes
    `allocation.bits.MIXED_BUDGET` (the joint plan has no adapter budget of its own)."""
    from cora_fx.config import CoRaConfig

    base = CoRaConfig.recommended(args.bits) if args.config == "recommended" else CoRaConfig().replace(bits=args.bits)
    changes: dict[str, Any] = {"seed": args.seed}
    for option in ("adapter_bits", "budget", "clipping", "depthwise", "loss", "iterations", "finetune_iterations",
                   "reconstruct_iterations", "adapter_form", "act_bits", "allocation", "target_bits"):
        if getattr(args, option, None) is not None:
            changes[option] = getattr(args, option)
    if changes.get("target_bits") == NO_TARGET:
        changes["target_bits"] = None
    if args.per_channel or args.per_tensor:
        changes["granularity"] = "per_channel" if args.per_channel else "per_tensor"
    joint = (getattr(args, "allocation", None) or base.search.allocation) == "joint"
    targeted = changes.get("target_bits", base.search.target_bits) is not None
    if targeted and args.budget is None and args.config == "recommended" and not joint:
        from cora_fx.allocation.bits import MIXED_BUDGET

        changes["budget"] = MIXED_BUDGET  # at a fixed bit-width, 4-bit weights are worth more than adapters
    return base.replace(**changes)


def _plan(model: nn.Module, calibration: Iterable, config: "CoRaConfig",
          progress: bool) -> tuple["CoRaConfig", Optional[dict[str, int]]]:
    """``search.target_bits`` (``--target-bits`` or the recommended config's): `plan_target`'s config with the
    planned ``layer_bits``, and the planned ranks with ``allocation="joint"`` (None: searched or ``--ranks``)."""
    from cora_fx.allocation.plan import plan_target

    try:
        return plan_target(model, calibration, config, progress=progress)
    except ValueError as err:
        raise UsageError(f"--target-bits {config.search.target_bits}: {err}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    """``cora-fx quantize``; under ``torchrun`` every process calibrates on its share and rank 0 writes."""
    from cora_fx.calibrate import distributed

    device = resolve_device(args.device)
    started = distributed.init_from_environment("nccl" if device.type == "cuda" else "gloo")
    try:
        return _quantize(args, device)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _quantize(args: argparse.Namespace, device: torch.device) -> int:
    from cora_fx.calibrate import distributed
    from cora_fx.convert import convert_cora
    from cora_fx.io.serialization import as_json, file_nbytes, save
    from cora_fx.io.summary import serialized_nbytes, summary
    from cora_fx.pipeline import run_pipeline
    from cora_fx.prepare import prepare_cora

    out = Path(args.out)
    if out.suffix != ".pt2":
        raise UsageError(f"--out {out}: the artifact must end in .pt2")
    try:
        config = quantize_config(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model = build_model(args.model, args.num_classes)
    if args.weights is not None:
        load_weights(model, Path(args.weights))
    model.eval().to(device)  # every step computes where the model is; batches follow it one at a time
    dataset = open_dataset(Path(args.calib), args.split, args.image_size, args.resize, args.calib_images, "--calib")
    image = _first_image(dataset, "--calib")
    example = (torch.stack([image, image]),)  # batch 2: the exported batch dimension stays dynamic
    calibration = _calibration_batches(dataset, args.batch_size, args.quiet, image.numel())
    ranks = "search" if args.ranks == "search" else "heuristic"
    if config.search.target_bits is not None:
        config, planned = _plan(model, calibration, config, not args.quiet)
        ranks = planned if planned is not None and args.ranks == "search" else ranks
    prepared = prepare_cora(model, config, example_inputs=example, progress=not args.quiet)
    if not hasattr(prepared, "meta") or "cora_fx" not in prepared.meta:
        raise UsageError(f"--model {args.model}: no conv or linear layer to quantize")
    quiet = args.quiet or not distributed.is_main_process()
    say = (lambda step: None) if quiet else (lambda step: print(f"cora-fx quantize: {step} ...", flush=True))
    steps = run_pipeline(prepared, calibration, ranks=ranks, progress=not args.quiet, on_step=say)
    result = steps.search
    say("convert_cora")
    quantized = convert_cora(prepared)
    if not distributed.is_main_process():
        return 0  # every process holds the same model; rank 0 writes it
    say(f"save {out}")
    save(quantized, out, example, dynamic_size=args.dynamic_size)
    report = summary(quantized)
    float_bytes = serialized_nbytes(model)
    nbytes = file_nbytes(out)
    extra: dict[str, Any] = {"artifact": str(out), "artifact_bytes": nbytes, "float_state_dict_bytes": float_bytes,
                             "model": args.model, "layer_bits": dict(config.quant.layer_bits),
                             "ranks_from": "joint allocation" if isinstance(ranks, dict) else args.ranks}
    extra["steps"] = steps.steps
    if steps.finetune is not None:
        extra["finetune"] = {"iterations": steps.finetune.iterations, "seconds": steps.finetune.seconds}
    if steps.reconstruct is not None:
        extra["reconstruct"] = {"blocks": steps.reconstruct.blocks, "kept": steps.reconstruct.kept,
                                "changed_codes": steps.reconstruct.changed_codes,
                                "seconds": steps.reconstruct.seconds}
    if result is not None:
        extra["search"] = {"iterations": result.iterations, "seconds": result.seconds,
                           "soft_budget": result.soft_budget}
    json_path = out.with_suffix(".json")
    json_path.write_text(as_json(report, **extra))
    print(report)
    print(f"wrote {out} ({nbytes:,} bytes, {100 * nbytes / float_bytes:.1f}% of the float state dict's "
          f"{float_bytes:,}) and {json_path}")
    if result is not None:
        paths = _write_plots(result, out, print)
    else:
        paths = _write_plots(report, out, print)
    if paths:
        print("plots: " + ", ".join(map(str, paths)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    program = _open_program(Path(args.program), device)
    dataset = open_dataset(Path(args.data), args.split, args.image_size, args.resize, args.limit, "--data")
    loader = _loader(dataset, args.batch_size, shuffle=False)
    scores = {"program": _evaluate(program, loader, args.quiet, "evaluating the program")}
    if args.model is not None:
        model = build_model(args.model, args.num_classes)
        if args.weights is not None:
            load_weights(model, Path(args.weights))
        scores["float"] = _evaluate(model.eval().to(device), loader, args.quiet, "evaluating the float model")
    elif args.weights is not None:
        raise UsageError("--weights needs --model to build the float model")
    for name, s in scores.items():
        top_k = max(s)
        print(f"{name:<8} top-1 {s[1]:6.2f}%  top-{top_k} {s[top_k]:6.2f}%  ({len(dataset)} images)")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cora_fx.io.serialization import file_nbytes, read_summary

    report = read_summary(args.artifact)
    if args.json:
        print(json.dumps({**report.to_dict(), "artifact_bytes": file_nbytes(args.artifact)}, indent=2))
    else:
        print(report)
        print(f"artifact {args.artifact}: {file_nbytes(args.artifact):,} bytes on disk")
    return 0


def _example_input(program: nn.Module, image_size: Optional[int]) -> torch.Tensor:
    """A zero input of the shape the saved program was exported with (batch 1; ``image_size`` overrides H, W)."""
    first = next(n for n in program.graph.nodes if n.op == "placeholder")
    value = first.meta.get("val")
    if value is None:
        raise UsageError(f"{first.name}: the program does not record its input shape")
    shape = [1] + [_traced_size(d) for d in value.shape[1:]]
    if image_size is not None:
        shape[-2:] = [image_size, image_size]
    return torch.zeros(shape, dtype=value.dtype)


def _traced_size(dim: Any) -> int:
    """A dim of a recorded input shape: its size, or for a symbolic one the size it was traced at (else 1)."""
    if isinstance(dim, int):
        return dim
    hint = getattr(getattr(dim, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def cmd_export(args: argparse.Namespace) -> int:
    from cora_fx.io.onnx_export import export_onnx
    from cora_fx.io.serialization import load

    program = load(args.program)
    example = (_example_input(program, args.image_size),)
    out = Path(args.out) if args.out else Path(args.program).with_suffix(".onnx")
    if not args.quiet:
        print(f"cora-fx export: writing {out} ...", flush=True)
    export_onnx(program, example, out, weights=args.weights, opset=args.opset, dynamic_size=args.dynamic_size,
                debug_info=args.debug_info)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, weights={args.weights}, opset {args.opset})")
    return 0


# ---------------------------------------------------------------- parser
def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", help="keep only CSV rows whose split column equals this (e.g. calib, eval)")
    p.add_argument("--image-size", type=_positive_int, default=224, help="center crop size (default 224)")
    p.add_argument("--resize", type=_positive_int, default=256,
                   help="resize of the short side before the crop (default 256)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--num-classes", type=_positive_int, help="num_classes passed to the model factory")


def build_parser() -> argparse.ArgumentParser:
    from cora_fx.config import CLIPPINGS, LOSSES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    parser = _Parser(prog="cora-fx", description="CoRa low-bit weight quantization of ConvNets (torch.fx).",
                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", parents=[common],
                          help="quantize a digit ConvNet (shipped weights) on real MNIST digits (W4/W3/W2)")
    demo.add_argument("--fast", action="store_true",
                      help="CI mode: same code, far fewer steps (also $CORA_FX_DEMO_FAST=1)")
    demo.add_argument("--out-dir", default="cora-fx-demo", help="where the plots go (default ./cora-fx-demo)")
    demo.add_argument("--train", action="store_true",
                      help="train the digit net on this CPU instead of using the shipped weights (cached in "
                           "$CORA_FX_CACHE, else ~/.cache/cora_fx); the table can then differ from one CPU to another")
    demo.set_defaults(run=cmd_demo)

    q = sub.add_parser("quantize", parents=[common], help="quantize a model, write model.pt2 + model.json + plots")
    q.add_argument("--model", required=True, help="torchvision:NAME or package.module:factory")
    q.add_argument("--weights", help="state dict of the float model (torch.save); loaded with weights_only=True")
    q.add_argument("--calib", required=True, help="calibration data: ImageFolder directory or path,label[,split] CSV")
    q.add_argument("--calib-images", type=_positive_int, help="use at most this many calibration images")
    q.add_argument("--bits", type=_int_in(2, 8), default=4,
                   help="weight bits n, 2..8 (default 4): recommended plans each conv at n or n + 1 bits for n + 0.5 "
                        "equivalent bits; Linear layers at n")
    q.add_argument("--config", choices=("recommended", "paper"), default="recommended",
                   help="base settings: CoRaConfig.recommended(bits) (default) or the paper's CoRaConfig(); "
                        "the options below override it when given")
    q.add_argument("--adapter-bits", type=_int_in(2, 8), help="adapter bits, 2..8 (default 8)")
    q.add_argument("--budget", type=_fraction, help="adapter params / conv params, in (0, 1]")
    q.add_argument("--per-channel", action="store_true", help="per-output-channel ranges")
    q.add_argument("--per-tensor", action="store_true", help="one range per tensor (the paper)")
    q.add_argument("--clipping", choices=CLIPPINGS, help="clipping range")
    q.add_argument("--depthwise", choices=("skip", "residual", "float", "int8"), help="depthwise conv policy")
    q.add_argument("--loss", choices=LOSSES, help="search loss: ce (labels) or a label-free objective: kl (class "
                   "logits), bce (sigmoid probabilities), bce_logits, mse (raw outputs)")
    q.add_argument("--iterations", type=_int_in(0, 1 << 30), help="rank search iterations (default 250)")
    q.add_argument("--finetune-iterations", type=_int_in(0, 1 << 30),
                   help="fine-tuning steps of adapters and channel scales after the ranks are set (default 0: none)")
    q.add_argument("--reconstruct-iterations", type=_int_in(0, 1 << 30),
                   help="block-wise reconstruction steps per block after the ranks are set (0: none; default: "
                        "what --config gives for --bits)")
    q.add_argument("--adapter-form", choices=("parallel", "folded"),
                   help="lowered adapter: a parallel two-conv branch (paper) or folded into the conv weight "
                        "(recommended)")
    q.add_argument("--target-bits", type=_target_bits, metavar="BITS",
                   help="the equivalent bits, adapters and 8-bit layers included, are at most BITS (e.g. --bits 4 "
                        "--target-bits 4.0: each conv at 3 or 4 bits; see --allocation); the recommended config "
                        "plans --bits + 0.5 by itself; 'none': every conv at --bits, ranks searched")
    q.add_argument("--allocation", choices=("bits", "joint"),
                   help="with --target-bits: plan every conv's bits and rank together, a rank only where it beats a "
                        "bit of precision (joint, recommended's), or demote the convs the output feels least with "
                        "the adapter budget spent in full, then search the ranks (bits, the paper's config; "
                        "recommended then takes budget 0.02 unless --budget is given)")
    q.add_argument("--act-bits", type=_int_in(2, 8),
                   help="quantize activations too (8 for integer runtimes; `cora-fx export` then writes an ONNX "
                        "file onnxruntime runs with integer convolutions); default: float activations")
    q.add_argument("--ranks", choices=("search", "heuristic"), default="search",
                   help="search the ranks or use floor(b*R)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu",
                   help="where the model calibrates: cpu (default), cuda, cuda:N; the .pt2 is written from a CPU copy")
    q.add_argument("--dynamic-size", action="store_true",
                   help="the saved program takes any input height and width (OCR, detection), not only "
                        "--image-size; fails with a clear error for a model that fixes its input size")
    q.add_argument("--out", default="model.pt2", help="artifact path (.pt2); the JSON summary and plots go beside it")
    _data_options(q)
    q.set_defaults(run=cmd_quantize)

    e = sub.add_parser("evaluate", parents=[common],
                       help="top-1/top-5 of a saved program or its ONNX file (and of the float model)")
    e.add_argument("--program", required=True,
                   help="a .pt2 written by cora-fx quantize / cora_fx.save, or an .onnx file (by its suffix; "
                        "cora-fx export), run by onnxruntime on the CPU")
    e.add_argument("--data", required=True, help="ImageFolder directory or path,label[,split] CSV")
    e.add_argument("--limit", type=_positive_int, help="evaluate at most this many images")
    e.add_argument("--model", help="also evaluate this float model (torchvision:NAME or package.module:factory)")
    e.add_argument("--weights", help="state dict of the float model")
    e.add_argument("--device", default="cpu", help="where a .pt2 program and the float model run: cpu (default), "
                                                  "cuda, cuda:N (an .onnx file runs on onnxruntime's CPU)")
    _data_options(e)
    e.set_defaults(run=cmd_evaluate)

    x = sub.add_parser("export", parents=[common], help="write a saved program as an ONNX file (integer weights)")
    x.add_argument("program", help="a .pt2 written by cora-fx quantize / cora_fx.save")
    x.add_argument("--format", choices=("onnx",), default="onnx", help="output format (default onnx)")
    x.add_argument("--out", help="output path (default: the program's path with .onnx)")
    x.add_argument("--weights", choices=("auto", "compact", "codes", "int8"), default="auto",
                   help="auto / compact: each weight at its own bit width, integer kernels in onnxruntime when "
                        "the program quantizes activations, float speed when it does not; codes: DequantizeLinear "
                        "of the codes on every run (runtimes that read 4-bit QDQ weights); int8: one int8 tensor "
                        "per layer (runtimes without 4-bit tensors)")
    x.add_argument("--opset", type=_int_in(21, 1 << 10), default=21, help="ONNX opset, >= 21 (default 21)")
    x.add_argument("--image-size", type=_positive_int,
                   help="side of the example input (default: the size the program was saved with)")
    x.add_argument("--dynamic-size", action="store_true", help="symbolic input height and width (batch always is)")
    x.add_argument("--debug-info", action="store_true",
                   help="keep torch.onnx's per-node metadata and intermediate shapes (larger file)")
    x.set_defaults(run=cmd_export)

    s = sub.add_parser("summary", parents=[common], help="per-layer table of a saved artifact")
    s.add_argument("artifact", help="a .pt2 written by cora-fx quantize / cora_fx.save")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(run=cmd_summary)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cora-fx`` console script; returns the exit code."""
    from cora_fx.errors import CoRaError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, CoRaError, OSError) as err:  # OSError: missing / unreadable files
        print(f"cora-fx: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("cora-fx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
