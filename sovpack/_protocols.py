"""The contracts between stages, declared once: what a model family, an output format and a runner provide.

Data flows one way: checkpoint -> :class:`Family` (config -> canonical spec + tensor map) -> :class:`Target`
writer -> artifact directory -> :class:`Runner` on the target's runtime -> parity report -> bundle.
Everything a caller may use is a declared member; optional behaviour is a typed field with a default value
(:class:`RunnerTraits`), never an attribute probed with ``getattr``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from sovpack._io import Progress
    from sovpack.artifact import ArtifactMetadata
    from sovpack.parity.thresholds import Thresholds
    from sovpack.quantize.options import QuantOptions
    from sovpack.source.model import SourceModel
    from sovpack.source.spec import ModelSpec


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSource:
    """Where a canonical tensor comes from: a stored tensor, or one slice of a fused one.

    Applied in this order to the stored tensor ``name``: ``expert`` picks one index along axis 0 (a stack of
    experts); ``mxfp4_scales`` dequantizes MXFP4 blocks [rows, groups, 16] with those scales [rows, groups]
    to float32 [rows, groups * 32]; ``transpose`` swaps the last two axes (stored "in x out", as gpt-oss's fused
    experts are); ``rows`` [start, stop) with ``row_step`` takes a strided row range (fused q/k/v, gate/up,
    interleaved gate/up); ``add`` is added last (Gemma's norm offset). ``stored_shape``: the exact shape the
    config implies for the stored (fused) tensor, checked when the model is opened. ``alternative``: the same
    canonical tensor in another layout a checkpoint may store instead (see ``converters.base.stored_layout``).
    Every field defaults to "as stored", so a plain map entry is just a name.
    """

    name: str
    rows: tuple[int, int] | None = None  # [start, stop) along axis 0, for fused weights
    add: float = 0.0  # added after reading (Gemma's norm offset)
    expert: int | None = None  # one expert of a stacked [num_experts, ...] tensor
    row_step: int = 1  # stride of ``rows`` (2: one half of an interleaved gate/up)
    transpose: bool = False  # swap the last two axes after ``expert`` (and dequantization)
    mxfp4_scales: str | None = None  # ``name`` holds MXFP4 blocks (U8); this tensor their E8M0 scales (U8)
    stored_shape: tuple[int, ...] | None = None  # exact shape of ``name`` (None: implied by the canonical shape)
    alternative: TensorSource | None = None  # another layout of the same tensor, used when a checkpoint has it


class Family(Protocol):
    """One source model family (Llama, Qwen2, ...): Hugging Face config and tensor names -> canonical ones."""

    name: str
    architectures: tuple[str, ...]

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec: ...

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class RunnerTraits:
    """What a runtime is known not to do exactly, published by the target that wrote the artifact.

    ``parity_limits``: threshold values looser than the defaults that the runtime cannot beat (e.g. ggml's
    float16 GELU table); applied beneath the user's overrides and recorded in the report.
    ``known_tokenizer_divergences``: corpus texts the runtime's tokenizer encodes differently (reported, not
    judged).
    """

    parity_limits: Mapping[str, float] = field(default_factory=dict)
    known_tokenizer_divergences: tuple[str, ...] = ()


class Runner(Protocol):
    """A model opened on some runtime: the numpy reference, or an artifact on its own runtime.

    The parity harness, ``sovpack run`` and ``sovpack parity`` use exactly these members.
    """

    name: str
    traits: RunnerTraits

    def tokenize(self, text: str) -> list[int] | None:
        """Encode ``text`` as a prompt with the artifact's own tokenizer (BOS etc. included); None if it has none."""
        ...

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, vocab] (float32) from one forward pass over ``ids``."""
        ...

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Generated ids only (a produced stop token included), decoded through the runtime's own KV cache."""
        ...

    def run_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[PromptRun]:
        """Each prompt's prefill logits and greedy continuation, in prompt order: what parity compares.

        A runtime that takes padded batches runs all prompts at once (one prefill, greedy steps in lockstep);
        one that takes a single sequence answers with :func:`run_each`.
        """
        ...

    def runtime_info(self) -> dict[str, str]:
        """Runtime name/version, device, precision hints: recorded in the report for provenance."""
        ...

    def close(self) -> None:
        """Release the runtime's sessions and memory maps; the runner is unusable afterwards."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class PromptRun:
    """One prompt through a runner: its prefill logits [T, vocab] (float32) and the greedy continuation (a
    produced stop token included). The harness checks both, so a runtime's odd answer is reported, not trusted."""

    logits: np.ndarray
    tokens: Sequence[int]


