"""Per-layer bit-widths (and ranks) that meet a target equivalent bit-width (docs/method.md section 8).

`plan_target` is the entry point (what `quantize_cora` and ``cora-fx quantize --target-bits`` run); the two
planners it chooses between, `allocate_bits` and `allocate_jointly`, and the sensitivities they share are
importable from here for studies of the plans themselves.
"""
from cora_fx.allocation.bits import allocate_bits
from cora_fx.allocation.joint import JointPlan, allocate_jointly
from cora_fx.allocation.plan import plan_target

__all__ = ["plan_target", "allocate_bits", "allocate_jointly", "JointPlan"]
