"""The reference's answers recorded once per build, and replayed as a Runner for every target's parity check.

``record_reference`` runs the numpy reference once over all parity prompts (batched, greedy decoding in
lockstep) and keeps, per prompt, the token ids, the greedy tokens and the fp32 logits rows: the prompt's
prefill rows, then the rows that chose greedy tokens 2..n. That is everything the harness asks of the
reference, so N targets cost one reference pass, and the same records go into the bundle so a deploy site
re-checks parity without the checkpoint (``sovpack parity``).

For a mixture of experts each prompt also keeps, per logits row, the reference router's smallest relative gap
between the k-th and (k+1)-th expert over the sparse layers (``ReferenceModel.router_gaps``): where it is below
the margin parity judges by, the reference itself nearly routed the token elsewhere, so a target that flips
an expert there and picks another token has made no conversion error.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sovpack._io import Progress, no_progress
from sovpack._protocols import PromptRun, RunnerTraits, run_each
from sovpack.errors import ParityError, VerificationError
from sovpack.parity.prompts import DEFAULT_MAX_NEW_TOKENS, PROMPT_LABELS, PROMPTS, encode_prompts
from sovpack.parity.report import round_metric
from sovpack.source.model import SourceModel

REFERENCE_TOKENIZER = "tokenizer.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferencePrompt:
    """One parity prompt as the reference saw it: ids, greedy tokens, and the logits layer that holds them."""

    index: int
    label: str | None
    ids: tuple[int, ...]
    greedy_ids: tuple[int, ...]
    logits: str  # layer title, e.g. logits-00.npy
    rows: int  # len(ids) + max(len(greedy_ids) - 1, 0)
    router_gaps: tuple[float, ...] | None = None  # per row, the smallest router gap (MoE); None for dense models

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index,
            "label": self.label,
            "ids": list(self.ids),
            "greedy_ids": list(self.greedy_ids),
            "logits": self.logits,
            "rows": self.rows,
        }
        # NOTE: absent, not null, for dense models: their configs (and so bundle digests) stay as they were.
        if self.router_gaps is not None:
            data["router_gaps"] = list(self.router_gaps)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferencePrompt:
        return cls(
            index=int(data["index"]),
            label=data.get("label"),
            ids=tuple(int(i) for i in data["ids"]),
            greedy_ids=tuple(int(i) for i in data["greedy_ids"]),
            logits=str(data["logits"]),
            rows=int(data["rows"]),
            router_gaps=None if (gaps := data.get("router_gaps")) is None else tuple(float(g) for g in gaps),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferenceConfig:
    """The parity reference manifest's config: what a re-check needs besides the logits themselves."""

    schema_version: int = 1
    vocab_size: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    tokenizer: str | None
    reference_runtime: Mapping[str, str]
    prompts: tuple[ReferencePrompt, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "vocab_size": self.vocab_size,
            "max_new_tokens": self.max_new_tokens,
            "stop_ids": list(self.stop_ids),
            "tokenizer": self.tokenizer,
            "reference_runtime": dict(self.reference_runtime),
            "prompts": [p.to_dict() for p in self.prompts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceConfig:
        from jsonschema import ValidationError

        from sovpack._schemas import validate

        try:
            validate(dict(data), "parity-reference")
        except ValidationError as e:
            raise VerificationError(f"parity reference config is invalid: {e.message}") from None
        for prompt in data["prompts"]:
            gaps = prompt.get("router_gaps")
            if gaps is not None and len(gaps) != prompt["rows"]:
                raise VerificationError(
                    f"parity reference config is invalid: prompt {prompt['index']} has {len(gaps)} router gaps "
                    f"for {prompt['rows']} logits rows"
                )
        return cls(
            schema_version=int(data["schema_version"]),
            vocab_size=int(data["vocab_size"]),
            max_new_tokens=int(data["max_new_tokens"]),
            stop_ids=tuple(int(i) for i in data["stop_ids"]),
            tokenizer=data.get("tokenizer"),
            reference_runtime={str(k): str(v) for k, v in data["reference_runtime"].items()},
            prompts=tuple(ReferencePrompt.from_dict(p) for p in data["prompts"]),
        )


class RecordedReference:
    """The reference side of parity, answered from recorded logits (a Runner without a tokenizer).

    ``prefill_logits`` answers for a prompt, or a prompt plus a prefix of the reference's own greedy tokens
    (what the harness asks at a greedy divergence); anything else is a ParityError.
    """

    name = "recorded-reference"
    traits = RunnerTraits()

    def __init__(self, config: ReferenceConfig, logits: Mapping[int, np.ndarray], *, stored: bool) -> None:
        self.config = config
        self._logits = dict(logits)
        self._by_ids = {p.ids: p for p in config.prompts}
        self._stored = stored

    def runtime_info(self) -> dict[str, str]:
        info = dict(self.config.reference_runtime)
        if self._stored:
            info["stored"] = "true"
        return info

    def tokenize(self, text: str) -> list[int] | None:
        return None

    def close(self) -> None:
        self._logits.clear()

    def _find(self, ids: Sequence[int]) -> tuple[ReferencePrompt, int]:
        key = tuple(int(i) for i in ids)
        for prompt in self.config.prompts:
            n = len(prompt.ids)
            extra = key[n:]
            if key[:n] == prompt.ids and len(extra) < max(len(prompt.greedy_ids), 1) and (
                extra == prompt.greedy_ids[: len(extra)]
            ):
                return prompt, len(key)
        raise ParityError("the recorded reference has no logits for this token sequence")

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        prompt, rows = self._find(ids)
        return np.asarray(self._logits[prompt.index][:rows], dtype=np.float32)

    def router_gaps(self, ids: Sequence[int]) -> np.ndarray | None:
        """The recorded router gaps of every logits row of the prompt ``ids`` (prefill rows, then the greedy
        path's); None for a dense model or an unknown prompt."""
        prompt = self._by_ids.get(tuple(int(i) for i in ids))
        if prompt is None or prompt.router_gaps is None:
            return None
        return np.asarray(prompt.router_gaps, dtype=np.float64)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        prompt = self._by_ids.get(tuple(int(i) for i in ids))
        if prompt is None:
            raise ParityError("the recorded reference has no greedy continuation for this prompt")
        if max_new_tokens != self.config.max_new_tokens:
            raise ParityError(f"the recorded reference holds {self.config.max_new_tokens} greedy tokens per prompt")
        return list(prompt.greedy_ids)

    def run_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[PromptRun]:
        return run_each(self, prompts, max_new_tokens, stop_ids)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [list(p.ids) for p in self.config.prompts]

    @property
    def prompt_labels(self) -> list[str] | None:
        labels = [p.label for p in self.config.prompts]
        return None if any(label is None for label in labels) else [str(label) for label in labels]

    def logits_files(self) -> list[tuple[str, bytes]]:
        """Each prompt's logits as (layer title, .npy bytes), float32, as the bundle stores them."""
        files = []
        for prompt in self.config.prompts:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(self._logits[prompt.index], dtype=np.float32), allow_pickle=False)
            files.append((prompt.logits, buffer.getvalue()))
        return files


def record_reference(
    model: SourceModel,
    prompts: Sequence[str] = (),
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: Progress = no_progress,
) -> RecordedReference:
    """Run the numpy reference once over the parity prompts (the built-ins when none are given)."""
    from sovpack.reference import ReferenceModel

    tokenizer_json = model.checkpoint.tokenizer_json
    if tokenizer_json is None:
        raise ParityError(f"{model.path}: parity needs tokenizer.json to encode its prompts")
    encoded = encode_prompts(tokenizer_json, list(prompts) or list(PROMPTS))
    labels: Sequence[str | None] = [None] * len(encoded) if prompts else list(PROMPT_LABELS)
    stop_ids = tuple(int(s) for s in model.spec.eos_token_ids)
    reference = ReferenceModel(model)
    progress("parity reference", 0, 1)
    try:
        traces = reference.greedy_batch(encoded, max_new_tokens, stop_ids)
        runtime = {str(k): str(v) for k, v in reference.runtime_info().items()}
    finally:
        reference.close()
    progress("parity reference", 1, 1)
    entries = []
    logits: dict[int, np.ndarray] = {}
    for i, (ids, trace) in enumerate(zip(encoded, traces, strict=True)):
        entries.append(
            ReferencePrompt(
                index=i, label=labels[i], ids=tuple(ids), greedy_ids=tuple(trace.tokens),
                logits=f"logits-{i:02d}.npy", rows=int(trace.logits.shape[0]),
                router_gaps=None if trace.router_gaps is None else tuple(
                    round_metric(float(g)) or 0.0 for g in trace.router_gaps
                ),
            )
        )
        logits[i] = trace.logits
    config = ReferenceConfig(
        vocab_size=int(model.spec.vocab_size),
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        tokenizer=REFERENCE_TOKENIZER,
        reference_runtime=runtime,
        prompts=tuple(entries),
    )
    return RecordedReference(config, logits, stored=False)
