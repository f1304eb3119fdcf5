"""Several sequences through one llama.cpp context: the parity prompts prefilled together, decoded in lockstep.

llama-cpp-python's ``Llama`` drives one sequence; its C API takes batches whose tokens each name a sequence
and a position. A second context on the loaded model holds one KV stream per prompt (``kv_unified`` off), each
of the single-sequence runner's size, so every prompt sees what it would alone: its own positions, the same
per-sequence context (which picks LongRoPE's factors), its sliding window.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sovpack.errors import ParityError
from sovpack.targets.gguf.runtime import import_llama_cpp

MAX_BATCH_TOKENS = 512  # tokens per llama_decode call: bounds the logits buffer (tokens x vocabulary floats)


class SequenceBatch:
    """A context with ``sequences`` KV streams of ``per_sequence`` cells on an open ``Llama``'s model."""

    def __init__(self, path: Path, llm: Any, sequences: int, per_sequence: int) -> None:
        self.path = path
        self.low = import_llama_cpp()
        params = self.low.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = sequences
        params.kv_unified = False
        params.n_ctx = per_sequence * sequences
        params.n_batch = params.n_ubatch = MAX_BATCH_TOKENS
        self.vocab = int(llm.n_vocab())
        self.ctx = self.low.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise ParityError(f"{path}: llama.cpp could not make a context for {sequences} sequences")
        self.batch = self.low.llama_batch_init(MAX_BATCH_TOKENS, 0, 1)

    def close(self) -> None:
        self.low.llama_batch_free(self.batch)
        self.low.llama_free(self.ctx)

    def decode(self, tokens: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """Logits [N, vocab] (float32) of ``tokens`` given as (sequence, position, token id), in that order."""
        rows = np.empty((len(tokens), self.vocab), dtype=np.float32)
        for start in range(0, len(tokens), MAX_BATCH_TOKENS):
            chunk = tokens[start : start + MAX_BATCH_TOKENS]
            batch = self.batch
            batch.n_tokens = len(chunk)
            for i, (sequence, position, token) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = sequence
                batch.logits[i] = True
            status = self.low.llama_decode(self.ctx, batch)
            if status != 0:
                raise ParityError(f"{self.path}: llama.cpp failed to decode a batch of {len(chunk)} tokens "
                                  f"(llama_decode returned {status})")
            for i in range(len(chunk)):
                pointer = self.low.llama_get_logits_ith(self.ctx, i)
                rows[start + i] = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                                        shape=(self.vocab,))
        return rows


@contextlib.contextmanager
def sequence_batch(path: Path, llm: Any, sequences: int, per_sequence: int) -> Iterator[SequenceBatch]:
    """A :class:`SequenceBatch`, freed on leaving."""
    batch = SequenceBatch(path, llm, sequences, per_sequence)
    try:
        yield batch
    finally:
        batch.close()


def prefill_tokens(prompts: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """Every prompt's tokens as (sequence, position, id), prompt after prompt."""
    return [(b, position, int(t)) for b, prompt in enumerate(prompts) for position, t in enumerate(prompt)]
