"""Fine-tuning of the adapters and channel scales at the final ranks (an extension, not the paper).

After the ranks are fixed, A_r and B_r of every adapter and a per-output-channel factor on
the scales of every quantized weight are trained for ``finetune_iterations`` steps of Adam
on the config's task loss (``"kl"``: label-free distillation from the float model). The
forward is the folded form of docs/method.md section 4 with A and B fake-quantized to
``adapter_bits`` (straight-through gradient), so what is trained is what `convert_cora`
stores; integer codes, ranks and bit budget do not change. Channel factors are trained only
with ``granularity="per_channel"`` (a per-tensor scale would become per channel).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from cora_fx.config import step_config
from cora_fx.calibrate import distributed
from cora_fx.calibrate.batches import BatchCycle, input_dtype, split_batch
from cora_fx.calibrate.objective import batch_loss, frozen_weights, task_loss
from cora_fx.devices import model_device
from cora_fx.graph.passes import folded_copy
from cora_fx.quant.modules import TUNE, CoRaConv2d, folded_modes
from cora_fx.state import step_state


@dataclass
class FinetuneResult:
    """Per-iteration task ``loss``, steps done, wall ``seconds``, trained parameter count."""

    iterations: int
    seconds: float
    parameters: int
    loss: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        first = f"{self.loss[0]:.4f}" if self.loss else "-"
        last = f"{self.loss[-1]:.4f}" if self.loss else "-"
        return (f"FinetuneResult({self.iterations} iterations in {self.seconds:.1f}s, {self.parameters} parameters, "
                f"loss {first} -> {last})")


def finetune(prepared: fx.GraphModule, batches: Iterable, *, progress: bool = True,
             **overrides: Any) -> FinetuneResult:
    """Train the adapters' A_r, B_r and the channel scales of ``prepared`` at its current ranks.

    Runs ``refine.finetune_iterations`` Adam steps at ``refine.finetune_lr``; ``overrides``
    (``finetune_iterations=``, ``finetune_lr=``) change them for this call (`step_config`).
    The tuned weights are written into ``prepared`` only when all steps succeed (a failing
    batch or KeyboardInterrupt leaves it as it was). Changing a rank afterwards
    (`set_ranks`, `search_ranks`) drops that layer's tuned A and B.
    """
    state = step_state(prepared, "finetune")
    cfg = step_config(state.config, "finetune", overrides)
    iterations, lr = cfg.refine.finetune_iterations, cfg.refine.finetune_lr
    gm = folded_copy(prepared)
    wrappers = [m for m in gm.modules() if isinstance(m, CoRaConv2d)]
    tuned: dict[CoRaConv2d, tuple[nn.Parameter, nn.Parameter]] = {}
    for w in wrappers:
        if int(w.adapter.hard_rank) > 0:
            a, b = w.adapter.float_weights()
            tuned[w] = (nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone()))
    factors: dict[nn.Module, nn.Parameter] = {}
    if cfg.quant.per_channel:
        for q in [w.quantized for w in wrappers]:
            factors[q] = nn.Parameter(torch.ones(q.weight.shape[0], device=q.weight.device))
    params = [p for pair in tuned.values() for p in pair] + list(factors.values())
    result = FinetuneResult(0, 0.0, sum(p.numel() for p in params))
    if not params or iterations == 0:
        return result
    loss_fn = task_loss(cfg)
    device, dtype = model_device(prepared), input_dtype(prepared)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: list[torch.Tensor] = []
    data = BatchCycle(batches)
    start = time.perf_counter()
    bar = tqdm(total=iterations, desc="cora finetune", disable=not distributed.shows_progress(progress), leave=False)
    try:
        for w, pair in tuned.items():
            w.tuned = pair
        for q, factor in factors.items():
            object.__setattr__(q, "tuning_factor", factor)  # not registered: the model gains no parameter
        with frozen_weights(prepared), folded_modes(wrappers, TUNE):
            gm.eval()
            while result.iterations < iterations:
                batch = data.next()
                if not distributed.all_reduce_min(int(batch is not None)):
                    break
                inputs, labels = split_batch(batch, device, dtype)
                loss = batch_loss(gm, wrappers, cfg, loss_fn, inputs, labels, caller="finetune",
                                  index=data.seen - 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(params)  # data-parallel: the step of the global batch
                optimizer.step()
                value = distributed.all_reduce_sum(loss.detach().reshape(1).clone()) / distributed.world_size()
                losses.append(value)  # read back once at the end: no GPU stall per step
                result.iterations += 1
                bar.update(1)
                if not bar.disable and result.iterations % 10 == 0:
                    bar.set_postfix(loss=f"{float(value):.4f}")
    finally:
        bar.close()
        result.loss = torch.cat(losses).cpu().tolist() if losses else []
        for w in tuned:
            w.tuned = None
        for q in factors:
            q.tuning_factor = None
    with torch.no_grad():
        for w, (a, b) in tuned.items():
            w.adapter.set_tuned(a, b)
        for q, factor in factors.items():
            q.channel_factor = factor.detach().clone()
    result.seconds = time.perf_counter() - start
    return result
