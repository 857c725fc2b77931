"""Differentiable rank search (docs/method.md section 3) in the folded form (section 4).

Loss L(r) = task(r) + lambda * exp(ReLU(running_budget(r) - b)), Adam on the normalized
ranks r_l / R_l, each gradient clipped to [-clip, clip], ranks clamped into [1, R_l] after
every step, NaN ranks reset to 1. Final integer ranks are ceil(r_l), then *projected* onto
the budget (`project_ranks`), because the soft penalty alone does not hold it.
"""
from __future__ import annotations

import math
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from cora_fx.calibrate import distributed
from cora_fx.calibrate.batches import BatchCycle, input_dtype, split_batch
from cora_fx.calibrate.objective import (
    TeacherCache,
    batch_loss,
    channels_last,
    frozen_weights,
    micro_batches,
    task_loss,
)
from cora_fx.config import CoRaConfig, step_config
from cora_fx.devices import model_device
from cora_fx.errors import CoRaError
from cora_fx.graph.passes import search_copy
from cora_fx.io.summary import accounting, layer_infos
from cora_fx.prepare import adapters
from cora_fx.quant.modules import CoRaConv2d, LowRankAdapter
from cora_fx.state import step_state


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
    sigma = {n: adapters_[n].factors.S.max(dim=0).values.cpu() for n in ranks}  # read per step below: on the host
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


def search_ranks(prepared: fx.GraphModule, batches: Iterable, *, progress: bool = True,
                 **overrides: Any) -> RankSearchResult:
    """Search the per-layer ranks of ``prepared`` on calibration ``batches``; set them; report.

    ``batches`` yields ``(inputs, labels)``; ``inputs`` is a tensor or tuple of tensors and is moved to the
    model's device. ``overrides`` change `SearchConfig` fields for this call (``budget``,
    ``iterations``, ``loss``, ``lr``, ...; `step_config`). When the config asks for data-aware rounding or adapters,
    `calibrate_rounding` must have run first (`run_pipeline` does it). The hard ranks of ``prepared`` are
    set to the result; if the search fails, they are left as they were. On KeyboardInterrupt the ranks found
    so far are projected and set, the result is kept in ``prepared.meta["cora_fx"].search_result``, and the
    interrupt is re-raised.
    """
    state = step_state(prepared, "search_ranks")
    cfg = step_config(state.config, "search_ranks", overrides)
    if cfg.needs_rounding_data and not state.rounding_calibrated:
        raise CoRaError("search_ranks: the config asks for data-aware rounding or adapters (rounding.method="
                        f"{cfg.rounding.method!r}, adapter.svd={cfg.adapter.svd!r}); call "
                        "calibrate_rounding(prepared, batches) first, or use run_pipeline / quantize_cora")
    search = _RankSearch(prepared, state, cfg)
    try:
        search.run(BatchCycle(batches), progress)
    except KeyboardInterrupt:
        search.finish(interrupted=True)
        raise
    except BaseException:
        search.restore()
        raise
    return search.finish(interrupted=False)


#: The progress bar shows the loss and budget every this many steps (reading them waits for a GPU).
POSTFIX_EVERY = 10


