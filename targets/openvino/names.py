"""Deterministic node names for the OpenVINO graphs this target builds (decoder, tokenizer, detokenizer).

OpenVINO's default names (``Parameter_1126``) come from a process-wide instance counter, so a second conversion
in the same process would otherwise write a different IR for the same checkpoint, and sovpack's artifacts must
be byte-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# OpenVINO's generated names: the op type, "_", the process-wide instance number, and for nodes a pass derives
# from another (PrePostProcessor's Converts) "." and an output index: Parameter_1126, RaggedToDense_129.0.
_AUTO_NAME = re.compile(r"[A-Z][A-Za-z0-9]*_[0-9]+(?:\.[0-9]+)*")


def is_generated_name(name: str) -> bool:
    """Whether ``name`` looks like one OpenVINO made up from its process-wide counter (``Constant_4711``)."""
    return _AUTO_NAME.fullmatch(name) is not None


class NodeNames:
    """Deterministic friendly names for the nodes of one graph build.

    Nodes built inside ``scope(block)`` without an explicit name become ``{block}/{OpType}_{k}``, ``k`` counting
    per block from 0 in build order; explicit names are kept as given (and must not look generated).
    """

    def __init__(self, scope: str) -> None:
        self._scope = scope
        self._counts: dict[str, int] = {}

    @contextmanager
    def scope(self, block: str) -> Iterator[None]:
        outer, self._scope = self._scope, block
        try:
            yield
        finally:
            self._scope = outer

    def next_name(self, type_name: str) -> str:
        k = self._counts.get(self._scope, 0)
        self._counts[self._scope] = k + 1
        return f"{self._scope}/{type_name}_{k}"

    def name(self, node: Any) -> Any:
        node.set_friendly_name(self.next_name(node.get_type_name()))
        return node


class NamedOps:
    """An opset module whose factories name each node they make through a :class:`NodeNames`."""

    def __init__(self, opset: Any, names: NodeNames) -> None:
        self._opset = opset
        self._names = names

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        factory = getattr(self._opset, attr)
        names = self._names

        def make(*args: Any, name: str | None = None, **kwargs: Any) -> Any:
            made = factory(*args, **kwargs)
            node = made.get_node() if hasattr(made, "get_node") else made
            # Set here, not passed on: some factories (unsqueeze, assign) accept ``name=`` and ignore it.
            if name is None:
                names.name(node)
            else:
                node.set_friendly_name(name)
            return made

        return make


def canonicalize_names(model: Any, prefix: str) -> int:
    """Replace OpenVINO-generated node and tensor names in ``model`` by deterministic ones; returns how many nodes.

    Nodes are visited in ``get_ordered_ops()`` order (topological, fixed by the graph's structure) and a node whose
    friendly name is generated becomes ``{prefix}/{OpType}_{k}`` with ``k`` counting from 0. Meaningful names
    (``input_ids``, ``string_output``, the decoder's ``layers.3.q/matmul``) are kept. Generated tensor names are
    dropped; a tensor left with no name takes its node's new name (so inputs keep one, as before).
    """
    names = NodeNames(prefix)
    renamed = 0
    for node in model.get_ordered_ops():
        if is_generated_name(node.get_friendly_name()) or node.get_friendly_name() == node.get_name():
            names.name(node)
            renamed += 1
        for output in node.outputs():
            tensor_names = set(output.get_names())
            kept = {n for n in tensor_names if not is_generated_name(n)}
            if kept != tensor_names:
                output.get_tensor().set_names(kept or {node.get_friendly_name()})
    return renamed
