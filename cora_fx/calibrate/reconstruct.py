"""Block-wise output reconstruction: learned base rounding and adapter factors (docs/method.md section 17).

An extension after the paper, for low bits. Once bits and ranks are fixed, the model (its folded, BatchNorm-
merged copy) is cut into single-entry blocks (`graph.blocks`); block by block, on ``reconstruct.samples``
calibration samples held in memory:

1. the float block's output is computed on the float model's inputs to the block (the target);
2. the rounding of each base weight below 8 bits (`LearnedRounding`: each code may move one step from GPTQ's,
   signed gradient descent) and the adapters' A_r, B_r (Adam, fake-quantized to ``adapter_bits``) are learned
   for ``iterations`` steps so that the quantized block, fed the *quantized* model's inputs to the block,
   matches the target in mean squared error;
3. a block keeps its GPTQ codes unless the learned ones lower the *model's* loss against the float model (the
   config's label-free objective, with the later blocks as they are) on the fifth of the held samples the steps
   never drew; the quantized block's outputs are the next block's inputs.

Grids, bits and ranks do not change, so the file size does not either. The new codes' residual is factored
again (weight SVD; the learned A_r, B_r are kept as tuned weights), so the float teacher stays exact.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from cora_fx.calibrate import distributed
from cora_fx.calibrate.activations import float_activations
from cora_fx.calibrate.batches import BatchCycle, input_dtype, split_batch
from cora_fx.calibrate.objective import frozen_weights
from cora_fx.calibrate.distillation import distillation_loss
from cora_fx.config import CoRaConfig, ReconstructConfig, step_config
from cora_fx.devices import model_device
from cora_fx.errors import CoRaError
from cora_fx.graph.blocks import Block, graph_blocks
from cora_fx.graph.passes import search_copy
from cora_fx.quant.learned_rounding import LearnedRounding
from cora_fx.quant.modules import FLOAT, HARD, OFF, TUNE, ConvBatchNorm, CoRaConv2d, folded_modes
from cora_fx.quant.residual import ResidualFactors
from cora_fx.state import step_state

#: Samples per forward pass when the held inputs are run through a block without gradient.
_EVAL_CHUNK = 64


@dataclass
class ReconstructResult:
    """What `reconstruct` did: ``blocks`` learned (``kept`` of them left as they were because the model's loss did
    not fall), ``changed_codes`` base codes moved, the relative output error of each block before and after
    (``error_before`` / ``error_after``: ||out - float||^2 / ||float||^2), the model's loss against the float model
    before and after (``loss_before`` / ``loss_after``), all on the held-out fifth of the samples; wall
    ``seconds``."""

    blocks: int = 0
    iterations: int = 0
    samples: int = 0
    kept: int = 0
    changed_codes: int = 0
    seconds: float = 0.0
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)
    loss_before: float = float("nan")
    loss_after: float = float("nan")

    def __str__(self) -> str:
        return (f"ReconstructResult({self.blocks} blocks x {self.iterations} iterations on {self.samples} samples "
                f"in {self.seconds:.1f}s, {self.changed_codes} codes changed, {self.kept} blocks kept, "
                f"held-out loss {self.loss_before:.4f} -> {self.loss_after:.4f})")


def reconstruct(prepared: fx.GraphModule, batches: Iterable, *, progress: bool = True,
                **overrides: Any) -> ReconstructResult:
    """Learn the base rounding and the adapters' factors of ``prepared`` block by block (module docstring).

    Runs ``reconstruct.iterations`` steps per block on the first ``reconstruct.samples`` samples of ``batches``;
    ``overrides`` (``reconstruct_iterations=``, ``reconstruct_lr=``, ...) change the settings for this call
    (`step_config`). Call it once the ranks are fixed: a later `set_ranks` / `search_ranks` replaces the learned
    adapters by the new residual's factors (the learned codes stay).
    """
    state = step_state(prepared, "reconstruct")
    settings = step_config(state.config, "reconstruct", overrides).reconstruct
    result = ReconstructResult(iterations=settings.iterations)
    if settings.iterations == 0:
        return result
    start = time.perf_counter()
    gm = search_copy(prepared)
    held = _held_inputs(gm, batches, settings.samples)
    result.samples = next(iter(held.values())).shape[0]
    blocks = graph_blocks(gm, lambda node: bool(_wrappers(gm, [node])), settings.min_layers,
                          keep_cut=_batched_nodes(gm, held))
    bar = tqdm(total=len(blocks) * settings.iterations, desc="cora reconstruct",
               disable=not distributed.shows_progress(progress), leave=False)
    quantized, teacher = held, dict(held)
    try:
        with frozen_weights(prepared):
            check = _OutputCheck(gm, blocks, held, _check_loss(state.config))
            result.loss_before = check.current
            for index, block in enumerate(blocks):
                quantized, teacher = _reconstruct_block(gm, blocks, index, quantized, teacher, check, settings,
                                                        result, bar)
            result.loss_after = check.current
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _check_loss(config: CoRaConfig) -> Callable[[Any, Any, Any], torch.Tensor]:
    """The config's label-free objective (section 7), or the relative MSE of the outputs for ``"ce"`` and a
    callable loss: what decides whether a block keeps its learned codes."""
    loss = config.search.loss
    name = loss if isinstance(loss, str) and loss != "ce" else "mse"
    return distillation_loss(name, config.search.loss_dim)


class _OutputCheck:
    """The model's loss against the float model on the held-out fifth of the samples (`_split`), with the blocks
    after a given one run as they are: a block keeps its learned codes only where this loss falls."""

    def __init__(self, gm: fx.GraphModule, blocks: list[Block], held: dict[fx.Node, torch.Tensor],
                 loss: Callable[[Any, Any, Any], torch.Tensor]) -> None:
        self.blocks = blocks
        self.loss = loss
        self.part = _split(next(iter(held.values())).shape[0])[1]
        self.wrappers = _wrappers(gm, gm.graph.nodes)
        inputs = [held[n][self.part] for n in gm.graph.nodes if n.op == "placeholder"]
        self.float_output = _run(gm, inputs, self.wrappers, FLOAT)
        self.current = float(self.loss(_run(gm, inputs, self.wrappers, HARD), self.float_output, None))

    def loss_after(self, index: int, output: Any) -> float:
        """The loss when block ``index`` returns ``output`` (all held samples) and the later blocks follow."""
        value = pytree.tree_map(lambda t: t[self.part] if isinstance(t, torch.Tensor) else t, output)
        for block in self.blocks[index + 1:]:
            value = _run(block.module, [value], self.wrappers, HARD)
        with torch.no_grad():
            return float(self.loss(value, self.float_output, None))


def _held_inputs(gm: fx.GraphModule, batches: Iterable, samples: int) -> dict[fx.Node, torch.Tensor]:
    """The first ``samples`` calibration inputs, concatenated per model input (placeholder node -> tensor)."""
    device, dtype = model_device(gm), input_dtype(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    parts: list[tuple[torch.Tensor, ...]] = []
    data, count = BatchCycle(batches, "reconstruct"), 0
    while count < samples:
        batch = data.next()
        if batch is None or (parts and data.position == 0):
            break
        inputs = split_batch(batch, device, dtype)[0]
        if len(inputs) != len(placeholders) or any(t.dim() == 0 for t in inputs):
            raise CoRaError(f"reconstruct: each calibration batch must give the model's {len(placeholders)} "
                            f"input(s) with a batch dimension, got shapes {[tuple(t.shape) for t in inputs]}")
        parts.append(inputs)
        count += inputs[0].shape[0]
    held = [torch.cat(column)[:samples] for column in zip(*parts)]
    return {placeholder: tensor for placeholder, tensor in zip(placeholders, held)}


def _batched_nodes(gm: fx.GraphModule, held: dict[fx.Node, torch.Tensor]):
    """``keep_cut`` for `graph_blocks`: true for the nodes whose value, on two held samples, is one floating
    tensor with the batch dimension first (what the next block can be fed slice by slice)."""
    batched: set[str] = set()

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            value = super().run_node(node)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() and value.shape[0] == 2:
                batched.add(node.name)
            return value

    inputs = [held[n][:2] for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad(), folded_modes(_wrappers(gm, gm.graph.nodes), HARD):
        Recorder(gm).run(*inputs)
    return lambda node: node.name in batched


def _wrappers(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list[CoRaConv2d]:
    """The `CoRaConv2d` layers the ``nodes`` call (directly or merged with their BatchNorm)."""
    found = []
    for node in nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, ConvBatchNorm):
            module = module.conv
        if isinstance(module, CoRaConv2d):
            found.append(module)
    return found


def _reconstruct_block(gm: fx.GraphModule, blocks: list[Block], index: int, quantized: dict, teacher: dict,
                       check: _OutputCheck, settings: ReconstructConfig, result: ReconstructResult,
                       bar: tqdm) -> tuple[dict, dict]:
    """Learn block ``index``; return the held inputs of the next block (quantized model's, float model's)."""
    block = blocks[index]
    wrappers = _wrappers(gm, block.nodes)
    args = [_value(quantized, node) for node in block.inputs]
    target = _run(block.module, [_value(teacher, node) for node in block.inputs], wrappers, FLOAT)
    output = _run(block.module, args, wrappers, HARD)
    result.error_before.append(_error(output, target, check.part))
    learner = _BlockLearner(wrappers, settings)
    kept = True
    if learner.trainable:  # else only 8-bit layers without adapters: nothing to learn
        learner.learn(block.module, args, target, _split(args[0].shape[0])[0].stop, bar)
        saved = learner.apply()
        learned = _run(block.module, args, wrappers, HARD)
        loss = check.loss_after(index, learned)
        kept = not loss < check.current
        if kept:
            saved.restore()
        else:
            output, check.current = learned, loss
            result.changed_codes += learner.changed
    else:
        bar.update(settings.iterations)
    result.kept += kept
    result.blocks += 1
    result.error_after.append(_error(output, target, check.part))
    if block.output is None:
        return {}, {}
    return {block.output: output}, {block.output: target}


def _split(count: int) -> tuple[slice, slice]:
    """The held samples the steps draw from, and the fifth held out to check the block (all of them when fewer
    than 5 are held)."""
    if count < 5:
        return slice(0, count), slice(0, count)
    checked = max(1, count // 5)
    return slice(0, count - checked), slice(count - checked, count)


def _value(held: dict, node: fx.Node) -> Any:
    if node not in held:
        raise CoRaError(f"reconstruct: the block input {node.name!r} was not produced by the block before it; "
                        "the graph cannot be cut into single-entry blocks here")
    return held[node]


def _run(module: fx.GraphModule, args: list[torch.Tensor], wrappers: list[CoRaConv2d], mode: str) -> Any:
    """The block's output on all held samples, in chunks, without gradient; ``FLOAT`` runs the float block."""
    outputs = []
    count = args[0].shape[0]
    teacher = float_activations(module) if mode == FLOAT else nullcontext()
    with torch.no_grad(), folded_modes(wrappers, mode), teacher:
        for begin in range(0, count, _EVAL_CHUNK):
            outputs.append(module(*[a[begin:begin + _EVAL_CHUNK] for a in args]))
    leaves, spec = zip(*[pytree.tree_flatten(out) for out in outputs])
    joined = [torch.cat(column) if isinstance(column[0], torch.Tensor) else column[0] for column in zip(*leaves)]
    return pytree.tree_unflatten(joined, spec[0])


