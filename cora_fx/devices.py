"""Where a model's tensors live, and moving example inputs or a converted model there (docs/method.md section 16).

Every step computes on the device of the model it is given (CPU or GPU); calibration batches are moved to it
batch by batch. Files are written from the host: `save` and `export_onnx` work on a CPU copy of a model that
sits on a GPU, so a file calibrated on a GPU loads anywhere.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils._pytree import tree_map


def model_device(module: torch.nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for a module without tensors)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def on_device(values: Any, device: torch.device) -> Any:
    """``values`` (a tensor, or tuples, lists and dicts of them) with every tensor moved to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, values)


def host_copy(model: torch.nn.Module, example_inputs: Any) -> tuple[torch.nn.Module, Any]:
    """``model`` and ``example_inputs`` on the CPU: the model itself when it is there already, else a copy."""
    cpu = torch.device("cpu")
    if all(t.device == cpu for t in list(model.parameters()) + list(model.buffers())):
        return model, on_device(example_inputs, cpu)
    return copy.deepcopy(model).to(cpu), on_device(example_inputs, cpu)