def run_each(
    runner: Runner, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[PromptRun]:
    """``run_prompts`` for a runtime that takes one sequence at a time: prefill, then greedy, prompt by prompt."""
    return [
        PromptRun(logits=runner.prefill_logits(ids), tokens=runner.greedy(ids, max_new_tokens, stop_ids))
        for ids in prompts
    ]


@dataclass(frozen=True, kw_only=True, slots=True)
class Embeddings:
    """What an embedding runner returns for one batch of texts.

    ``embeddings`` [B, hidden]: the pooled (and, where the model's pipeline says so, L2-normalised) sentence
    embeddings. ``hidden`` [B, T, hidden]: the token states before pooling, right-padded to the longest input,
    where the runtime exposes them (None where it only returns pooled vectors).
    """

    embeddings: np.ndarray
    hidden: np.ndarray | None = None


class EmbeddingRunner(Protocol):
    """An embedding-encoder artifact opened on its runtime (or the numpy reference): texts -> vectors.

    ``embed_ids`` runs the model on token ids the caller chose (one padded batch): it judges the graph.
    ``embed_texts`` goes through the runtime's own text pipeline (its tokenizer, truncation, pooling), as a
    user calls it; None where the runtime has no such pipeline.
    """

    name: str
    traits: RunnerTraits

    def tokenize(self, text: str) -> list[int] | None:
        """The artifact's own tokenizer on ``text`` (special tokens and truncation included); None if none."""
        ...

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> Embeddings: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray | None: ...

    def runtime_info(self) -> dict[str, str]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Precision:
    """One row of a target's precision table.

    ``weights`` is the ModelPack precision of the stored weights (float32, float16, bfloat16, int8, int4, ...);
    ``quantized`` is true for integer weight formats; ``thresholds`` are the default parity limits;
    ``runtime_floor`` the oldest runtime version known to run it, where the precision alone decides that.
    """

    name: str
    weights: str
    quantized: bool
    thresholds: Thresholds
    aliases: tuple[str, ...] = ()
    runtime_floor: str | None = None
    # Anonymous memory per model weight the runtime allocates to run the artifact (its parity check); None:
    # the stored width (RUNTIME_BYTES_PER_WEIGHT). A runtime that widens or memory-maps weights says so.
    runtime_bytes_per_weight: float | None = None

    def runtime_memory(self, parameters: int) -> int:
        """Bytes of memory the runtime needs to run a ``parameters``-weight model at this precision."""
        per = self.runtime_bytes_per_weight
        if per is None:
            per = RUNTIME_BYTES_PER_WEIGHT.get(self.weights, 4.0)
        return int(per * parameters)


# Stored width per weight (plus group scales for 4-bit), the runtime's memory unless a row says otherwise.
RUNTIME_BYTES_PER_WEIGHT = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.1, "int4": 0.65}


@dataclass(frozen=True, kw_only=True, slots=True)
class WrittenArtifact:
    """What a writer reports: the files it wrote (relative POSIX paths) and what the runner will need."""

    files: tuple[str, ...]
    format_metadata: Mapping[str, Any] = field(default_factory=dict)
    traits: RunnerTraits = field(default_factory=RunnerTraits)


class Target(Protocol):
    """One output format (onnx, gguf, openvino): a streaming writer and a runner on the format's runtime.

    A target names itself once (``name``), owns its precision table, the Python packages its runtime needs
    (recorded in provenance) and the model families it can write; asked for any other family it refuses by
    name (``check_family``).
    """

    name: str
    precisions: Mapping[str, Precision]
    default_precision: str
    runtime_packages: tuple[str, ...]
    families: frozenset[str]

    def check_quantization(self, precision: str, options: QuantOptions) -> None:
        """Refuse (UsageError) quantization options this format cannot honour at ``precision``; a build asks every
        target before any work, so a refusal never comes at the target's turn."""
        ...

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress, *,
              quant: QuantOptions | None = None) -> WrittenArtifact:
        """Write the artifact; ``quant`` steers 4-bit precisions (None: QuantOptions() defaults)."""
        ...

    def open_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> Runner: ...

    def open_embedding_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> EmbeddingRunner:
        """The runner of an embedding-encoder artifact (``metadata.spec.encoder`` set)."""
        ...
