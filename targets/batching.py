"""Parity prompts as one batch: left-padded inputs and greedy decoding in lockstep, for runtimes whose graphs
take an attention mask and explicit positions (onnxruntime, OpenVINO).

Why left padding: every prompt's real tokens end at the same cache index, so each decoding step appends one
column for all of them and a sliding window counts real distances. The padded query rows attend to nothing
real; the graphs mask with a finite value, so those rows stay finite and are simply not read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sovpack._protocols import PromptRun


@dataclass(frozen=True, kw_only=True, slots=True)
class LeftPadded:
    """Prompts left-padded to the longest: ``ids``, ``mask`` (1 on real tokens), ``positions`` [B, W] int64.

    Padding has id 0, mask 0 and position 0; a real token's position is its index in its own prompt.
    """

    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray  # [B] real tokens per prompt

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]]) -> LeftPadded:
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lengths.max())
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        positions = np.zeros_like(ids)
        for b, prompt in enumerate(prompts):
            start = width - len(prompt)
            ids[b, start:] = np.asarray(prompt, dtype=np.int64)
            mask[b, start:] = 1
            positions[b, start:] = np.arange(len(prompt))
        return cls(ids=ids, mask=mask, positions=positions, lengths=lengths)

    def own_rows(self, logits: np.ndarray) -> list[np.ndarray]:
        """Each prompt's own rows of batched prefill logits [B, W, V], as float32 [len, V]."""
        width = self.ids.shape[1]
        return [np.array(logits[b, width - n :], dtype=np.float32) for b, n in enumerate(self.lengths.tolist())]


def decode_in_lockstep(
    last: np.ndarray,
    step: Callable[[np.ndarray, int], np.ndarray],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy tokens of every sequence from its prefill's last logits ``last`` [B, V].

    ``step(tokens [B], k)`` feeds token k of every sequence (positions ``length + k``) and returns the next
    logits [B, V]. A finished sequence (stop token or ``max_new_tokens``) keeps its slot, fed its last token,
    until all are done: the batch's shape never changes, and its later tokens are not recorded.
    """
    stop = {int(s) for s in stop_ids}
    tokens: list[list[int]] = [[] for _ in range(last.shape[0])]
    active = [max_new_tokens > 0] * len(tokens)
    for k in range(max_new_tokens):
        for b, chosen in enumerate(np.argmax(last, axis=-1).tolist()):
            if active[b]:
                tokens[b].append(int(chosen))
                active[b] = chosen not in stop and len(tokens[b]) < max_new_tokens
        if not any(active):
            break
        last = step(np.array([t[-1] for t in tokens], dtype=np.int64), k)
    return tokens


def run_left_padded(
    prompts: Sequence[Sequence[int]],
    forward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> list[PromptRun]:
    """``Runner.run_prompts`` over a graph taking ids, attention mask and positions: one left-padded prefill,
    then one step per greedy token for every prompt. ``forward(ids, mask, positions)`` returns logits
    [B, T, V] and carries the runtime's cache from call to call (a fresh cache at the prefill)."""
    if not prompts:
        return []
    batch = LeftPadded.of(prompts)
    logits = forward(batch.ids, batch.mask, batch.positions)
    mask = batch.mask

    def step(tokens: np.ndarray, k: int) -> np.ndarray:
        nonlocal mask
        mask = np.concatenate([mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        return np.asarray(forward(tokens[:, None], mask, (batch.lengths + k)[:, None])[:, -1], dtype=np.float32)

    tokens = decode_in_lockstep(np.asarray(logits[:, -1], dtype=np.float32), step, max_new_tokens, stop_ids)
    return [PromptRun(logits=rows, tokens=t) for rows, t in zip(batch.own_rows(logits), tokens, strict=True)]
