"""torch.fx tracing with user leaf modules, fixed (concrete) arguments, and an error that names the
untraceable module, the source line and what to change."""
from __future__ import annotations

import inspect
import os
import re
import traceback
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch.fx as fx
from torch import nn

from cora_fx.errors import CoRaTraceError

_TORCH_DIR = os.path.dirname(fx.__file__).rpartition(os.sep)[0]
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the cora_fx package

LeafSpec = Union[str, type]


class CoRaTracer(fx.Tracer):
    """An fx.Tracer that keeps user-named modules opaque and remembers where tracing failed.

    ``leaf_classes``/``leaf_names`` play the role of torch.ao's
    ``non_traceable_module_classes``/``non_traceable_module_names``.
    """

    def __init__(self, leaf_classes: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaf_classes = leaf_classes
        self.leaf_names = leaf_names
        self.failing_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_classes):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failing_module is None:
                self.failing_module = self.path_of_module(m)
            raise


def split_leaf_specs(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> tuple[tuple[type, ...], frozenset[str]]:
    """Validate ``leaf_modules`` (module classes and/or qualified names) against ``model``."""
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    classes, names = [], []
    known = dict(model.named_modules())
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            classes.append(spec)
        elif isinstance(spec, str):
            if spec not in known or spec == "":
                raise ValueError(f"leaf_modules: {spec!r} is not a submodule of the model")
            names.append(spec)
        else:
            raise TypeError(f"leaf_modules: {spec!r} is neither an nn.Module class nor a qualified module name")
    return tuple(classes), frozenset(names)


def leaf_names(model: nn.Module, classes: tuple[type, ...], names: frozenset[str]) -> set[str]:
    """Qualified names of the submodules that `split_leaf_specs`' classes and names select."""
    return {name for name, m in model.named_modules() if name and (name in names or isinstance(m, classes))}


def trace(model: nn.Module, leaf_modules: Iterable[LeafSpec] = (),
          concrete_args: Optional[Mapping[str, Any]] = None) -> tuple[fx.GraphModule, set[str]]:
    """Symbolically trace ``model`` with ``concrete_args`` fixed; return the GraphModule and the leaves."""
    classes, names = split_leaf_specs(model, leaf_modules)
    tracer = CoRaTracer(classes, names)
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as err:
        raise _trace_error(model, tracer.failing_module, err, concrete_args or {}) from err
    _drop_specialised_inputs(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm, leaf_names(model, classes, names)


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """Remove the inputs torch.fx keeps for ``concrete_args`` with their value checks: the captured
    forward then takes the remaining (tensor) inputs alone, as the export path's does."""
    checks = [n for n in graph.nodes if n.op == "call_function" and len(n.args) > 1
              and isinstance(n.args[1], str) and "has been specialized to have value" in n.args[1]]
    for check in checks:
        pending = [check]
        while pending:
            node = pending.pop()
            if node.users or node.op == "output":
                continue
            inputs = list(node.all_input_nodes)
            graph.erase_node(node)
            pending += inputs


def _user_line(err: Exception) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the traceback that is the model's own code (not torch's, not cora_fx's)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _OWN_DIR)) and "<eval_with_key>" not in f.filename]
    return frames[-1] if frames else None


def _advice(model: nn.Module, failing: Optional[str], frame: Optional[traceback.FrameSummary],
            fixed: Mapping[str, Any]) -> str:
    """What to change, from the source line that failed."""
    line = (frame.line or "") if frame else ""
    owner = model.get_submodule(failing) if failing else model
    arguments = [p.name for p in inspect.signature(owner.forward).parameters.values()
                 if p.name not in fixed and "Tensor" not in str(p.annotation)]
    named = [a for a in arguments if re.search(rf"\b{re.escape(a)}\b", line)]
    tips = []
    if named and not failing:
        tips.append(f"if '{named[-1]}' is a flag or a size, fix it: concrete_args={{'{named[-1]}': <value>}}")
    if re.search(r"\.shape|\.size\(|\bsize\(|len\(|\.dim\(|numel\(", line):
        tips.append("branches on a tensor's shape: capture='export' (with example_inputs) specialises static shapes")
    if failing:
        cls = type(owner).__name__
        tips.append(f"mark it as a leaf so it is kept as an opaque call: leaf_modules=['{failing}'] or "
                    f"leaf_modules=[{cls}] (Conv2d layers inside a leaf stay float)")
    else:
        tips.append("move data-dependent code into a submodule and pass it in leaf_modules=[...]")
    return "; ".join(tips)


def _trace_error(model: nn.Module, failing: Optional[str], err: Exception,
                 fixed: Mapping[str, Any]) -> CoRaTraceError:
    reason = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    frame = _user_line(err)
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else ""
    what = (f"module '{failing}' ({type(model.get_submodule(failing)).__name__})" if failing
            else f"the forward of {type(model).__name__} itself")
    return CoRaTraceError(f"torch.fx cannot trace {what}{where} ({reason}). To fix: "
                          f"{_advice(model, failing, frame, fixed)}.", failing or "")
