"""An embedding-encoder GGUF file run in llama.cpp through llama-cpp-python: the ``EmbeddingRunner``.

Two llama.cpp contexts, opened lazily: one with the file's pooling type (pooled sentence vectors, what users of
``Llama.embed`` get) and one with pooling ``none`` (the token states, for token-level parity). A batch of token-id
sequences is packed into one llama.cpp batch, one sequence id per text, as ``Llama.embed`` packs texts: llama.cpp
masks attention between sequences and numbers each sequence's positions from 0, so mixed lengths need no
padding. llama.cpp returns pooled vectors unnormalised; the runner L2-normalises when the artifact's pipeline
does (``normalize`` in its metadata).

The context holds ``n_ctx = n_batch = n_ubatch`` = the pipeline's max_seq_length (capped at the file's
positions): llama.cpp encodes a sequence in one micro-batch, and ``Llama.embed`` truncates each text to n_batch
tokens.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._digests import known_digest
from sovpack._io import sha256_file
from sovpack._protocols import Embeddings, RunnerTraits
from sovpack.errors import UsageError
from sovpack.source.spec import ModelSpec
from sovpack.targets.gguf.runtime import (
    N_THREADS,
    extra_buffers_allowed,
    import_llama_cpp,
    load_errors,
    model_params,
    quiet_llama,
    runtime_errors,
)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as sentence-transformers' Normalize does."""
    norm = np.sqrt(np.square(x).sum(axis=-1, keepdims=True, dtype=np.float32))
    return (x / np.maximum(norm, np.float32(1e-12))).astype(np.float32)


