"""cora_fx.save / load: exact round trip, plain torch.export.load, damaged files, low-bit size on disk."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
import torchvision

import cora_fx
from cora_fx import CoRaConfig, CoRaLoadError, convert_cora, prepare_cora, set_ranks, summary
from cora_fx.io.serialization import SUMMARY_FILE, SUMMARY_META_KEY

from .conftest import SmallNet

X = torch.randn(2, 3, 16, 16)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    prepared = prepare_cora(SmallNet().eval(), CoRaConfig().replace(bits=3, depthwise="residual"), example_inputs=(X,))
    set_ranks(prepared, "heuristic")
    quantized = convert_cora(prepared)
    path = tmp_path_factory.mktemp("ser") / "small.pt2"
    cora_fx.save(quantized, path, (X,))
    return quantized, path


def rewrite_archive(src, dst, edit) -> None:
    """Copy a zip archive entry by entry, passing each (name, bytes) through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))


def test_round_trip_is_exact(artifact):
    quantized, path = artifact
    loaded = cora_fx.load(path)
    x = torch.randn(5, 3, 16, 16)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    original = dict(quantized.named_buffers())
    stored = dict(loaded.named_buffers())
    assert original["cora_packed_words"].dtype == torch.uint8
    for name in ["cora_packed_words"] + [n for n in original if n.endswith(("_scale", "_zero_point"))]:
        assert torch.equal(stored[name], original[name]), name
    report = loaded.meta[SUMMARY_META_KEY]
    assert report == summary(quantized)
    assert cora_fx.read_summary(path) == report
    assert loaded.eval() is loaded
    with pytest.raises(cora_fx.CoRaError, match="inference-only"):
        loaded.train()


def test_plain_torch_export_load_without_cora_fx(artifact):
    _, path = artifact
    code = (
        "import sys; sys.modules['cora_fx'] = None\n"  # make `import cora_fx` fail
        "import torch\n"
        "extra = {'cora_fx/summary.json': ''}\n"
        f"ep = torch.export.load({str(path)!r}, extra_files=extra)\n"
        "y = ep.module()(torch.zeros(3, 3, 16, 16))\n"
        "print(tuple(y.shape), len(extra['cora_fx/summary.json']) > 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(3, 10) True"


def test_truncated_and_tampered_files_are_refused(artifact, tmp_path):
    _, path = artifact
    data = path.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(CoRaLoadError, match="truncated or corrupted"):
        cora_fx.load(tmp_path / "cut.pt2")
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/weights/weight_" in i.filename), key=lambda i: i.compress_size)
        name = info.filename  # the largest tensor: a flip inside its deflate stream changes the data
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header: 30 bytes
    flipped = bytearray(data)
    flipped[start + info.compress_size // 2] ^= 0x0F  # stored bytes changed in place: inflate or CRC fails
    (tmp_path / "flip.pt2").write_bytes(bytes(flipped))
    with pytest.raises(CoRaLoadError, match="checksum|corrupted"):
        cora_fx.load(tmp_path / "flip.pt2")

    def change_weight(entry: str, blob: bytes) -> bytes:  # a consistent zip whose tensors were edited
        return bytes([blob[0] ^ 0x01]) + blob[1:] if entry == name else blob
    rewrite_archive(path, tmp_path / "edited.pt2", change_weight)
    with pytest.raises(CoRaLoadError):
        cora_fx.load(tmp_path / "edited.pt2")


def test_archives_that_need_pickle_are_refused(artifact, tmp_path):
    _, path = artifact

    def mark_pickled(entry: str, blob: bytes) -> bytes:
        if entry.endswith("_weights_config.json"):
            config = json.loads(blob)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        return blob
    rewrite_archive(path, tmp_path / "pickled.pt2", mark_pickled)
    with pytest.raises(CoRaLoadError, match="pickle"):
        cora_fx.load(tmp_path / "pickled.pt2")


def test_compressed_and_uncompressed_files_load_the_same_program(artifact, tmp_path):
    quantized, compressed = artifact
    stored = cora_fx.save(quantized, tmp_path / compressed.name, (X,), compress=False)
    with zipfile.ZipFile(compressed) as a, zipfile.ZipFile(stored) as b:
        assert {i.compress_type for i in a.infolist()} == {zipfile.ZIP_DEFLATED}
        assert {i.compress_type for i in b.infolist()} == {zipfile.ZIP_STORED}
        assert sorted(a.namelist()) == sorted(b.namelist())
    assert compressed.stat().st_size < 0.6 * stored.stat().st_size
    for path in (compressed, stored):
        assert torch.equal(torch.export.load(path).module()(X), cora_fx.load(path)(X))
    assert [p.name for p in tmp_path.iterdir()] == [compressed.name]  # no temporary left behind


def test_a_plain_exported_program_loads_without_summary(tmp_path):
    program = torch.export.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),))
    torch.export.save(program, tmp_path / "plain.pt2")
    assert cora_fx.load(tmp_path / "plain.pt2").meta[SUMMARY_META_KEY] is None
    with pytest.raises(CoRaLoadError, match="no cora_fx summary"):
        cora_fx.read_summary(tmp_path / "plain.pt2")
    with pytest.raises(TypeError, match="example_inputs"):
        cora_fx.save(convert_cora(set_ranks_and_return(prepare_cora(SmallNet().eval()))), tmp_path / "x.pt2")


