"""Small edits of a GraphModule's module tree shared by the prepare and convert passes."""
from __future__ import annotations

from typing import Iterator

import torch.fx as fx
from torch import nn


def set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at ``qualname``; children of the module it replaces that the new one lacks are kept on it
    (a lifted layer's padding module, say), so graph targets below ``qualname`` keep resolving."""
    parent_name, _, leaf = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, leaf, None)
    if isinstance(old, nn.Module) and old is not module:
        inside = set(module.modules())
        for name, child in old.named_children():
            if not hasattr(module, name) and child not in inside:
                module.add_module(name, child)
    setattr(parent, leaf, module)


def module_calls(gm: fx.GraphModule, kind: type) -> Iterator[tuple[fx.Node, nn.Module]]:
    """(node, module) for every call_module node whose module is a ``kind``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, kind):
                yield node, module


def plain(module: nn.Module, base: type, method: str) -> bool:
    """True when ``module`` computes exactly what ``base`` does (no overridden forward)."""
    cls = type(module)
    return cls.forward is base.forward and getattr(cls, method) is getattr(base, method)
