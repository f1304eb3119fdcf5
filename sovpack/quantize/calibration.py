"""Calibration: what each linear layer's input looks like on real text, measured with the numpy reference.

One forward pass of the reference over the calibration text (the built-in corpus or a user's file, one
sequence) records, for every linear layer's input, the energy per input channel (mean x^2: the importance
llama.cpp's imatrix holds, and the weight each channel's rounding error gets) and, when asked and when they
fit, the input's second-moment matrix E[x x^T] (the Hessian of the layer's output error that GPTQ
compensates). Layers reading the same input (q/k/v, gate/up) share one record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sovpack.errors import SourceError, UsageError
from sovpack.quantize.corpus import CALIBRATION_TEXT
from sovpack.reference import KVCache, ReferenceModel
from sovpack.source.model import SourceModel
from sovpack.source.tokenizer import SourceTokenizer

DEFAULT_MAX_TOKENS = 1024
# Hessians are kept only when all of them together fit in this many bytes (float64 accumulators).
HESSIAN_BUDGET_BYTES = 3 << 30
MAX_CALIBRATION_FILE_BYTES = 16 << 20
HEAD = "lm_head"  # the key of the head's input (also when the head is tied to the embedding)


@dataclass
class InputStats:
    """Accumulated statistics of one linear input site [tokens, K]."""

    squares: np.ndarray  # [K] float64: sum over tokens of x^2
    hessian: np.ndarray | None  # [K, K] float64: sum over tokens of x x^T, when kept
    tokens: int = 0

    def add(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
        self.squares += np.einsum("tk,tk->k", flat, flat, dtype=np.float64)
        if self.hessian is not None:
            self.hessian += (flat.T @ flat).astype(np.float64)
        self.tokens += flat.shape[0]

    @property
    def importance(self) -> np.ndarray:
        """Mean x^2 per input channel [K] (float32); a channel never seen gets a small positive weight."""
        mean = self.squares / max(self.tokens, 1)
        floor = max(float(mean.mean()) * 1e-6, 1e-12)
        return np.maximum(mean, floor).astype(np.float32)

    @property
    def mean_hessian(self) -> np.ndarray | None:
        return None if self.hessian is None else self.hessian / max(self.tokens, 1)


@dataclass
class Calibration:
    """Per linear tensor (canonical name, ``lm_head`` for the head), the statistics of its input."""

    stats: dict[str, InputStats] = field(default_factory=dict)
    tokens: int = 0
    text_sha256: str = ""
    source: str = "built-in"

    def importance(self, name: str) -> np.ndarray | None:
        found = self.stats.get(name)
        return None if found is None else found.importance

    def hessian(self, name: str) -> np.ndarray | None:
        found = self.stats.get(name)
        return None if found is None else found.mean_hessian

    @property
    def has_hessians(self) -> bool:
        return any(s.hessian is not None for s in self.stats.values())

    def to_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "text_sha256": self.text_sha256, "source": self.source,
                "hessians": self.has_hessians}


def calibration_text(path: Path | None) -> tuple[str, str]:
    """(text, source name): the user's UTF-8 file, or the built-in corpus."""
    if path is None:
        return "\n\n".join(CALIBRATION_TEXT), "built-in"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CALIBRATION_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the calibration file ({exc.strerror})") from exc
    if len(data) > MAX_CALIBRATION_FILE_BYTES:
        raise UsageError(f"{path}: calibration file larger than {MAX_CALIBRATION_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: calibration file is not UTF-8 text (byte {exc.start})") from exc
    if not text.strip():
        raise UsageError(f"{path}: calibration file is empty")
    return text, path.name


def hessian_bytes(model: SourceModel) -> int:
    """Bytes the float64 Hessians of every input site would take (q/k/v and gate/up share theirs)."""
    s = model.spec
    per_layer = 3 * s.hidden_size**2 + s.q_size**2 + s.intermediate_size**2
    return 8 * s.num_layers * per_layer + 8 * s.hidden_size**2


def calibrate(model: SourceModel, *, text_file: Path | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
              hessians: bool = False) -> Calibration:
    """Run the reference over the calibration text once and collect every linear input's statistics.

    Statistics without Hessians are kept on ``model`` (``derived``) and reused by later calls with the same
    text: a build's 4-bit targets calibrate once. With Hessians (small models) they are recomputed, not kept
    (up to 3 GiB) through the rest of the build.
    """
    spec = model.spec
    if spec.encoder is not None:
        raise UsageError(f"{model.path}: calibration is for decoders; {spec.family} is an embedding encoder")
    tokenizer_json = model.checkpoint.file("tokenizer.json")
    if tokenizer_json is None:
        raise SourceError(f"{model.path}: calibration needs tokenizer.json to tokenize its text")
    text, source = calibration_text(text_file)
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    memo_key = ("calibration", text_sha256, source, max_tokens)
    kept = model.derived.get(memo_key)
    if isinstance(kept, Calibration) and (not hessians or hessian_bytes(model) > HESSIAN_BUDGET_BYTES):
        return kept
    ids = SourceTokenizer(tokenizer_json).encode(text)[: min(max_tokens, spec.max_position_embeddings)]
    if not ids:
        raise UsageError(f"{source}: the calibration text gives no tokens")
    keep_hessians = hessians and hessian_bytes(model) <= HESSIAN_BUDGET_BYTES
    calib = Calibration(tokens=len(ids), text_sha256=text_sha256, source=source)
    last: list[object] = [None, None]  # the previous input array and its stats: q/k/v and gate/up share one

    def observe(name: str, x: np.ndarray) -> None:
        if x is last[0]:
            calib.stats[name] = last[1]  # type: ignore[assignment]
            return
        k = x.shape[-1]
        stats = InputStats(squares=np.zeros(k, dtype=np.float64),
                           hessian=np.zeros((k, k), dtype=np.float64) if keep_hessians else None)
        stats.add(x)
        calib.stats[name] = stats
        last[0], last[1] = x, stats

    reference = ReferenceModel(model)
    reference.observer = observe
    try:
        reference.forward(ids, KVCache())
    finally:
        reference.observer = None
        reference.close()
    if not calib.has_hessians:
        model.derived[memo_key] = calib
    return calib
