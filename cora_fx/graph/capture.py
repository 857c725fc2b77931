"""Capturing a user's model as a torch.fx GraphModule (docs/method.md section 12).

Two paths, chosen by ``capture=``:

- ``"symbolic"``: `torch.fx` symbolic tracing (`tracer.CoRaTracer`), specialised on the example
  inputs: every ``forward`` argument the example inputs do not give is fixed to its default value
  (``concrete_args``, as in ``torch.fx.symbolic_trace``), so ``forward(x, embed=False)`` traces.
- ``"export"``: ``torch.export`` (non-strict) on the example inputs, which specialises static shapes
  (``if x.shape[-1] > 64:``) and Python control flow; the aten-level BatchNorm calls of the model's own
  layers are turned back into modules (`ModulesFromCalls`), and `lifting` does the same for conv and linear
  calls on either path, so the rest of cora_fx sees the same layers, under the same names.
- ``"auto"`` (default): symbolic, and export when symbolic tracing fails and example inputs exist.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from cora_fx.errors import CoRaError, CoRaTraceError
from cora_fx.graph.tracer import leaf_names, split_leaf_specs, trace

CAPTURES = ("auto", "symbolic", "export")
CAPTURE_OPTIONS = frozenset({"example_inputs", "leaf_modules", "example_kwargs", "concrete_args", "capture"})
_ATEN = torch.ops.aten


@dataclass
class Captured:
    """A captured model: the GraphModule, the leaf module names kept opaque (or float), the
    arguments fixed to constants, and the path that produced it."""

    gm: fx.GraphModule
    leaves: set[str]
    concrete_args: dict[str, Any] = field(default_factory=dict)
    method: str = "symbolic"


def specialised_arguments(model: nn.Module, example_inputs: Optional[tuple],
                          example_kwargs: Optional[Mapping[str, Any]],
                          concrete_args: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Arguments of ``model.forward`` fixed while tracing: the defaults of those the example inputs do
    not give, example values that are not tensors (flags, sizes), then ``concrete_args`` on top."""
    example_inputs = example_inputs or ()
    example_kwargs = dict(example_kwargs or {})
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = {p.name for p in params}
    for argument, given in (("example_kwargs", example_kwargs), ("concrete_args", concrete_args or {})):
        for name in sorted(set(given) - names):
            raise ValueError(f"{argument}: {type(model).__name__}.forward has no argument '{name}'; "
                             f"its arguments are {sorted(names)}")
    fixed: dict[str, Any] = {}
    for index, p in enumerate(params):
        if p.kind is not p.KEYWORD_ONLY and index < len(example_inputs):
            value = example_inputs[index]
        else:
            value = example_kwargs.get(p.name, p.default)
        if value is not p.empty and not isinstance(value, torch.Tensor):
            fixed[p.name] = value
    fixed.update(concrete_args or {})
    return fixed


def capture(model: nn.Module, leaf_modules: Any = (), example_inputs: Optional[tuple] = None,
            example_kwargs: Optional[Mapping[str, Any]] = None,
            concrete_args: Optional[Mapping[str, Any]] = None, method: str = "auto") -> Captured:
    """Capture ``model`` with ``method`` (see the module docstring); errors name what to change."""
    if method not in CAPTURES:
        raise ValueError(f"capture={method!r} must be one of {CAPTURES}")
    if concrete_args is not None and not isinstance(concrete_args, Mapping):
        raise TypeError("concrete_args must be a dict {argument name: value}")
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError("example_kwargs must be a dict {argument name: value}")
    fixed = specialised_arguments(model, example_inputs, example_kwargs, concrete_args)
    if method == "export":
        return _export(model, leaf_modules, example_inputs, example_kwargs, fixed)
    try:
        gm, leaves = trace(model, leaf_modules, fixed)
    except CoRaTraceError as err:
        if method == "symbolic" or example_inputs is None:
            raise
        try:
            captured = _export(model, leaf_modules, example_inputs, example_kwargs, fixed)
        except CoRaError as export_err:
            raise CoRaTraceError(f"{err} torch.export failed as well: {export_err}", err.module) from err
        warnings.warn(f"{type(model).__name__}: symbolic tracing failed ({err}); captured with torch.export "
                      "instead (capture='export': static shapes, eval-mode behaviour)", stacklevel=3)
        return captured
    return Captured(gm, leaves, fixed, "symbolic")


