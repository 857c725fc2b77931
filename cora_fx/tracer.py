"""torch.fx tracing with user leaf modules and an error that names the untraceable module."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch.fx as fx
from torch import nn

from .state import CoRaError

LeafSpec = Union[str, type]


class CoRaTraceError(CoRaError):
    """The model could not be traced; ``module`` is the innermost failing qualified name."""

    def __init__(self, message: str, module: str) -> None:
        super().__init__(message)
        self.module = module


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


def trace(model: nn.Module, leaf_modules: Iterable[LeafSpec] = ()) -> tuple[fx.GraphModule, set[str]]:
    """Symbolically trace ``model``; return the GraphModule and the qualified names of the leaves."""
    classes, names = split_leaf_specs(model, leaf_modules)
    tracer = CoRaTracer(classes, names)
    try:
        graph = tracer.trace(model)
    except Exception as err:
        raise _trace_error(model, tracer.failing_module, err) from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    leaves = {name for name, m in model.named_modules() if name and (name in names or isinstance(m, classes))}
    return gm, leaves


def _trace_error(model: nn.Module, failing: Optional[str], err: Exception) -> CoRaTraceError:
    reason = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    if not failing:
        return CoRaTraceError(
            f"torch.fx cannot trace the forward of {type(model).__name__} itself ({reason}). "
            "Move the data-dependent code into a submodule and pass it in leaf_modules=...",
            "",
        )
    cls = type(model.get_submodule(failing)).__name__
    return CoRaTraceError(
        f"torch.fx cannot trace module '{failing}' ({cls}): {reason}. Mark it as a leaf so it is "
        f"kept as an opaque call: prepare_cora(..., leaf_modules=['{failing}']) or "
        f"leaf_modules=[{cls}] (Conv2d layers inside a leaf stay float).",
        failing,
    )