def set_ranks_and_return(prepared):
    set_ranks(prepared, "heuristic")
    return prepared


def test_resnet18_w4_artifact_is_below_15_percent_of_the_float_checkpoint(tmp_path):
    model = torchvision.models.resnet18(num_classes=1000).eval()
    x = torch.randn(2, 3, 32, 32)
    prepared = prepare_cora(model, CoRaConfig().replace(bits=4), example_inputs=(x,))
    set_ranks(prepared, "heuristic")
    path = cora_fx.save(convert_cora(prepared), tmp_path / "resnet18_w4.pt2", (x,))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    ratio = path.stat().st_size / buffer.tell()
    print(f"resnet18 W4 artifact {path.stat().st_size:,} bytes / float state dict {buffer.tell():,} bytes "
          f"= {ratio:.3f}")
    assert ratio < 0.15
    with zipfile.ZipFile(path) as archive:
        assert any(n.endswith(SUMMARY_FILE) for n in archive.namelist())


def test_an_example_batch_of_one_still_exports_a_dynamic_batch(artifact, tmp_path):
    quantized, _ = artifact
    path = cora_fx.save(quantized, tmp_path / "one.pt2", (X[:1],))
    loaded = cora_fx.load(path)
    for batch in (1, 3):
        x = torch.randn(batch, *X.shape[1:])
        with torch.no_grad():
            assert torch.equal(loaded(x), quantized(x))
    fixed = cora_fx.load(cora_fx.save(quantized, tmp_path / "fixed.pt2", (X[:1],), dynamic_batch=False))
    with pytest.raises(Exception):
        fixed(torch.randn(3, *X.shape[1:]))


def test_dynamic_size_program_runs_at_other_heights_and_widths(artifact, tmp_path):
    quantized, fixed_path = artifact
    loaded = cora_fx.load(cora_fx.save(quantized, tmp_path / "any_size.pt2", (X,), dynamic_size=True))
    for shape in ((3, 3, 24, 40), (1, 3, 9, 13)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(loaded(x), quantized(x)), shape
    fixed = cora_fx.load(fixed_path)  # saved without dynamic_size: the example's height and width only
    with pytest.raises(RuntimeError, match="shape"):
        fixed(torch.randn(2, 3, 16, 24))
    with pytest.raises(ValueError, match="dynamic_size"):
        cora_fx.save(quantized, tmp_path / "thin.pt2", (torch.randn(2, 3, 1, 16),), dynamic_size=True)


class FixedSizeNet(torch.nn.Module):
    """Adds a positional bias of a fixed 16 x 16 size: torch.export must specialize the height and width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("position", torch.randn(8, 16, 16))
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.conv(x) + self.position).mean(dim=(2, 3)))


def test_a_model_that_fixes_its_size_cannot_be_saved_size_dynamic(tmp_path):
    prepared = prepare_cora(FixedSizeNet().eval(), CoRaConfig().replace(bits=4), example_inputs=(X,))
    quantized = convert_cora(set_ranks_and_return(prepared))
    path = tmp_path / "out" / "fixed_size.pt2"
    with pytest.raises(cora_fx.CoRaError, match="dynamic_size.*save without dynamic_size") as info:
        cora_fx.save(quantized, path, (X,), dynamic_size=True)
    assert info.value.__cause__ is not None
    assert not path.exists() and not any(tmp_path.rglob("*"))  # nothing written, not even the folder
    loaded = cora_fx.load(cora_fx.save(quantized, path, (X,)))  # without dynamic_size it saves
    assert torch.equal(loaded(X), quantized(X))