def _export(model: nn.Module, leaf_modules: Any, example_inputs: Optional[tuple],
            example_kwargs: Optional[Mapping[str, Any]], fixed: dict[str, Any]) -> Captured:
    """``torch.export`` in eval mode on the example inputs, then `ModulesFromCalls`."""
    if example_inputs is None:
        raise CoRaError("capture='export' needs example_inputs: torch.export specialises on them")
    args, dynamic = batch_dynamic_shapes(example_tensors(example_inputs), torch.export.Dim.AUTO)
    kwargs = example_tensors(example_kwargs or {})
    try:
        with _bound_for_export(model, fixed):
            program = torch.export.export(model, args, kwargs=kwargs or None, strict=False,
                                          dynamic_shapes=None if kwargs else dynamic)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".strip().splitlines()[0]
        raise CoRaError(f"torch.export cannot capture {type(model).__name__}: {reason}") from err
    unlifted = program.module()
    leaves = _leaf_prefixes(model, leaf_modules)
    ModulesFromCalls(leaves)(unlifted)
    # A plain GraphModule (ep.module() refuses train()/eval()), keeping the in/out pytree specs.
    gm = fx.GraphModule(unlifted, unlifted.graph, type(model).__name__)
    for spec in ("_in_spec", "_out_spec"):
        if hasattr(unlifted, spec):
            setattr(gm, spec, getattr(unlifted, spec))
    return Captured(gm, leaves, fixed, "export")


@contextlib.contextmanager
def _bound_for_export(model: nn.Module, fixed: dict[str, Any]) -> Iterator[None]:
    """The model in eval mode with the fixed arguments bound to its forward (so the captured forward takes
    the tensors alone); its own forward and mode are put back afterwards."""
    own_forward = model.__dict__.get("forward")
    was_training = model.training
    model.eval()
    model.forward = functools.partial(own_forward or type(model).forward.__get__(model), **fixed)
    try:
        yield
    finally:
        if own_forward is None:
            del model.forward
        else:
            model.forward = own_forward
        model.train(was_training)


def _leaf_prefixes(model: nn.Module, leaf_modules: Any) -> set[str]:
    """Qualified names of the leaf modules: under export their layers stay float aten calls."""
    return leaf_names(model, *split_leaf_specs(model, leaf_modules))


class ModulesFromCalls:
    """Turn aten batch_norm calls on a module's own tensors back into nn.BatchNorm2d modules named after that
    module (export capture); conv and linear calls become modules in `lifting.LiftFunctionalLayers`, for both
    capture paths.

    A call is converted only when its weight is the ``weight`` of a module that holds nothing but
    that layer's tensors (what unlifting an nn.BatchNorm2d leaves); calls inside ``leaves`` stay as they are.
    """

    def __init__(self, leaves: set[str]) -> None:
        self.leaves = leaves

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        built: dict[str, nn.Module] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _BUILDERS:
                continue
            path = _owner(gm, node)
            if path is None or any(path == leaf or path.startswith(leaf + ".") for leaf in self.leaves):
                continue
            if path not in built:
                module = _BUILDERS[node.target](gm, node)
                if module is None:
                    continue
                built[path] = module
                _replace_submodule(gm, path, module)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(path, (node.args[0],))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
        return PassResult(gm, bool(built))