class LlamaCppEmbeddingRunner:
    """An encoder .gguf in llama.cpp: token ids or texts in, sentence embeddings (and token states) out."""

    name = "llama.cpp"

    def __init__(
        self,
        path: Path,
        *,
        spec: ModelSpec,
        normalize: bool,
        max_seq_length: int | None = None,
        n_threads: int = N_THREADS,
        traits: RunnerTraits | None = None,
    ) -> None:
        if spec.encoder is None:
            raise UsageError(f"{path}: {spec.family} is not an embedding encoder")
        self.path = Path(path)
        self.spec = spec
        self.normalize = normalize
        self.n_threads = n_threads
        self.traits = traits if traits is not None else RunnerTraits()
        positions = spec.max_position_embeddings - spec.encoder.position_offset
        self.max_tokens = min(positions, max_seq_length) if max_seq_length else positions
        self._pooled: Any = None
        self._tokens: Any = None
        self.extra_buffers: bool | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _open(self, pooled: bool) -> Any:
        current = self._pooled if pooled else self._tokens
        if current is not None:
            return current
        llama_cpp = import_llama_cpp()
        self.extra_buffers = extra_buffers_allowed()
        pooling = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if pooled else llama_cpp.LLAMA_POOLING_TYPE_NONE
        with quiet_llama() as log, model_params(extra_buffers=self.extra_buffers), load_errors(self.path, log):
            llm = llama_cpp.Llama(
                model_path=str(self.path),
                embedding=True,
                pooling_type=pooling,  # unspecified: the file's bert.pooling_type
                n_ctx=self.max_tokens,
                n_batch=self.max_tokens,
                n_ubatch=self.max_tokens,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                flash_attn=False,
                verbose=False,
            )
        if pooled:
            self._pooled = llm
        else:
            self._tokens = llm
        return llm

    def close(self) -> None:
        """Free both contexts; safe to call more than once."""
        for llm in (self._pooled, self._tokens):
            if llm is not None:
                llm.close()
        self._pooled = self._tokens = None

    # -- EmbeddingRunner protocol ----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens for ``text`` as Llama.embed computes them: [CLS]/<s> ... [SEP]/</s> added, special
        texts not parsed, truncated to the context's n_batch."""
        llm = self._open(pooled=True)
        with runtime_errors(self.path, "tokenize"):
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        return [int(t) for t in tokens[: self.max_tokens]]

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> Embeddings:
        """Pooled embeddings [B, hidden] (normalised as the pipeline says) and token states [B, T, hidden]."""
        seqs = [[int(t) for t in ids] for ids in batch]
        if not seqs or any(not ids for ids in seqs):
            raise UsageError("embed_ids takes one or more non-empty sequences of token ids")
        too_long = max(len(ids) for ids in seqs)
        if too_long > self.max_tokens:
            raise UsageError(
                f"{self.path.name}: a sequence of {too_long} tokens exceeds the {self.max_tokens} the "
                "runner's llama.cpp context holds (the pipeline's max_seq_length)"
            )
        bad = [t for ids in seqs for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise UsageError(f"token ids must be in [0, {self.spec.vocab_size}), got {bad[0]}")
        pooled = np.stack([v for group in self._groups(seqs) for v in self._decode(group, pooled=True)])
        if self.normalize:
            pooled = l2_normalize(pooled)
        width = max(len(ids) for ids in seqs)
        hidden = np.zeros((len(seqs), width, self.spec.hidden_size), dtype=np.float32)
        states = [s for group in self._groups(seqs) for s in self._decode(group, pooled=False)]
        for b, s in enumerate(states):
            hidden[b, : s.shape[0]] = s
        return Embeddings(embeddings=pooled.astype(np.float32), hidden=hidden)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``Llama.embed`` on the texts: llama.cpp's tokenizer, truncation and pooling, then the pipeline's
        normalisation (``normalize=``), exactly as a llama-cpp-python user calls it."""
        if not texts:
            raise UsageError("embed_texts takes one or more texts")
        llm = self._open(pooled=True)
        with runtime_errors(self.path, "embed"):
            vectors = llm.embed(list(texts), normalize=self.normalize, truncate=True)
        return np.asarray(vectors, dtype=np.float32)

    def runtime_info(self) -> dict[str, str]:
        llama_cpp = import_llama_cpp()
        return {
            "runtime": "llama.cpp",
            "llama_cpp_python": str(llama_cpp.__version__),
            "gguf_file": self.path.name,
            "gguf_sha256": (known_digest(self.path) or sha256_file(self.path)).removeprefix("sha256:"),
            "n_ctx": str(self.max_tokens),
            "normalize": str(self.normalize),
            "extra_buffer_types": {None: "not loaded", True: "on", False: "off (AMX crashes)"}[self.extra_buffers],
            "n_threads": str(self.n_threads),
            "machine": platform.machine(),
            "python": platform.python_version(),
        }

    # -- internals -------------------------------------------------------------------------------------------
    def _groups(self, seqs: list[list[int]]) -> list[list[list[int]]]:
        """Sequences packed into llama.cpp batches of at most n_batch tokens and n_seq_max sequences."""
        limit = self._open(pooled=True).context_params.n_seq_max
        groups: list[list[list[int]]] = [[]]
        used = 0
        for ids in seqs:
            if groups[-1] and (used + len(ids) > self.max_tokens or len(groups[-1]) >= limit):
                groups.append([])
                used = 0
            groups[-1].append(ids)
            used += len(ids)
        return groups

    def _decode(self, group: list[list[int]], *, pooled: bool) -> list[np.ndarray]:
        """One llama.cpp decode of a packed group: per sequence its pooled vector [H] or its token states [T, H]."""
        llama_cpp = import_llama_cpp()
        llm = self._open(pooled)
        n_embd = self.spec.hidden_size
        # NOTE: the same batch and context objects, and the same calls, Llama.embed uses for a list of texts.
        batch, ctx = llm._batch, llm._ctx
        out: list[np.ndarray] = []
        with runtime_errors(self.path, "encode"):
            batch.reset()
            for seq_id, ids in enumerate(group):
                batch.add_sequence(ids, seq_id, True)
            ctx.kv_cache_clear()
            ctx.decode(batch)
            if pooled:
                for seq_id in range(len(group)):
                    ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq_id)
                    out.append(np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float32, copy=True))
            else:
                ptr = llama_cpp.llama_get_embeddings(ctx.ctx)
                total = sum(len(ids) for ids in group)
                flat = np.ctypeslib.as_array(ptr, shape=(total * n_embd,)).astype(np.float32, copy=True)
                states = flat.reshape(total, n_embd)
                start = 0
                for ids in group:
                    out.append(states[start : start + len(ids)])
                    start += len(ids)
            batch.reset()
            ctx.kv_cache_clear()
        return out