class _RankSearch:
    """One run of the search loop (docs/method.md section 3) over the folded copy of a prepared model."""

    def __init__(self, prepared: fx.GraphModule, state: Any, cfg: CoRaConfig) -> None:
        self.prepared, self.state, self.cfg = prepared, state, cfg
        self.layers = adapters(prepared)
        self.searchable = {n: a for n, a in self.layers.items() if a.searchable}
        self.names = list(self.searchable)
        self.saved = {n: (int(a.hard_rank), float(a.rank)) for n, a in self.layers.items()}
        self.search_gm = search_copy(prepared)
        self.wrappers = [m for m in self.search_gm.modules() if isinstance(m, CoRaConv2d)]
        self.loss_fn = task_loss(cfg)
        self.device = model_device(prepared)
        self.dtype = input_dtype(prepared)
        total = max(state.conv_params, 1)
        self.ranks = [self.searchable[n].rank for n in self.names]
        self.min_ranks = [1.0 / self.searchable[n].max_rank for n in self.names]  # 1 / R_l, host floats
        self.max_ranks = torch.tensor([self.searchable[n].max_rank for n in self.names], dtype=torch.float32,
                                      device=self.device)
        self.omega = torch.tensor([self.searchable[n].factors.params_per_rank / total for n in self.names],
                                  dtype=torch.float32, device=self.device)
        self.fixed_params = sum(a.parameter_count() for a in self.layers.values() if not a.searchable)
        self.fixed_budget = self.fixed_params / total
        self.importance = torch.zeros(len(self.names), device=self.device)
        self.channels_last = cfg.search.channels_last
        self.teachers = TeacherCache(False)
        self.pending: list[tuple[Any, Any, Any]] = []
        self.done = 0
        self.start = time.perf_counter()

    def run(self, data: BatchCycle, progress: bool) -> None:
        """Up to ``iterations`` steps, or until a one-shot iterator of batches ends (on any process)."""
        cfg = self.cfg.search
        bar = tqdm(total=cfg.iterations, desc="cora rank search", disable=not distributed.shows_progress(progress),
                   leave=False)
        self.teachers = TeacherCache(data.repeats)
        with frozen_weights(self.prepared), torch.random.fork_rng(devices=[]), closing(bar):
            self.search_gm.eval()
            optimizer = self._start()
            torch.manual_seed(cfg.seed)
            while self.done < cfg.iterations:
                batch = data.next()
                if not distributed.all_reduce_min(int(batch is not None)):
                    break
                self._step(batch, data.seen - 1, data.position, optimizer, bar)

    def _start(self) -> Optional[torch.optim.Optimizer]:
        start = self._start_fraction()
        with torch.no_grad():
            for a in self.searchable.values():
                a.rank.fill_(min(max(start, 1.0 / a.max_rank), 1.0))
                a.nbk_order = self.cfg.search.nbk_order
        for r in self.ranks:
            r.requires_grad_(True)
        return torch.optim.Adam(self.ranks, lr=self.cfg.search.lr) if self.ranks else None

    def _start_fraction(self) -> float:
        """``init_rank``, or for ``"budget"`` the normalized rank u with fixed + u * sum(omega_l R_l) = b."""
        cfg = self.cfg.search
        if cfg.init_rank != "budget":
            return float(cfg.init_rank)
        spendable = float((self.omega * self.max_ranks).sum()) if self.names else 0.0
        return (cfg.budget - self.fixed_budget) / spendable if spendable > 0 else 1.0

    def _step(self, batch: Any, index: int, position: int, optimizer: Optional[torch.optim.Optimizer],
              bar: Any) -> None:
        """One Adam step on task + lambda * exp(ReLU(running_budget - b)) with clipped rank gradients.

        The task gradient is summed over micro-batches and averaged over processes (section 13)."""
        cfg = self.cfg.search
        inputs, labels = split_batch(batch, self.device, self.dtype)
        try:
            g_task, task_value = self._task_gradient(inputs, labels, index, position)
        except CoRaError:
            if not (self.channels_last and self.done == 0):
                raise
            self.channels_last = False  # e.g. a view() of a channels-last activation: run contiguous
            g_task, task_value = self._task_gradient(inputs, labels, index, position)
        if optimizer is None:
            self._record(task_value, task_value, self.fixed_budget, bar)
            return
        running = self.fixed_budget + (self.omega * torch.stack(self.ranks) * self.max_ranks).sum()
        penalty = cfg.penalty * torch.exp(F.relu(running - cfg.budget))
        penalty_grads = torch.autograd.grad(penalty, self.ranks)
        with torch.no_grad():
            self.importance.mul_(0.9).add_(0.1 * (-g_task / self.max_ranks))  # d task / d r_l
            for r, gt, gp in zip(self.ranks, g_task, penalty_grads):
                r.grad = (gt + gp).clamp(-cfg.grad_clip, cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for r, low in zip(self.ranks, self.min_ranks):
                r.nan_to_num_(nan=low)
                r.clamp_(low, 1.0)
        self._record(task_value + penalty.detach(), task_value, running.detach(), bar)

    def _task_gradient(self, inputs: tuple[torch.Tensor, ...], labels: Any, index: int,
                       position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """d task / d r_l and the task loss of one batch, over its micro-batches and all processes."""
        cfg = self.cfg.search
        if self.channels_last:
            inputs = channels_last(inputs)
        g_task = torch.zeros(len(self.names), device=self.device)
        task_value = torch.zeros(1, device=self.device)
        for k, (part, part_labels, weight) in enumerate(micro_batches(inputs, labels, cfg.micro_batch, cfg.loss)):
            with self._autocast():
                task = weight * batch_loss(self.search_gm, self.wrappers, self.cfg, self.loss_fn, part,
                                           part_labels, caller="search_ranks", index=index,
                                           teachers=self.teachers, key=(position, k))
            if self.ranks and task.requires_grad:
                grads = torch.autograd.grad(task, self.ranks, allow_unused=True)
                g_task += torch.stack([torch.zeros((), device=self.device) if g is None else g for g in grads])
            task_value += task.detach()
        reduced = distributed.all_reduce_sum(torch.cat([g_task, task_value])) / distributed.world_size()
        return reduced[:-1], reduced[-1]

    def _autocast(self) -> Any:
        """``torch.autocast`` at ``search.autocast`` on the model's device type, or a no-op context."""
        precision = self.cfg.search.autocast
        if precision is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, precision))

    def _record(self, loss: Any, task: Any, budget: Any, bar: Any) -> None:
        """Keep the step's values where they are (a GPU's are read back once, in `finish`); the progress bar reads
        them every `POSTFIX_EVERY` steps."""
        self.pending.append((loss, task, budget))
        self.done += 1
        bar.update(1)
        if not bar.disable and (self.done % POSTFIX_EVERY == 0 or self.done == self.cfg.search.iterations):
            bar.set_postfix(loss=f"{float(loss):.3f}", budget=f"{float(budget):.3f}")

    def _history(self) -> SearchHistory:
        """The per-step values as floats, read back from the device in one copy."""
        if not self.pending:
            return SearchHistory()
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).to(self.device)
                              for step in self.pending for v in step]).reshape(-1, 3).cpu().tolist()
        loss, task, budget = (list(column) for column in zip(*values))
        return SearchHistory(loss, task, budget)

    def restore(self) -> None:
        """Put back the ranks the model had before the search."""
        with torch.no_grad():
            for name, a in self.layers.items():
                hard, soft = self.saved[name]
                a.rank.fill_(soft)
                a.set_hard_rank(hard)
            for a in self.searchable.values():
                a.rank.requires_grad_(False)

    def finish(self, interrupted: bool) -> RankSearchResult:
        """Integer ranks ceil(r_l), projected onto the budget, set on the model and reported."""
        searchable, names, state = self.searchable, self.names, self.state
        soft = {n: float(searchable[n].rank) * searchable[n].max_rank for n in names}
        searched = {n: min(max(math.ceil(soft[n] - 1e-6), 1), searchable[n].max_rank) for n in names}
        fixed_params = self.fixed_params
        budget_params = self.cfg.search.budget * state.conv_params - fixed_params
        importance = {n: max(float(v), 0.0) for n, v in zip(names, self.importance)}
        final = project_ranks(searched, searchable, importance, budget_params)
        for name, rank in final.items():
            searchable[name].set_hard_rank(rank)
        for a in searchable.values():
            a.rank.requires_grad_(False)
        acc = accounting(layer_infos(self.prepared), state)
        soft_params = fixed_params + sum(searchable[n].factors.params_per_rank * soft[n] for n in names)
        result = RankSearchResult(final, acc.budget, soft_params / max(state.conv_params, 1), acc.equivalent_bits,
                                  self._history(), soft, searched, {n: searchable[n].max_rank for n in names},
                                  self.cfg.search.budget, self.done, time.perf_counter() - self.start, interrupted)
        state.search_result = result
        return result
