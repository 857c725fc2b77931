"""Labelled image folders for calibration and evaluation: ``path,label[,split]`` CSVs or ImageFolders."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch.utils.data import Dataset

from cora_fx.devices import model_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Environment variable naming the shared data folder (see ../shared/data/README.md).
DATA_ENV = "CORA_FX_DATA"


def default_data_dir() -> Path:
    """``$CORA_FX_DATA``, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def imagenet_transform(image_size: int = 224, resize: int = 256) -> Callable:
    """Resize(resize), CenterCrop(image_size), ToTensor, Normalize(ImageNet mean/std)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class CsvImageDataset(Dataset):
    """Images listed in a CSV of ``path,label`` rows (optional ``split`` column), paths relative to the CSV.

    A header row is optional; a row with a missing file name or a non-integer label raises
    ValueError naming the CSV line.
    """

    def __init__(self, csv_path: Union[str, Path], split: Optional[str] = None,
                 transform: Optional[Callable] = None, limit: Optional[int] = None) -> None:
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"no such CSV file: {self.csv_path}")
        self.root = self.csv_path.parent
        self.transform = transform or imagenet_transform()
        self.items: list[tuple[Path, int]] = []
        with self.csv_path.open(newline="") as handle:
            for line_no, row in enumerate(csv.reader(handle), start=1):
                if not row or (line_no == 1 and row[0].strip().lower() == "path"):
                    continue
                if len(row) < 2 or not row[0].strip():
                    raise ValueError(f"{self.csv_path}:{line_no}: expected 'path,label[,split]', got {row!r}")
                try:
                    label = int(row[1])
                except ValueError:
                    raise ValueError(f"{self.csv_path}:{line_no}: label {row[1]!r} is not an integer") from None
                if split is not None and (len(row) < 3 or row[2].strip() != split):
                    continue
                self.items.append((self.root / row[0].strip(), label))
        if limit is not None:
            self.items = self.items[:limit]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


@torch.no_grad()
def evaluate_topk(model: torch.nn.Module, loader, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracies (in %) of ``model`` on ``loader``'s ``(images, labels)`` batches."""
    correct = {k: 0 for k in ks}
    total = 0
    model.eval()
    device = model_device(model)
    for images, labels in loader:
        top = model(images.to(device)).topk(max(ks), dim=1).indices.cpu()
        hits = top == labels.unsqueeze(1)
        for k in ks:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        total += labels.numel()
    return {k: 100.0 * correct[k] / max(total, 1) for k in ks}
