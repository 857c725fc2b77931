"""Differentiable rank search (METHOD.md section 3) in the folded form (section 4).

Loss L(r) = task(r) + lambda * exp(ReLU(running_budget(r) - b)), Adam on the normalized
ranks r_l / R_l, each gradient clipped to [-clip, clip], ranks clamped into [1, R_l] after
every step, NaN ranks reset to 1. Final integer ranks are ceil(r_l), then *projected* onto
the budget (`project_ranks`), because the soft penalty alone does not hold it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import SEARCH_FIELDS, CoRaConfig
from .modules import CoRaConv2d, LowRankAdapter, QuantLinear
from .objective import batch_loss, frozen_weights, task_loss
from .batches import BatchCycle, input_dtype, model_device, split_batch
from .batchnorm import correct_batchnorm
from .finetune import FinetuneResult, finetune
from .passes import folded_copy
from .rounding import calibrate_rounding
from .prepare import adapters
from .state import PREPARED, get_state
from .summary import accounting, layer_infos


@dataclass
class SearchHistory:
    """Per-iteration ``loss`` (task + penalty), ``task_loss`` and running ``budget``."""

    loss: list[float] = field(default_factory=list)
    task_loss: list[float] = field(default_factory=list)
    budget: list[float] = field(default_factory=list)


@dataclass
class RankSearchResult:
    """Outcome of `search_ranks`.

    Attributes:
        ranks: final integer rank per rewritten conv, keyed by its qualified name.
        budget: adapter params / conv params at ``ranks`` (after projection, <= b).
        soft_budget: the running budget of the continuous ranks at the last iteration.
        equivalent_bits: n + adapter_bits * budget (+ float layers), see `summary`.
        history: per-iteration loss, task loss and running budget.
        soft_ranks: continuous ranks r_l at the end of the search.
        searched_ranks: ceil(r_l) before the budget projection.
        max_ranks: R_l per layer; target_budget: the b that was asked for.
        iterations, seconds: work done; interrupted: stopped by KeyboardInterrupt.
        finetune: the `FinetuneResult` when ``finetune_iterations`` > 0 ran after the search.
    """

    ranks: dict[str, int]
    budget: float
    soft_budget: float
    equivalent_bits: float
    history: SearchHistory
    soft_ranks: dict[str, float]
    searched_ranks: dict[str, int]
    max_ranks: dict[str, int]
    target_budget: float
    iterations: int
    seconds: float
    interrupted: bool = False
    finetune: Optional[FinetuneResult] = None

    def __str__(self) -> str:
        return (f"RankSearchResult({len(self.ranks)} layers, {self.iterations} iterations in {self.seconds:.1f}s, "
                f"budget {self.budget:.4f} (soft {self.soft_budget:.4f}), {self.equivalent_bits:.3f} equivalent bits)")


def project_ranks(
    ranks: dict[str, int], adapters_: dict[str, LowRankAdapter], importance: dict[str, float],
    budget_params: float,
) -> dict[str, int]:
    """Lower ranks greedily until the adapters' parameters fit ``budget_params``.

    Each step removes one singular triplet from the layer where it costs least per
    parameter saved: cost = (g_l + eps) * (S_l[r-1] / S_l[r0-1])^2 / (m + n*k1*k2), with g_l the
    search's running average of -d task_loss / d r_l (how much the task loss said it needs
    that layer's rank; floored at a tenth of the median so noisy zeros do not wipe a layer
    out), S_l the residual's singular values and r0 the searched rank. g_l (S_j / S_r0)^2
    estimates the loss increase of dropping triplet j, the sensitivity g_l / S_r0^2 times
    the weight error S_j^2. Without search information (all g_l = 0) this is the
    weight-space-optimal allocation. Ranks may reach 0 (no adapter) only here.
    """
    ranks = dict(ranks)
    total = sum(adapters_[n].parameter_count(r) for n, r in ranks.items())
    if total <= budget_params:
        return ranks
    positive = sorted(v for v in importance.values() if v > 0)
    eps = 0.1 * positive[len(positive) // 2] if positive else 1.0
    sigma = {n: adapters_[n].factors.S.max(dim=0).values for n in ranks}
    ref = {n: float(sigma[n][max(r, 1) - 1]) or 1.0 for n, r in ranks.items()}
    while total > budget_params:
        best, best_cost = None, math.inf
        for name, r in ranks.items():
            if r == 0:
                continue
            energy = (float(sigma[name][r - 1]) / ref[name]) ** 2
            cost = max(importance.get(name, 0.0), eps) * energy / adapters_[name].factors.params_per_rank
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:
            break
        ranks[best] -= 1
        total -= adapters_[best].factors.params_per_rank
    return ranks


def search_ranks(prepared: fx.GraphModule, batches: Iterable, *, progress: bool = True, **config_overrides: Any) -> RankSearchResult:
    """Search the per-layer ranks of ``prepared`` on calibration ``batches``; set them; report.

    ``batches`` yields ``(inputs, labels)``; ``inputs`` is a tensor or tuple of tensors and is
    moved to the model's device. ``config_overrides`` change search fields of the config for
    this call (``budget``, ``iterations``, ``loss``, ``lr``, ...). The hard ranks of
    ``prepared`` are set to the result; if the search fails, they are left as they were.
    On KeyboardInterrupt the ranks found so far are projected and set, the result is kept
    in ``prepared.meta["cora_fx"].search_result``, and the interrupt is re-raised.
    """
    state = get_state(prepared, PREPARED, "prepared")
    bad = set(config_overrides) - SEARCH_FIELDS
    if bad:
        raise ValueError(f"search_ranks: {sorted(bad)} cannot be changed after prepare_cora (search fields: {sorted(SEARCH_FIELDS)})")
    cfg = state.config.replace(**config_overrides)
    if cfg.needs_rounding_data and not state.rounding_calibrated:
        calibrate_rounding(prepared, batches)
    layers = adapters(prepared)
    searchable = {n: a for n, a in layers.items() if a.searchable}
    saved_ranks = {n: int(a.hard_rank) for n, a in layers.items()}
    saved_soft = {n: float(a.rank) for n, a in layers.items()}
    search_gm = folded_copy(prepared)
    wrappers = [m for m in search_gm.modules() if isinstance(m, CoRaConv2d)]
    linears = [m for m in prepared.modules() if isinstance(m, QuantLinear)]
    loss_fn = task_loss(cfg)
    device = model_device(prepared)
    dtype = input_dtype(prepared)
    names = list(searchable)
    ranks = [searchable[n].rank for n in names]
    max_ranks = torch.tensor([searchable[n].max_rank for n in names], dtype=torch.float32, device=device)
    total = max(state.conv_params, 1)
    omega = torch.tensor([searchable[n].factors.params_per_rank / total for n in names], dtype=torch.float32, device=device)
    fixed_params = sum(a.parameter_count() for a in layers.values() if not a.searchable)
    fixed_budget = fixed_params / total
    history = SearchHistory()
    importance = torch.zeros(len(names), device=device)
    start = time.perf_counter()
    done = 0
    interrupted = failed = False
    data = BatchCycle(batches)
    kept: list = []  # the first batches, for the BatchNorm correction
    bar = tqdm(total=cfg.iterations, desc="cora rank search", disable=not progress, leave=False)
    try:
        with frozen_weights(prepared), torch.random.fork_rng(devices=[]):
            search_gm.eval()
            with torch.no_grad():
                for a in searchable.values():
                    a.rank.fill_(cfg.init_rank)
                    a.nbk_order = cfg.nbk_order
            for r in ranks:
                r.requires_grad_(True)
            optimizer = torch.optim.Adam(ranks, lr=cfg.lr) if ranks else None
            torch.manual_seed(cfg.seed)
            while done < cfg.iterations:
                batch = data.next()
                if batch is None:
                    break
                inputs, labels = split_batch(batch, device, dtype)
                if len(kept) < cfg.bn_correction:
                    kept.append(batch)
                task = batch_loss(search_gm, wrappers, linears, cfg, loss_fn, inputs, labels, caller="search_ranks",
                                  index=data.seen - 1)
                if optimizer is None:
                    history.loss.append(task.item()); history.task_loss.append(task.item()); history.budget.append(fixed_budget)
                    done += 1; bar.update(1)
                    continue
                rank_vec = torch.stack(ranks) * max_ranks
                running = fixed_budget + (omega * rank_vec).sum()
                penalty = cfg.penalty * torch.exp(F.relu(running - cfg.budget))
                task_grads = torch.autograd.grad(task, ranks, allow_unused=True)
                pen_grads = torch.autograd.grad(penalty, ranks)
                with torch.no_grad():
                    g_task = torch.stack([torch.zeros((), device=device) if g is None else g for g in task_grads])
                    importance.mul_(0.9).add_(0.1 * (-g_task / max_ranks))  # d task / d r_l
                    for r, gt, gp in zip(ranks, g_task, pen_grads):
                        r.grad = (gt + gp).clamp(-cfg.grad_clip, cfg.grad_clip)
                optimizer.step()
                with torch.no_grad():
                    for r, big_r in zip(ranks, max_ranks):
                        r.nan_to_num_(nan=float(1.0 / big_r))
                        r.clamp_(float(1.0 / big_r), 1.0)
                task_value, running_value = task.item(), running.item()
                loss_value = task_value + penalty.item()
                history.loss.append(loss_value); history.task_loss.append(task_value); history.budget.append(running_value)
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", budget=f"{running_value:.3f}")
    except KeyboardInterrupt:
        interrupted = True
        raise
    except BaseException:
        failed = True
        _restore(layers, saved_ranks, saved_soft)
        raise
    finally:
        bar.close()
        if not failed:
            result = _finish(prepared, state, layers, searchable, names, importance, cfg, history, done,
                             time.perf_counter() - start, interrupted)
    if cfg.bn_correction:
        correct_batchnorm(prepared, kept, max_batches=cfg.bn_correction)
    if cfg.finetune_iterations:
        result.finetune = finetune(prepared, batches, iterations=cfg.finetune_iterations, lr=cfg.finetune_lr,
                                   progress=progress)
    return result


def _restore(layers: dict[str, LowRankAdapter], saved: dict[str, int], soft: dict[str, float]) -> None:
    with torch.no_grad():
        for name, a in layers.items():
            a.rank.fill_(soft[name])
            a.set_hard_rank(saved[name])


def _finish(prepared: fx.GraphModule, state: Any, layers: dict[str, LowRankAdapter], searchable: dict[str, LowRankAdapter],
            names: list[str], importance: torch.Tensor, cfg: CoRaConfig, history: SearchHistory, done: int,
            seconds: float, interrupted: bool) -> RankSearchResult:
    soft = {n: float(searchable[n].rank) * searchable[n].max_rank for n in names}
    searched = {n: min(max(math.ceil(soft[n] - 1e-6), 1), searchable[n].max_rank) for n in names}
    fixed_params = sum(a.parameter_count() for a in layers.values() if not a.searchable)
    budget_params = cfg.budget * state.conv_params - fixed_params
    imp = {n: max(float(v), 0.0) for n, v in zip(names, importance)}
    final = project_ranks(searched, searchable, imp, budget_params)
    for name, rank in final.items():
        searchable[name].set_hard_rank(rank)
    for a in searchable.values():
        a.rank.requires_grad_(False)
    acc = accounting(layer_infos(prepared), state)
    soft_budget = (fixed_params + sum(searchable[n].factors.params_per_rank * soft[n] for n in names)) / max(state.conv_params, 1)
    max_ranks = {n: searchable[n].max_rank for n in names}
    result = RankSearchResult(final, acc.budget, soft_budget, acc.equivalent_bits, history, soft, searched, max_ranks,
                              cfg.budget, done, seconds, interrupted)
    state.search_result = result
    return result
