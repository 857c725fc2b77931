"""`plan_target`: the public planner. It meets ``config.search.target_bits`` with the planner the config names
(``search.allocation``): `allocate_jointly` (bits and ranks, ``"joint"``) or `allocate_bits` (bits, ``"bits"``).
docs/method.md section 8."""
from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

from cora_fx.allocation.bits import allocate_bits
from cora_fx.allocation.joint import allocate_jointly
from cora_fx.config import CoRaConfig


def plan_target(model: nn.Module, batches: Iterable, config: CoRaConfig, *, progress: bool = True,
                **capture_options: Any) -> tuple[CoRaConfig, Optional[dict[str, int]]]:
    """Meet ``config.search.target_bits``: the config with the planned ``layer_bits`` (and no target left), and
    the planned ranks with ``allocation="joint"`` (None with ``"bits"``: the search picks them). What
    `quantize_cora` and ``cora-fx quantize`` run first (docs/method.md section 8)."""
    target = config.search.target_bits
    if target is None:
        return config, None
    if config.search.allocation == "joint":
        plan = allocate_jointly(model, batches, config, target, progress=progress, **capture_options)
        return config.replace(layer_bits=plan.layer_bits, target_bits=None), plan.ranks
    layer_bits = allocate_bits(model, batches, config, target, progress=progress, **capture_options)
    return config.replace(layer_bits=layer_bits, target_bits=None), None
