"""`plan_target`: the public planner. It meets ``config.search.target_bits`` with the planner the config names
(``search.allocation``): `allocate_jointly` (bits and ranks, ``"joint"``) or `allocate_bits` (bits, ``"bits"``).
docs/method.md section 8."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch.fx as fx
from torch import nn

from cora_fx.allocation.bits import allocate_bits
from cora_fx.allocation.joint import RANK_CHOICES, NothingToPlan, allocate_jointly, offered_bits
from cora_fx.config import CoRaConfig
from cora_fx.errors import CoRaError
from cora_fx.prepare import adopt, prepare_cora, set_ranks
from cora_fx.state import PREPARED, get_state


def plan_target(model: nn.Module, batches: Iterable, config: Optional[CoRaConfig] = None, *, progress: bool = True,
                **capture_options: Any) -> tuple[CoRaConfig, Optional[dict[str, int]]]:
    """Meet ``config.search.target_bits``: the config with the planned ``layer_bits`` (and no target left), and
    the planned ranks with ``allocation="joint"`` (None with ``"bits"``: the search picks them). The joint plan
    offers the searchable convs ``offered_bits(target, search.plan_widths)``: ceil(target) - 1 and ceil(target).

    ``plan_target(prepared, calib)`` (no config) is the step: the target of a model `prepare_cora` prepared is
    planned on the float copy it kept, ``prepared`` takes the layers of that copy prepared with the plan, and the
    planned ranks are set; `run_pipeline` runs it first (docs/method.md section 8)."""
    if config is None:
        return _plan_prepared(model, batches, progress)
    target = config.search.target_bits
    if target is None:
        return config, None
    if config.search.allocation == "joint":
        try:
            plan = allocate_jointly(model, batches, config, target, progress=progress, lower_if_needed=True,
                                    bits=offered_bits(target, config.search.plan_widths),
                                    ranks=RANK_CHOICES if config.search.plan_adapters else (0,), **capture_options)
        except NothingToPlan:  # no searchable conv (Linear layers only, say): every layer at its own bits
            return config.replace(target_bits=None), {}
        return config.replace(layer_bits=plan.layer_bits, target_bits=None), plan.ranks
    layer_bits = allocate_bits(model, batches, config, target, progress=progress, **capture_options)
    return config.replace(layer_bits=layer_bits, target_bits=None), None


def _plan_prepared(prepared: nn.Module, batches: Iterable, progress: bool) -> tuple[CoRaConfig, Optional[dict]]:
    """`plan_target` on the float copy `prepare_cora` kept with a target, in place of ``prepared``'s layers."""
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"plan_target: config is required unless the model is a prepared model, got "
                        f"{type(prepared).__name__}")
    state = get_state(prepared, PREPARED, "prepared")
    if state.plan_source is None:
        raise CoRaError("plan_target: this prepared model has no target_bits left to plan (planned already, or its "
                        "config has none); to plan again, prepare the float model again")
    config, ranks = plan_target(state.plan_source, batches, state.config, progress=progress, **state.capture_options)
    adopt(prepared, prepare_cora(state.plan_source, config, inplace=True, progress=False, **state.capture_options))
    if ranks:
        set_ranks(prepared, ranks)
    return config, ranks
