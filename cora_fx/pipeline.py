"""The data-aware steps between `prepare_cora` and `convert_cora`, in one visible order.

``prepare_cora`` -> `plan_target` (with ``target_bits``) -> `calibrate_activations` (with ``act_bits``) ->
`calibrate_rounding` -> `search_ranks` (or `set_ranks`) -> `reconstruct` -> `correct_batchnorm` -> `finetune` ->
``convert_cora``.
Each step is a public function a user may call alone; `run_pipeline` runs the ones the config asks for, and
`quantize_cora` (the CLI and the benchmarks through it) runs the whole chain. Nothing else writes this order out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch.fx as fx

from cora_fx.calibrate.activations import calibrate_activations
from cora_fx.calibrate.batchnorm import correct_batchnorm
from cora_fx.calibrate.checks import check_batches
from cora_fx.calibrate.finetune import FinetuneResult, finetune
from cora_fx.calibrate.rank_search import RankSearchResult, search_ranks
from cora_fx.calibrate.reconstruct import ReconstructResult, reconstruct
from cora_fx.calibrate.rounding import calibrate_rounding
from cora_fx.allocation.plan import plan_target
from cora_fx.config import CoRaConfig
from cora_fx.prepare import RankSpec, set_ranks
from cora_fx.state import PREPARED, get_state

#: The steps `run_pipeline` knows, in the order it runs them; `skip=` takes these names.
STEPS = ("plan_target", "calibrate_activations", "calibrate_rounding", "search_ranks", "reconstruct",
         "correct_batchnorm", "finetune")


@dataclass
class PipelineResult:
    """What `run_pipeline` did.

    Attributes:
        steps: the names of the steps that ran, in order (``set_ranks`` stands where the ranks were given or
            planned).
        planned_ranks: the ranks `plan_target` chose (``allocation="joint"``), else None.
        search: the `RankSearchResult` when the ranks were searched, else None.
        reconstruct: the `ReconstructResult` when `reconstruct` ran, else None.
        finetune: the `FinetuneResult` when `finetune` ran, else None.
        batchnorm_layers: how many BatchNorm layers `correct_batchnorm` re-estimated (0 if it did not run).
    """

    steps: list[str] = field(default_factory=list)
    planned_ranks: Optional[dict[str, int]] = None
    search: Optional[RankSearchResult] = None
    reconstruct: Optional[ReconstructResult] = None
    finetune: Optional[FinetuneResult] = None
    batchnorm_layers: int = 0


def wanted_steps(config: CoRaConfig, ranks: RankSpec = "search", skip: Iterable[str] = ()) -> list[str]:
    """The steps `run_pipeline` would run for ``config`` (``set_ranks`` when ``ranks`` is not "search")."""
    skip = set(skip)
    unknown = skip - set(STEPS)
    if unknown:
        raise ValueError(f"run_pipeline: skip={sorted(unknown)}: unknown step(s); the steps are {STEPS}")
    planned = config.search.target_bits is not None and "plan_target" not in skip
    enabled: dict[str, bool] = {
        "plan_target": planned,
        "calibrate_activations": config.activation.bits is not None,
        "calibrate_rounding": config.needs_rounding_data,
        "search_ranks": True,
        "reconstruct": config.reconstruct.iterations > 0,
        "correct_batchnorm": config.refine.bn_correction > 0,
        "finetune": config.refine.finetune_iterations > 0,
    }
    steps = [name for name in STEPS if enabled[name] and name not in skip]
    given = ranks != "search" or (planned and config.search.allocation == "joint")
    return ["set_ranks" if name == "search_ranks" and given else name for name in steps]


def run_pipeline(prepared: fx.GraphModule, batches: Iterable, *, ranks: RankSpec = "search",
                 skip: Iterable[str] = (), progress: bool = True,
                 on_step: Optional[Callable[[str], None]] = None) -> PipelineResult:
    """Run the data-aware steps the config of ``prepared`` asks for, in `STEPS` order, on ``batches``.

    ``ranks="search"`` runs `search_ranks`; ``"heuristic"``, ``"full"`` or a ``{layer: rank}`` dict calls
    `set_ranks` instead. With ``config.search.target_bits`` the first step, `plan_target`, plans each conv's bits
    (and with ``allocation="joint"`` the ranks, set unless ``ranks`` names others) on ``batches`` and prepares the
    float model again with them, in place of ``prepared``'s layers. ``skip`` names steps to leave out. ``batches``
    must be re-iterable (a list or a DataLoader) when more than one step reads them. ``on_step(name)`` is called
    before each step.
    """
    config = get_state(prepared, PREPARED, "prepared").config
    result = PipelineResult()
    steps = wanted_steps(config, ranks, skip)
    if steps:
        check_batches(prepared, batches, "run_pipeline", objective=bool({"search_ranks", "finetune"} & set(steps)))
    for name in steps:
        if on_step is not None:
            on_step(name)
        _run_step(name, prepared, batches, ranks, progress, config, result)
        result.steps.append(name)
    return result


def _run_step(name: str, prepared: fx.GraphModule, batches: Iterable, ranks: RankSpec, progress: bool,
              config: CoRaConfig, result: PipelineResult) -> None:
    if name == "plan_target":
        result.planned_ranks = plan_target(prepared, batches, progress=progress)[1]
    elif name == "calibrate_activations":
        calibrate_activations(prepared, batches, progress=progress)
    elif name == "calibrate_rounding":
        calibrate_rounding(prepared, batches, progress=progress)
    elif name == "search_ranks":
        result.search = search_ranks(prepared, batches, progress=progress)
    elif name == "set_ranks":
        set_ranks(prepared, ranks if ranks != "search" else result.planned_ranks)
    elif name == "reconstruct":
        result.reconstruct = reconstruct(prepared, batches, progress=progress)
    elif name == "correct_batchnorm":
        result.batchnorm_layers = correct_batchnorm(prepared, batches)
    elif name == "finetune":
        result.finetune = finetune(prepared, batches, progress=progress)
