"""Calibration batches checked against the model before any long step (docs/method.md s.7 and s.12).

The first batch is compared with the example inputs `prepare_cora` saw (number of dimensions, channels in
dimension 1), run once through the prepared model, and its output through the config's objective, so a batch
without its batch dimension, with the wrong channels, or an objective that does not fit the outputs fails
at once with one message naming the batch, the expected shape and what to do.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from cora_fx.calibrate.batches import input_dtype, split_batch
from cora_fx.calibrate.objective import task_loss
from cora_fx.devices import model_device
from cora_fx.errors import CoRaError
from cora_fx.state import get_state


def check_batches(prepared: fx.GraphModule, batches: Iterable, caller: str, objective: bool = True) -> None:
    """Raise a `CoRaError` naming ``caller`` when the first of ``batches`` does not fit ``prepared``.

    ``objective``: also run the config's loss on that output (for the search and fine-tuning). A one-shot
    iterator is not read here (its first batch would be lost to the steps)."""
    iterator = iter(batches)
    if iterator is batches:
        return
    try:
        first = next(iterator)
    except StopIteration:
        raise CoRaError(f"{caller}: the calibration batches are empty") from None
    state = get_state(prepared)
    inputs, labels = split_batch(first, model_device(prepared), input_dtype(prepared))
    _check_shapes(inputs, state.example_shapes, caller)
    was_training = prepared.training
    prepared.eval()
    try:
        with torch.no_grad():
            output = prepared(*inputs)
    except Exception as err:
        raise CoRaError(f"{caller}: calibration batch 0 (inputs of shape {_shapes(inputs)}) fails in the model: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Pass batches "
                        f"shaped like the example inputs{_expected(state.example_shapes)}") from err
    finally:
        prepared.train(was_training)
    if objective:
        task_loss(state.config)(output, output, labels)  # an objective that does not fit the outputs says so


def _shapes(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) for t in inputs)


def _expected(shapes: Sequence[tuple[int, ...]]) -> str:
    return f" {', '.join(map(str, shapes))} (batch dimension first)" if shapes else " (batch dimension first)"


def _check_shapes(inputs: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]], caller: str) -> None:
    """Dimensions of each input against the example input's, and the channels (dimension 1) of images."""
    for index, (x, example) in enumerate(zip(inputs, shapes)):
        got = tuple(x.shape)
        where = f"{caller}: calibration batch 0, input {index}, has shape {got}; the model expects {example}"
        if len(got) == len(example) - 1:
            raise CoRaError(f"{where} (batch dimension first): add the batch dimension (x.unsqueeze(0)), or give "
                            "batches of samples, as a DataLoader does")
        if len(got) != len(example):
            raise CoRaError(f"{where}: {len(example)} dimensions, batch first; reshape the calibration inputs")
        if len(got) == 4 and got[1] != example[1]:
            raise CoRaError(f"{where}: {example[1]} channels in dimension 1, not {got[1]}; convert the batches "
                            "(e.g. NHWC to NCHW with x.permute(0, 3, 1, 2), or grayscale to 3 channels)")


def example_shapes(example_inputs: Any) -> list[tuple[int, ...]]:
    """The shapes of the example input tensors (what `check_batches` compares batches with)."""
    return [tuple(t.shape) for t in (example_inputs or ()) if isinstance(t, torch.Tensor)]