def _owner(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The qualified name of the module whose ``weight`` the call reads, when it holds only that layer."""
    weight = node.args[1] if len(node.args) > 1 else None
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or not str(weight.target).endswith(".weight"):
        return None
    path = str(weight.target).rpartition(".")[0]
    owner = gm.get_submodule(path)
    own = {n for n, _ in owner.named_parameters(recurse=False)} | {n for n, _ in owner.named_buffers(recurse=False)}
    if list(owner.children()) or not own <= {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}:
        return None
    for arg in node.args[2:]:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and str(arg.target).rpartition(".")[0] != path:
            return None
    return path


def _attr(gm: fx.GraphModule, arg: Any) -> Optional[torch.Tensor]:
    """The parameter or buffer a get_attr node reads; None for anything else."""
    return _get(gm, str(arg.target)) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _get(gm: fx.GraphModule, target: str) -> torch.Tensor:
    path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(path) if path else gm, name)


def _batch_norm(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    x, weight, bias, mean, var, training, momentum, eps = list(node.args[:8])
    shape = getattr(x, "meta", {}).get("val")
    mean_t, var_t = _attr(gm, mean), _attr(gm, var)
    if training or mean_t is None or var_t is None or shape is None or shape.dim() != 4:
        return None
    weight_t, bias_t = _attr(gm, weight), _attr(gm, bias)
    bn = nn.BatchNorm2d(mean_t.numel(), eps=eps, momentum=momentum, affine=weight_t is not None, device="meta")
    if weight_t is not None:
        bn.weight, bn.bias = weight_t, bias_t
    bn.running_mean, bn.running_var = mean_t, var_t
    owner = gm.get_submodule(str(mean.target).rpartition(".")[0])
    bn.num_batches_tracked = getattr(owner, "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return bn


_BUILDERS = {_ATEN.batch_norm.default: _batch_norm}


def _replace_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def example_tensors(values: Any) -> Any:
    """The tensors of example inputs (a tuple) or keyword inputs (a dict): other values are fixed."""
    if isinstance(values, Mapping):
        return {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    return tuple(v for v in values if isinstance(v, torch.Tensor))


def batch_dynamic_shapes(example_inputs: tuple, batch: Any) -> tuple[tuple, tuple]:
    """Example inputs and ``dynamic_shapes`` with dim 0 of every tensor given as ``batch`` (a
    ``torch.export.Dim``). torch.export specializes a size-1 dim, so a batch of 1 is traced as a batch
    of 2 (the same rows twice)."""
    return _shapes(example_inputs, batch, size=False)


def dynamic_shapes(example_inputs: tuple, batch: bool, size: bool) -> tuple[tuple, Optional[tuple]]:
    """Example inputs and ``torch.export`` ``dynamic_shapes`` of a model's inputs (``None`` when neither is asked).

    ``batch``: dim 0 of every tensor is one shared ``Dim("batch", min=1)``; an example batch of 1 is then traced
    as a batch of 2. ``size``: dims 2.. of every tensor (an image's height and width) are ``Dim.DYNAMIC(min=2)``,
    not named Dims: a strided conv guards that its output is not 1 wide, a range a named ``min=2`` Dim refuses,
    while a hint lets torch.export narrow the range and still raises a constraint violation when the model fixes
    the size to a constant.
    """
    if not (batch or size):
        return example_inputs, None
    return _shapes(example_inputs, torch.export.Dim("batch", min=1) if batch else None, size)


def _shapes(example_inputs: tuple, batch: Any, size: bool) -> tuple[tuple, tuple]:
    """`dynamic_shapes` with ``batch`` the Dim of dim 0 (None: static) and symbolic dims 2.. when ``size``."""
    if batch is not None:
        example_inputs = tuple(torch.cat([x, x]) if _is_batched(x) and x.shape[0] == 1 else x
                               for x in example_inputs)
    shapes: list[Optional[dict[int, Any]]] = []
    for index, x in enumerate(example_inputs):
        dims: dict[int, Any] = {0: batch} if _is_batched(x) and batch is not None else {}
        if size and isinstance(x, torch.Tensor):
            dims.update(_size_dims(index, x))
        shapes.append(dims or None)
    return example_inputs, tuple(shapes)


def _size_dims(index: int, x: torch.Tensor) -> dict[int, Any]:
    """Symbolic dims 2.. of the example input ``x`` (input number ``index``)."""
    for d in range(2, x.dim()):
        if x.shape[d] < 2:
            raise ValueError(f"dynamic_size: example input {index} has size {x.shape[d]} in dim {d}; torch.export "
                             "specializes sizes 0 and 1, give an example of at least 2 there")
    return {d: torch.export.Dim.DYNAMIC(min=2) for d in range(2, x.dim())}


def _is_batched(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0
