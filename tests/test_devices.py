"""Devices: every step computes where the model is, keeps its tensors there and does not wait on a GPU per step.

The CPU tests check the pieces that make this true on any machine (sync-free min-max quantization, the hard rank
read from shapes, files written from a CPU copy, ``--device`` refused where there is no GPU, the search's
autocast). The tests marked ``cuda`` run the whole workflow on a GPU and compare it with the CPU; they skip where
torch sees no CUDA device (``benchmarks/gpu_check.py`` runs them on a GPU machine).
"""
from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch.ao.quantization.observer import MinMaxObserver

from cora_fx import (
    CoRaConfig,
    convert_cora,
    export_onnx,
    load,
    prepare_cora,
    quantize_cora,
    save,
    search_ranks,
    summary,
)
from cora_fx.calibrate.activations import calibrate_activations
from cora_fx.calibrate.batchnorm import correct_batchnorm
from cora_fx.calibrate.finetune import finetune
from cora_fx.calibrate.rounding import calibrate_rounding
from cora_fx.devices import host_copy, model_device, on_device
from cora_fx.prepare import adapters, set_ranks
from cora_fx.quant.uniform import minmax_quantize
from tests.conftest import SmallNet, random_batches

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.unit
@pytest.mark.parametrize("values", [torch.randn(7, 5), torch.rand(3, 4) + 0.5, -torch.rand(6) - 0.1, torch.zeros(4),
                                    torch.tensor([1e-12, 2e-12])])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_quantize_matches_torch_ao_min_max_observer(values, bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    observer = MinMaxObserver(dtype=torch.int8, qscheme=torch.per_tensor_affine, quant_min=lo, quant_max=hi)
    observer(values)
    scale, zero_point = observer.calculate_qparams()
    qw = minmax_quantize(values, bits)
    assert qw.scale.shape == () and qw.zero_point.shape == ()
    assert float(qw.scale) == float(scale) and float(qw.zero_point) == float(zero_point)
    expected = torch.clamp(torch.round(values / scale) + zero_point, lo, hi).to(torch.int8)
    assert torch.equal(qw.codes, expected)


@pytest.mark.unit
def test_the_cached_rank_is_the_hard_rank(small_net):
    prepared = prepare_cora(small_net, CoRaConfig(), progress=False)
    layers = adapters(prepared)
    for name, adapter in layers.items():
        for rank in {0, 1, adapter.max_rank}:
            adapter.set_hard_rank(rank)
            assert adapter.cached_rank == int(adapter.hard_rank) == rank, name


@pytest.mark.unit
def test_host_copy_is_the_model_itself_on_the_cpu_and_moves_inputs(small_net):
    inputs = (torch.randn(1, 3, 8, 8), {"scale": torch.ones(1), "name": "x"})
    model, moved = host_copy(small_net, inputs)
    assert model is small_net and moved[1]["name"] == "x" and torch.equal(moved[0], inputs[0])
    assert model_device(torch.nn.Identity()) == torch.device("cpu")
    assert on_device(None, torch.device("cpu")) is None


@pytest.mark.unit
@pytest.mark.skipif(CUDA, reason="checks the refusal where there is no GPU")
def test_cli_refuses_a_cuda_device_where_there_is_none(capsys):
    from cora_fx.tools.cli import main

    assert main(["evaluate", "--program", "missing.pt2", "--data", "missing", "--device", "cuda"]) != 0
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    assert main(["evaluate", "--program", "missing.pt2", "--data", "missing", "--device", "gpu0"]) != 0
    assert "not a torch device" in capsys.readouterr().err


@pytest.mark.unit
@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_a_search_step_reads_no_value_back_from_its_device(monkeypatch, small_net, loss):
    """On the CPU too: no ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()`` or ``.cpu()`` inside a step, once the
    value checks are in their GPU mode (the first batch only)."""
    from cora_fx.calibrate import distillation, objective, rank_search

    def first_only(seen, path, ref, check):
        if path not in seen:
            seen[path] = check()
        return seen[path]

    monkeypatch.setattr(distillation, "checked_once", first_only)
    monkeypatch.setattr(objective, "checked_once", first_only)
    reads, inside = [], [False]
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            # torch.optim's Adam keeps its step count on the host by design (no read from a GPU): not counted
            if inside[0] and "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    step = rank_search._RankSearch._step

    def watched(self, *args, **kwargs):
        inside[0] = self.done > 0  # the first step runs the value checks
        try:
            return step(self, *args, **kwargs)
        finally:
            inside[0] = False
    monkeypatch.setattr(rank_search._RankSearch, "_step", watched)
    prepared = prepare_cora(small_net, CoRaConfig().replace(loss=loss), progress=False)
    result = search_ranks(prepared, random_batches(2), iterations=6, progress=False)
    assert result.iterations == 6 and len(result.history.loss) == 6
    assert reads == []


def test_search_under_bfloat16_autocast_keeps_float32_ranks_near_the_float32_search(small_net):
    batches = random_batches(2)
    config = CoRaConfig().replace(iterations=30, loss="kl", budget=0.2)
    ranks = {}
    for precision in (None, "bfloat16"):
        prepared = prepare_cora(small_net, config, progress=False)
        result = search_ranks(prepared, batches, progress=False, autocast=precision)
        assert result.budget <= 0.2 + 1e-9
        assert all(a.rank.dtype == torch.float32 for a in adapters(prepared).values())
        ranks[precision] = result.ranks
    assert ranks[None].keys() == ranks["bfloat16"].keys()
    assert sum(abs(ranks[None][n] - ranks["bfloat16"][n]) for n in ranks[None]) <= 0.25 * sum(ranks[None].values())


def test_load_moves_a_program_to_the_device_asked_for(small_net, tmp_path):
    prepared = prepare_cora(small_net, CoRaConfig(), progress=False)
    set_ranks(prepared, "heuristic")
    quantized = convert_cora(prepared)
    x = torch.randn(2, 3, 16, 16)
    path = save(quantized, tmp_path / "m.pt2", (x,))
    restored = load(path, device="cpu")
    torch.testing.assert_close(restored(x), quantized(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="load: device='gpu0' is not a torch device"):
        load(path, device="gpu0")


# ------------------------------------------------------------------ on a GPU

def _workflow(model: torch.nn.Module, device: str, batches: list) -> dict:
    """Every public step on ``device``: the prepared model after each, the converted model and its outputs."""
    config = CoRaConfig.recommended(4, act_bits=8, target_bits=None).replace(iterations=12, finetune_iterations=3,
                                                                             rounding_batches=2)
    model = copy.deepcopy(model).to(device)
    x = batches[0][0][:2]
    prepared = prepare_cora(model, config, example_inputs=(x,), progress=False)
    devices = [_devices(prepared)]
    set_ranks(prepared, "heuristic")
    calibrate_activations(prepared, batches, progress=False)
    devices.append(_devices(prepared))
    calibrate_rounding(prepared, batches, progress=False)
    devices.append(_devices(prepared))
    result = search_ranks(prepared, batches, progress=False)
    devices.append(_devices(prepared))
    correct_batchnorm(prepared, batches)
    finetune(prepared, batches, progress=False)
    devices.append(_devices(prepared))
    converted = convert_cora(prepared)
    devices.append(_devices(converted))
    codes = {n: a.quantized.weight_codes.cpu() for n, a in prepared.named_modules() if hasattr(a, "quantized")}
    with torch.no_grad():
        output = converted(x.to(device)).cpu()
    return dict(ranks=result.ranks, codes=codes, output=output, devices=devices, converted=converted, x=x)


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


def test_every_step_keeps_a_cpu_model_on_the_cpu(tmp_path):
    """The CPU half of the GPU comparison below, so that a machine without a GPU runs its code too."""
    run = _workflow(SmallNet().eval(), "cpu", random_batches(3))
    assert all(found == {"cpu"} for found in run["devices"])
    assert run["ranks"] and torch.isfinite(run["output"]).all()
    pytest.importorskip("onnxscript")
    assert export_onnx(run["converted"], (run["x"],), tmp_path / "cpu.onnx").is_file()


@pytest.fixture
def full_precision_gpu():
    """TF32 off (torch turns it on for cuDNN convolutions by default): GPU and CPU then round alike."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@needs_cuda
def test_the_workflow_on_a_gpu_stays_there_and_matches_the_cpu(tmp_path, full_precision_gpu):
    torch.manual_seed(0)
    net = SmallNet().eval()
    batches = random_batches(3)
    on_cpu = _workflow(net, "cpu", batches)
    on_gpu = _workflow(net, "cuda", batches)
    assert all(found == {"cuda"} for found in on_gpu["devices"]), on_gpu["devices"]
    assert on_gpu["ranks"] == on_cpu["ranks"]
    for name, codes in on_cpu["codes"].items():
        same = (on_gpu["codes"][name] == codes).float().mean()
        assert same >= 0.99, f"{name}: {float(same):.4f} of the codes equal"
    scale = float(on_cpu["output"].abs().max())
    torch.testing.assert_close(on_gpu["output"], on_cpu["output"], atol=0.05 * scale, rtol=0)
    path = save(on_gpu["converted"], tmp_path / "gpu.pt2", (on_gpu["x"].cuda(),))
    restored = load(path)
    assert _devices(restored) == {"cpu"}  # written from a CPU copy: the file loads on any machine
    torch.testing.assert_close(restored(on_gpu["x"]), on_gpu["output"], atol=1e-4 * scale, rtol=0)
    assert _devices(load(path, device="cuda")) == {"cuda"}
    pytest.importorskip("onnxruntime")
    assert export_onnx(on_gpu["converted"], (on_gpu["x"].cuda(),), tmp_path / "gpu.onnx").is_file()


@pytest.mark.cuda
@needs_cuda
def test_a_planned_bit_width_on_a_gpu():
    """recommended(2) plans bits and ranks jointly (the sensitivities of `plan_target`) before the other steps."""
    net = SmallNet().eval().cuda()
    batches = random_batches(3)
    quantized = quantize_cora(net, batches, CoRaConfig.recommended(2), progress=False)
    assert _devices(quantized) == {"cuda"}
    assert 2.0 <= summary(quantized).equivalent_bits < 8.0
    assert quantized(batches[0][0].cuda()).device.type == "cuda"


@pytest.mark.cuda
@needs_cuda
def test_search_steps_do_not_wait_on_the_gpu():
    """A run of 12 search steps makes no more synchronizing calls than a run of 2: none per step."""
    net = SmallNet().eval().cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in random_batches(2)]  # no host-to-device copy per step
    prepared = prepare_cora(net, CoRaConfig().replace(loss="kl"), progress=False)

    def syncs(iterations: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                search_ranks(prepared, batches, iterations=iterations, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(2)  # warm-up
    assert syncs(12) == syncs(2)


@pytest.mark.cuda
@needs_cuda
def test_cli_quantizes_on_a_gpu(tmp_path):
    from PIL import Image

    from cora_fx.tools.cli import main

    rows = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(path)
        rows.append(f"{path},{i % 2}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "m.pt2"
    assert main(["quantize", "--model", "torchvision:mobilenet_v2", "--calib", str(tmp_path / "data.csv"),
                 "--image-size", "32", "--resize", "32", "--batch-size", "4", "--iterations", "3",
                 "--device", "cuda", "--out", str(out), "--quiet"]) == 0
    assert main(["evaluate", "--program", str(out), "--data", str(tmp_path / "data.csv"), "--image-size", "32",
                 "--resize", "32", "--device", "cuda", "--quiet"]) == 0