def _pairs(output: Any, target: Any, part: slice = slice(None)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, target) leaves with a floating target, on the samples ``part``."""
    return [(o[part], t[part]) for o, t in zip(pytree.tree_leaves(output), pytree.tree_leaves(target))
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _error(output: Any, target: Any, part: slice) -> float:
    """||output - target||^2 / ||target||^2 over the floating leaves, on the samples ``part``."""
    pairs = _pairs(output, target, part)
    num = sum(float((o.float() - t.float()).pow(2).sum()) for o, t in pairs)
    den = sum(float(t.float().pow(2).sum()) for _, t in pairs)
    return num / max(den, 1e-30)


def _mse(output: Any, target: Any) -> torch.Tensor:
    return sum(torch.mean((o - t) ** 2) for o, t in _pairs(output, target))


@dataclass
class _Saved:
    """What a block's layers held before `_BlockLearner.apply`, to put back."""

    layers: list[tuple[CoRaConv2d, Any, ResidualFactors, Optional[tuple[torch.Tensor, torch.Tensor]],
                       Optional[torch.Tensor]]]

    def restore(self) -> None:
        for wrapper, qw, factors, tuned, factor in self.layers:
            wrapper.quantized.set_quantized(qw)
            wrapper.quantized.channel_factor = factor
            wrapper.adapter.set_factors(factors)
            if tuned is not None:
                wrapper.adapter.set_tuned(*tuned)


