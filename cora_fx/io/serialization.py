"""`save` / `load`: a converted model as a ``torch.export`` program (``.pt2``) plus its summary.

The file is what ``torch.export.save`` writes, by default with its zip entries deflated (`save`),
so plain ``torch.export.load`` reads it without cora_fx. cora_fx adds one extra file inside the archive,
``cora_fx/summary.json``: the `CoRaSummary` (lost by torch.export, which drops ``gm.meta``) with the
`CoRaConfig` that made the model (``CoRaConfig.from_dict(read_summary(path).config)``) and a SHA-256 digest of every
stored tensor, checked on `load` so a modified or truncated file is refused with a clear error.
`load` refuses archives that would need pickle to load (only the tensor payload format is
accepted) and forces ``weights_only`` loading while torch reads the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import types
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.fx as fx

from cora_fx.calibrate.activations import quantized_decomposed
from cora_fx.devices import host_copy
from cora_fx.errors import CoRaError, CoRaLoadError
from cora_fx.graph.capture import dynamic_shapes
from cora_fx.io.summary import CoRaSummary, LayerInfo, summary
from cora_fx.state import CONVERTED, get_state

PathLike = Union[str, os.PathLike]
SUMMARY_FILE = "cora_fx/summary.json"
FORMAT = "cora_fx/1"
#: Key of the `CoRaSummary` in the ``meta`` of a module returned by `load`.
SUMMARY_META_KEY = "cora_fx_summary"


def export_converted(quantized: fx.GraphModule, example_inputs: tuple, dynamic_batch: bool = True, *,
                     dynamic_size: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a converted model; dim 0 of every input is dynamic when asked
    (example inputs of batch 1 then work too: they are traced as a batch of 2), and with ``dynamic_size``
    dims 2.. (an image's height and width) too (`cora_fx.graph.capture.dynamic_shapes`)."""
    get_state(quantized, CONVERTED, "quantized")
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise TypeError("example_inputs must be a non-empty tuple of inputs, e.g. (x,)")
    example_inputs, dynamic = dynamic_shapes(example_inputs, dynamic_batch, dynamic_size)
    try:
        with torch.no_grad():
            return torch.export.export(quantized.eval(), example_inputs, dynamic_shapes=dynamic)
    except Exception as err:
        fixed = _fixed_sizes(err) if dynamic_size else []
        if not fixed:
            raise
        raise CoRaError(f"dynamic_size=True: the model fixes its input size (torch.export specializes "
                        f"{', '.join(fixed)}, e.g. for a layer or tensor of a fixed height or width); save without "
                        "dynamic_size (the program then takes the example inputs' size only) or make the model "
                        "size-generic") from err


def _fixed_sizes(err: Exception) -> list[str]:
    """The input dims other than the batch that a torch.export constraint violation names (e.g.
    ``L['x'].size()[2]``); [] for any other error."""
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    violation = isinstance(err, ConstraintViolationError) or (
        isinstance(err, UserError) and err.error_type is UserErrorType.CONSTRAINT_VIOLATION)
    named = re.match(r"\s*Constraints violated \((.*)\)!", str(err)) if violation else None
    return [dim for dim in named.group(1).split(", ") if dim != "batch"] if named else []


