"""What a prepared or converted GraphModule remembers, kept in ``graph_module.meta["cora_fx"]``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.fx as fx

from cora_fx.config import CoRaConfig
from cora_fx.errors import CoRaError

META_KEY = "cora_fx"
PREPARED, CONVERTED = "prepared", "converted"


@dataclass
class CoRaState:
    """Workflow state of one model.

    ``skipped`` maps the qualified names of the layers (or parameters) whose weights stay float to the reason;
    ``conv_params`` / ``linear_params`` count every conv / linear weight of the model, quantized or float, and
    ``float_conv_bits`` / ``float_linear_bits`` the bits the float ones are stored in (32 per float32 value,
    16 per half) for the accounting (`summary`);
    ``layers`` is filled at conversion with the per-layer records `summary` reports;
    ``pipeline`` holds the `PipelineResult` when `quantize_cora` ran the steps;
    ``capture`` is how the model was captured and ``concrete_args`` the arguments fixed then;
    ``rounding_notes`` names the layers whose calibrated rounding took a fallback, and which;
    ``plan_source`` and ``capture_options`` keep a float copy of the model and how it was prepared while the
    config's ``target_bits`` waits to be planned (`run_pipeline`'s first step).
    """

    config: CoRaConfig
    stage: str
    conv_params: int
    skipped: dict[str, str] = field(default_factory=dict)
    float_conv_bits: int = 0
    linear_params: int = 0
    float_linear_bits: int = 0
    search_result: Optional[Any] = None
    layers: list[Any] = field(default_factory=list)
    rounding_calibrated: bool = False
    pipeline: Optional[Any] = None
    capture: str = "symbolic"
    concrete_args: dict[str, Any] = field(default_factory=dict)
    rounding_notes: dict[str, str] = field(default_factory=dict)
    example_shapes: list[tuple[int, ...]] = field(default_factory=list)
    plan_source: Optional[Any] = None
    capture_options: dict[str, Any] = field(default_factory=dict)


def get_state(gm: Any, expected: Optional[str] = None, argument: str = "model") -> CoRaState:
    """The model's `CoRaState`, or a clear error if it is not at the ``expected`` stage."""
    state = getattr(gm, "meta", {}).get(META_KEY) if isinstance(gm, fx.GraphModule) else None
    if state is None:
        raise CoRaError(
            f"{argument} is not a cora_fx model (got {type(gm).__name__}); "
            "create one with cora_fx.prepare_cora(model, config)"
        )
    if expected is not None and state.stage != expected:
        hint = "call prepare_cora on the original float model" if state.stage == CONVERTED else ""
        raise CoRaError(f"{argument} is already {state.stage}, expected a {expected} model. {hint}".strip())
    return state


def step_state(prepared: Any, step: str) -> CoRaState:
    """The `CoRaState` of a prepared model for the data-aware ``step``: a clear error while the config's
    ``target_bits`` is not planned yet (the step would quantize every conv at ``quant.bits`` instead)."""
    state = get_state(prepared, PREPARED, "prepared")
    if state.plan_source is not None:
        raise CoRaError(f"{step}: config.search.target_bits={state.config.search.target_bits} is not planned yet; "
                        "call cora_fx.plan_target(prepared, calib) first, or run_pipeline(prepared, calib), which "
                        "starts with it")
    return state