class _BlockLearner:
    """The learnable rounding and adapter factors of one block's layers."""

    def __init__(self, wrappers: list[CoRaConv2d], settings: ReconstructConfig) -> None:
        self.settings = settings
        self.wrappers = wrappers
        self.float_weights = {w: _float_weight(w) for w in wrappers}
        self.roundings = {w: LearnedRounding(self.float_weights[w], w.quantized.quantized_weight())
                          for w in wrappers if w.quantized.bits < 8}
        self.adapters: dict[CoRaConv2d, tuple[nn.Parameter, nn.Parameter]] = {}
        for w in wrappers:
            if int(w.adapter.hard_rank) > 0:
                a, b = w.adapter.float_weights()
                learn = settings.adapter_lr > 0
                self.adapters[w] = (nn.Parameter(a.detach().clone(), requires_grad=learn),
                                    nn.Parameter(b.detach().clone(), requires_grad=learn))
        self.changed = 0

    @property
    def trainable(self) -> bool:
        return bool(self.roundings) or any(p.requires_grad for pair in self.adapters.values() for p in pair)

    def learn(self, module: fx.GraphModule, args: list[torch.Tensor], target: Any, count: int, bar: tqdm) -> None:
        """``iterations`` steps on batches drawn from the first ``count`` held samples."""
        settings = self.settings
        offsets = [r.offset for r in self.roundings.values()]
        factors = [p for pair in self.adapters.values() for p in pair if p.requires_grad]
        optimizer = torch.optim.Adam(factors, lr=settings.adapter_lr) if factors else None
        generator = torch.Generator().manual_seed(0)
        self._attach()
        try:
            with folded_modes(self.wrappers, TUNE):
                for step in range(settings.iterations):
                    index = torch.randint(count, (min(settings.batch_size, count),), generator=generator)
                    index = index.to(args[0].device)
                    output = module(*[a[index] for a in args])
                    loss = _mse(output, pytree.tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) else t,
                                                        target))
                    for p in offsets + factors:
                        p.grad = None
                    loss.backward()
                    distributed.average_gradients(offsets + factors)
                    rate = settings.lr * (1 - step / settings.iterations)
                    for rounding in self.roundings.values():
                        rounding.signed_step(rate)
                    if optimizer is not None:
                        optimizer.step()
                    bar.update(1)
        finally:
            self._detach()

    def _attach(self) -> None:
        for w, rounding in self.roundings.items():
            object.__setattr__(w.quantized, "learning_weight", rounding.weight)
        for w, pair in self.adapters.items():
            w.tuned = pair

    def _detach(self) -> None:
        for w in self.roundings:
            object.__setattr__(w.quantized, "learning_weight", None)
        for w in self.adapters:
            w.tuned = None

    @torch.no_grad()
    def apply(self) -> _Saved:
        """Write the learned codes and factors into the layers; what they held before is returned."""
        saved = _Saved([])
        for w in self.wrappers:
            adapter = w.adapter
            tuned = None if adapter.tuned_a is None else (adapter.tuned_a.clone(), adapter.tuned_b.clone())
            saved.layers.append((w, w.quantized.quantized_weight(), adapter.factors, tuned,
                                 w.quantized.channel_factor))
            if w in self.roundings:
                rounding = self.roundings[w]
                self.changed += rounding.changed()
                factor = w.quantized.channel_factor
                w.quantized.set_quantized(rounding.quantized())
                w.quantized.channel_factor = factor
                residual = self.float_weights[w] - w.quantized.weight
                adapter.set_factors(ResidualFactors(residual, w.quantized.spec.groups, None, adapter.policy != OFF))
            if w in self.adapters:
                adapter.set_tuned(*(p.detach() for p in self.adapters[w]))
        return saved


def _float_weight(wrapper: CoRaConv2d) -> torch.Tensor:
    """The float weight, exactly: [W]_n plus the full-rank residual (Theorem 1)."""
    factors = wrapper.adapter.factors
    return wrapper.quantized.weight + factors.folded_delta(torch.ones_like(factors.S[0]))
