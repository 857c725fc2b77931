"""Shared pieces of the benchmarks: cached ImageNet tensors, evaluation, bootstrap intervals, timing."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from cora_fx.tools.datasets import IMAGENET_MEAN, IMAGENET_STD, CsvImageDataset, default_data_dir

CACHE = Path(os.environ.get("CORA_FX_BENCH_CACHE", Path.home() / ".cache" / "cora_fx" / "bench"))


def _uint8_transform(image_size: int, resize: int) -> Callable:
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.PILToTensor()])


def load_split(csv_path: Path, split: Optional[str], image_size: int = 224, resize: int = 256,
               limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N x 3 x S x S, int64 labels), decoded once and cached on disk."""
    key = hashlib.sha1(f"{Path(csv_path).resolve()}|{split}|{image_size}|{resize}|{limit}".encode()).hexdigest()[:16]
    cache = CACHE / f"{key}.pt"
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
        return data["images"], data["labels"]
    dataset = CsvImageDataset(csv_path, split=split, transform=_uint8_transform(image_size, resize), limit=limit)
    loader = DataLoader(dataset, batch_size=64, num_workers=0)
    images, labels = zip(*[(x, y) for x, y in loader])
    out = torch.cat(images), torch.cat(labels)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"images": out[0], "labels": out[1]}, cache)
    return out


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() - _MEAN) / _STD


def batches(images: torch.Tensor, labels: torch.Tensor,
            batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized float batches (a list, so the rank search can cycle over it)."""
    return [(normalize(images[i:i + batch_size]), labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]


class LazyBatches:
    """Re-iterable normalized batches that are built on the fly (low memory)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            yield normalize(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


@torch.no_grad()
def predict(model: Callable, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """Top-5 class indices per image."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(model(normalize(images[i:i + batch_size])).topk(5, dim=1).indices)
    return torch.cat(out)


def agreement(model: Callable, float_top1: torch.Tensor, images: torch.Tensor) -> float:
    """Top-1 agreement (%) of ``model`` with the float model's top-1 classes ``float_top1``."""
    return 100.0 * float((predict(model, images)[:, 0] == float_top1).float().mean())


def topk_with_ci(top5: torch.Tensor, labels: torch.Tensor, rounds: int = 1000, seed: int = 0) -> dict[str, float]:
    """Top-1/top-5 in % with 95% bootstrap intervals over images."""
    hit1 = (top5[:, 0] == labels).float()
    hit5 = (top5 == labels.unsqueeze(1)).any(dim=1).float()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(labels), (rounds, len(labels)), generator=g)
    out = {}
    for name, hits in (("top1", hit1), ("top5", hit5)):
        boots = hits[idx].mean(dim=1).sort().values
        out[name] = 100 * float(hits.mean())
        out[f"{name}_lo"] = 100 * float(boots[int(0.025 * rounds)])
        out[f"{name}_hi"] = 100 * float(boots[int(0.975 * rounds) - 1])
    return out


def data_paths(data: Optional[str]) -> tuple[Path, Path]:
    root = Path(data) if data else default_data_dir()
    return root / "imagenet" / "labels.csv", root / "imagenet" / "tiny64_labels.csv"


#: the shared ImageNet checkpoint of torchvision's MobileNetV2, in ``weights/`` beside the images' folder
MOBILENET_V2_WEIGHTS = "mobilenet_v2-b0353104.pth"


def mobilenet_v2(labels_csv: Path, weights: str | Path | None = None, arch: str = "mobilenet_v2") -> torch.nn.Module:
    """torchvision's MobileNetV2 with the shared ImageNet weights (``weights/`` beside the images' folder), in eval.

    ``weights`` loads another checkpoint instead and ``arch`` names the torchvision model it is for (the
    ``--weights`` and ``--arch`` of imagenet_bench and latency).
    """
    import torchvision

    path = Path(weights) if weights else labels_csv.parents[1] / "weights" / MOBILENET_V2_WEIGHTS
    model = getattr(torchvision.models, arch)()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def uniform(bits: int, **changes: Any) -> Any:
    """The uniform recipe: `CoRaConfig.recommended` with every conv at ``bits`` and its ranks searched under the adapter
    budget (``target_bits=None``), no reconstruction: as the benchmarks that time or compare the search measure it."""
    from cora_fx import CoRaConfig

    return CoRaConfig.recommended(bits, **{"target_bits": None, "reconstruct_iterations": 0, **changes})