def tensors_digest(program: torch.export.ExportedProgram) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the program's weights and constants."""
    h = hashlib.sha256()
    items = list(program.state_dict.items()) + [(k, v) for k, v in program.constants.items()
                                                if isinstance(v, torch.Tensor)]
    for name, tensor in sorted(items, key=lambda kv: kv[0]):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _deflate(src: Path, dst: Path) -> None:
    """Copy the zip archive ``src`` to ``dst`` with every entry deflate-compressed.

    torch's archive reader (miniz) inflates such entries, so plain ``torch.export.load`` still
    reads the file; the graph JSON shrinks ~10x and packed low-bit codes by their entropy.
    """
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w") as out:
        for info in archive.infolist():
            out.writestr(info, archive.read(info.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def save(quantized: fx.GraphModule, path: PathLike, example_inputs: Optional[tuple] = None, *,
         dynamic_batch: bool = True, dynamic_size: bool = False, compress: bool = True) -> Path:
    """Export the converted model on ``example_inputs`` and write it with ``torch.export.save``.

    The summary and a digest of the stored tensors go inside the archive. The example inputs
    themselves are not stored (they would cost more than the 4-bit weights). ``dynamic_batch``
    (default): the program takes any batch size. ``dynamic_size``: it takes any size of the dims after
    the second too (an image's height and width, for OCR or detection); a model that fixes them raises
    `CoRaError`. With ``compress`` (default) the zip entries are deflated (`_deflate`); ``compress=False``
    writes exactly what ``torch.export.save`` writes (stored entries, memory-mappable). The file appears
    at ``path`` only once complete. Returns the path.
    """
    if example_inputs is None:
        raise TypeError("cora_fx.save needs example_inputs, e.g. save(model, path, (torch.randn(1, 3, 224, 224),))")
    report = summary(quantized)
    quantized, example_inputs = host_copy(quantized, example_inputs)  # a file that loads on any machine
    program = export_converted(quantized, example_inputs, dynamic_batch, dynamic_size=dynamic_size)
    program._example_inputs = None  # not needed to run the program; would dominate the file size
    payload = {"format": FORMAT, "summary": report.to_dict(), "weights_sha256": tensors_digest(program)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # same file name: same archive folder
        staged = Path(tmp) / path.name
        torch.export.save(program, staged, extra_files={SUMMARY_FILE: json.dumps(payload)})
        if compress:
            deflated = staged.with_name(staged.name + ".deflated")
            _deflate(staged, deflated)
            staged = deflated
        os.replace(staged, path)
    return path


def summary_from_dict(data: dict) -> CoRaSummary:
    """Rebuild a `CoRaSummary` from its ``to_dict()`` (JSON) form."""
    fields = dict(data)
    fields["layers"] = [LayerInfo(**{**layer, "weight_shape": tuple(layer["weight_shape"])})
                        for layer in data["layers"]]
    return CoRaSummary(**fields)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` inside the block use ``weights_only=True`` (torch's own switch)."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _check_archive(path: Path) -> None:
    """Refuse archives that are not zip files or whose payloads need pickle to load."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise CoRaLoadError(f"{path}: corrupted archive (checksum error in {bad})")
            for name in archive.namelist():
                if name.endswith("_weights_config.json") or name.endswith("_constants_config.json"):
                    config = json.loads(archive.read(name)).get("config", {})
                    for fqn, meta in config.items():
                        if (meta.get("use_pickle")
                                or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_"))):
                            raise CoRaLoadError(f"{path}: entry '{fqn}' would need pickle to load; "
                                                "refusing to unpickle")
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CoRaLoadError(f"{path}: not a readable .pt2 archive (truncated or corrupted: {err})") from None


def _read(path: PathLike) -> tuple[torch.export.ExportedProgram, Optional[dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    _check_archive(path)
    quantized_decomposed()  # registers the activation quantize / dequantize ops a program may hold
    extra = {SUMMARY_FILE: ""}
    try:
        with _weights_only_loads():
            program = torch.export.load(path, extra_files=extra)
    except CoRaError:
        raise
    except Exception as err:  # torch raises many types for damaged archives
        raise CoRaLoadError(f"{path}: cannot be loaded as an exported program ({type(err).__name__}: {err})") from None
    if not extra[SUMMARY_FILE]:
        return program, None
    try:
        payload = json.loads(extra[SUMMARY_FILE])
    except ValueError:
        raise CoRaLoadError(f"{path}: {SUMMARY_FILE} is not valid JSON (file modified?)") from None
    if payload.get("format") != FORMAT:
        raise CoRaLoadError(f"{path}: unknown cora_fx format {payload.get('format')!r} (expected {FORMAT})")
    if payload.get("weights_sha256") != tensors_digest(program):
        raise CoRaLoadError(f"{path}: stored weights do not match their recorded digest (file modified or damaged)")
    return program, payload


def load_program(path: PathLike) -> torch.export.ExportedProgram:
    """The verified `ExportedProgram` of a file written by `save`."""
    return _read(path)[0]


def read_summary(path: PathLike) -> CoRaSummary:
    """The `CoRaSummary` stored in a file written by `save` (the tensors are verified too)."""
    _, payload = _read(path)
    if payload is None:
        raise CoRaLoadError(f"{path}: no cora_fx summary inside (not written by cora_fx.save)")
    return summary_from_dict(payload["summary"])


def load(path: PathLike, device: Union[str, torch.device, None] = None) -> torch.nn.Module:
    """Load a file written by `save`: a runnable module with the same integer codes and outputs.

    The module is ``ExportedProgram.module()``; its ``meta["cora_fx_summary"]`` holds the
    `CoRaSummary` (``None`` for a .pt2 that cora_fx did not write). It was exported in eval
    mode: ``eval()`` is a no-op, ``train()`` raises. `save` writes CPU tensors; ``device`` (e.g. ``"cuda"``)
    moves the program there (``torch.export.passes.move_to_device_pass``: its weights and the devices its graph
    names).
    """
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"load: device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    program, payload = _read(path)
    if device is not None:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    module = program.module()
    module.train = types.MethodType(_inference_only, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(lambda self: _inference_only(self, False), module)  # type: ignore[method-assign]
    module.meta[SUMMARY_META_KEY] = summary_from_dict(payload["summary"]) if payload else None
    return module


def _inference_only(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    if mode:
        raise CoRaError("a loaded cora_fx program is inference-only (exported in eval mode); train() is not supported")
    return module


def file_nbytes(path: PathLike) -> int:
    """Size of a saved artifact on disk."""
    return Path(path).stat().st_size


def as_json(report: CoRaSummary, **extra: Any) -> str:
    """The summary as indented JSON, with ``extra`` top-level fields (e.g. file sizes)."""
    return json.dumps({**report.to_dict(), **extra}, indent=2)
