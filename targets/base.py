"""The target registry and ``format:precision`` references.

A target package (``targets/<format>/``) writes one runnable artifact directory from a SourceModel
(streaming, one tensor at a time) and opens a :class:`~sovpack._protocols.Runner` on such a directory in its
own runtime; the contract is :class:`~sovpack._protocols.Target`. It registers itself with
``@register_target`` on import; ``load_targets`` imports every package under ``targets/``, so adding a
format is one package and nothing else. Orchestration (temp dirs, atomic rename, parity, metadata) lives in
``sovpack.convert``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from sovpack._io import hashing_copy, machine_memory, open_regular
from sovpack._plugins import Plugins, import_submodules
from sovpack._protocols import Precision, Target
from sovpack.errors import ConversionError, UsageError
from sovpack.parity.thresholds import THRESHOLD_KEYS, Thresholds, encoder_thresholds
from sovpack.quantize.options import QuantOptions
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec


def _discover_targets() -> None:
    import_submodules("sovpack.targets", packages_only=True)


TARGETS: Plugins[Target] = Plugins("target format", _discover_targets)

T = TypeVar("T")


def register_target(cls: type[T]) -> type[T]:
    """Class decorator: instantiate a target and register it under its ``name``."""
    instance = cast(Target, cls())
    TARGETS.add(instance.name, instance)
    return cls


def load_targets() -> None:
    """Import every target package under ``targets/`` now (reading ``TARGETS`` does it on first use)."""
    TARGETS.discover()


def precision_table(*rows: Precision) -> dict[str, Precision]:
    """A target's precision table keyed by name; aliases resolve through ``TargetRef.parse``."""
    table: dict[str, Precision] = {}
    for row in rows:
        if row.name in table:
            raise ValueError(f"precision {row.name!r} listed twice")
        table[row.name] = row
    return table


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetRef:
    """A ``format:precision`` reference such as ``gguf:q8_0``."""

    format: str
    precision: str

    def __str__(self) -> str:
        return f"{self.format}:{self.precision}"

    @classmethod
    def parse(cls, text: str) -> TargetRef:
        fmt, _, precision = text.partition(":")
        target = TARGETS.get(fmt.strip().lower())
        wanted = precision.strip().lower() or target.default_precision
        for row in target.precisions.values():
            if wanted == row.name or wanted in row.aliases:
                return cls(format=target.name, precision=row.name)
        raise UsageError(
            f"target {target.name!r} has no precision {wanted!r}; known: {', '.join(target.precisions)}"
        )

    @property
    def target(self) -> Target:
        return TARGETS.get(self.format)

    @property
    def info(self) -> Precision:
        return self.target.precisions[self.precision]

    def thresholds(self, *layers: Mapping[str, float | bool | None] | None, encoder: bool = False) -> Thresholds:
        """This precision's default limits with each layer of overrides applied in order (later wins);
        ``encoder``: an embedding encoder's limits (by the precision's weight type) instead of a decoder's."""
        merged: dict[str, float | bool | None] = {}
        for layer in layers:
            merged.update(layer or {})
        unknown = sorted(set(merged) - set(THRESHOLD_KEYS))
        if unknown:
            raise UsageError(f"unknown threshold name(s) {', '.join(unknown)}; known: {', '.join(THRESHOLD_KEYS)}")
        base = encoder_thresholds(self.info.weights) if encoder else self.info.thresholds
        return Thresholds.from_dict({**base.to_dict(), **merged}) if merged else base

    def check_quantization(self, options: QuantOptions | None) -> None:
        """Refuse, before any work, quantization options this target's format cannot honour (e.g. a 4-bit group
        size GGML's blocks lack); None means the defaults, which every target takes."""
        if options is not None:
            self.target.check_quantization(self.precision, options)

    def check_family(self, spec: ModelSpec) -> None:
        """Refuse, by name, a model family this target cannot write."""
        target = self.target
        if spec.family not in target.families:
            raise ConversionError(
                f"target {target.name!r} cannot write model family {spec.family!r}; it supports: "
                f"{', '.join(sorted(target.families))}"
            )


# What a conversion and its parity check need besides the runtime's weights: the interpreter, the runtimes'
# libraries, the numpy reference's per-layer weights, the runtime's KV cache and buffers.
BASE_MEMORY_BYTES = 2 << 30
# Share of the machine's memory a build may plan to use (the rest: page cache, the system).
MEMORY_SHARE = 0.9


def parity_memory(refs: Sequence[TargetRef], parameters: int) -> int:
    """Bytes the parity runs of ``refs`` need with all their runtimes open at once (one, as a build judges)."""
    return sum(ref.info.runtime_memory(parameters) for ref in refs) + BASE_MEMORY_BYTES


def check_runtime_memory(refs: Sequence[TargetRef], spec: ModelSpec, *, memory: int | None = None) -> None:
    """Refuse, before any work, a target whose artifact this machine cannot run for its parity check.

    Targets are checked one after the other, so each must fit on its own. The message names the target, the
    memory it would need and what the machine has.
    """
    have = machine_memory() if memory is None else memory
    parameters = spec.parameter_count()
    for ref in refs:
        need = parity_memory([ref], parameters)
        if need > MEMORY_SHARE * have:
            raise UsageError(
                f"{ref}: running this {parameters / 1e9:.1f}B-parameter model's artifact for its parity check "
                f"needs about {need / 2**30:.1f} GiB of memory; this machine has {have / 2**30:.1f} GiB "
                f"(at most {MEMORY_SHARE:.0%} of it is planned for); choose a smaller precision"
            )


# Files runtimes (and ``sovpack run``) read beside the weights, copied verbatim from the checkpoint.
SUPPORT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


def copy_support_files(model: SourceModel, out_dir: Path, names: Sequence[str] = SUPPORT_FILES) -> list[str]:
    """Copy tokenizer and config files that runtimes read beside the weights; returns what was copied."""
    copied = []
    for name in names:
        path = model.checkpoint.file(name)
        if path is not None:
            # NOTE: only regular files (a FIFO swapped in after the checks would block a plain copy).
            with open_regular(path) as src:
                hashing_copy(src, out_dir / name)
            copied.append(name)
    return copied
