"""Single-entry blocks of a graph: the pieces `reconstruct` learns one after another (docs/method.md s.17).

A *cut* is a node after which no other value of the graph is still needed: everything downstream reads only
the cut's output (constants fetched by ``get_attr`` aside). In a residual network the cuts fall between the
residual blocks (inside a block the skip branch is live as well); in a plain chain after every layer. The
graph between two cuts is a segment; segments without a learned layer are merged into the next one, so each
`Block` holds at least one learned layer, reads one value and produces one value (the last produces the
model's output).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx


@dataclass
class Block:
    """One segment of a graph as a GraphModule sharing the model's modules.

    Attributes:
        module: runs the segment: its placeholders are ``inputs``' values, its output the segment's value.
        inputs: the nodes of the whole graph whose values the segment reads (placeholders or the cut before).
        output: the node of the whole graph whose value the segment returns (None for the model's output).
        nodes: the segment's nodes in the whole graph, in order.
    """

    module: fx.GraphModule
    inputs: list[fx.Node]
    output: Any
    nodes: list[fx.Node]


def cut_positions(graph: fx.Graph) -> list[int]:
    """Indices (in ``graph.nodes`` order) of the nodes whose value alone is live after them."""
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((index[user] for user in node.users), default=i) for i, node in enumerate(nodes)}
    live: set[fx.Node] = set()
    cuts = []
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op != "get_attr" and node.users:
            live.add(node)
        live = {value for value in live if last_use[value] > i}
        if node.op != "placeholder" and live == {node}:
            cuts.append(i)
    return cuts


def graph_blocks(gm: fx.GraphModule, learned: Callable[[fx.Node], bool], min_layers: int = 1,
                 keep_cut: Callable[[fx.Node], bool] = lambda node: True) -> list[Block]:
    """``gm`` split at its cuts into blocks that each hold at least ``min_layers`` nodes for which ``learned``
    is true (the last block may hold fewer when the graph has no more).

    ``keep_cut(node)`` may refuse a cut (e.g. one whose value is not a batched tensor); the segments on
    both sides of a refused cut are one block."""
    count = lambda segment: sum(1 for n in segment if learned(n))  # noqa: E731
    nodes = list(gm.graph.nodes)
    bounds = [i for i in cut_positions(gm.graph) if keep_cut(nodes[i])]
    segments: list[list[fx.Node]] = []
    start = 0
    for end in bounds + [len(nodes) - 1]:
        segment = [n for n in nodes[start:end + 1] if n.op not in ("placeholder", "output")]
        start = end + 1
        if segments and count(segments[-1]) < min_layers:
            segments[-1].extend(segment)
        else:
            segments.append(segment)
    if len(segments) > 1 and count(segments[-1]) < min_layers:
        segments[-2].extend(segments.pop())
    output_node = nodes[-1]
    blocks = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        blocks.append(_block(gm, segment, output_node.args[0] if last else segment[-1]))
    return blocks


def _block(gm: fx.GraphModule, segment: Sequence[fx.Node], output: Any) -> Block:
    inside = set(segment)
    inputs: list[fx.Node] = []
    for used in [u for node in segment for u in node.all_input_nodes] + _nodes_in(output):
        if used not in inside and used.op != "get_attr" and used not in inputs:
            inputs.append(used)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {node: graph.placeholder(node.name) for node in inputs}

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:  # a constant fetched by get_attr outside the segment: fetched inside as well
            env[node] = graph.node_copy(node, lookup)
        return env[node]

    for node in segment:
        env[node] = graph.node_copy(node, lookup)
    graph.output(fx.map_arg(output, lookup))
    return Block(fx.GraphModule(gm, graph), inputs, output if isinstance(output, fx.Node) else None,
                 list(segment))


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.map_arg(value, lambda node: found.append(node) or node)
    return found
