"""Left-padded parity batches and greedy decoding in lockstep (targets/batching.py)."""

from __future__ import annotations

import numpy as np

from sovpack.targets.batching import LeftPadded, decode_in_lockstep


def test_left_padding_puts_every_prompt_at_the_right_edge() -> None:
    batch = LeftPadded.of([[5, 6, 7], [9], [1, 2]])
    assert batch.ids.tolist() == [[5, 6, 7], [0, 0, 9], [0, 1, 2]]
    assert batch.mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch.positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert batch.lengths.tolist() == [3, 1, 2]
    logits = np.arange(3 * 3 * 2, dtype=np.float64).reshape(3, 3, 2)
    rows = batch.own_rows(logits)
    assert [r.shape for r in rows] == [(3, 2), (1, 2), (2, 2)]
    assert all(r.dtype == np.float32 for r in rows)
    np.testing.assert_array_equal(rows[1], logits[1, 2:])
    np.testing.assert_array_equal(rows[2], logits[2, 1:])


def _one_hot(tokens: list[int], vocab: int = 10) -> np.ndarray:
    out = np.zeros((len(tokens), vocab), dtype=np.float32)
    out[np.arange(len(tokens)), tokens] = 1.0
    return out


def test_lockstep_decoding_stops_each_sequence_on_its_own() -> None:
    """Sequence 0 counts up, sequence 1 hits the stop token 9 at its second token; the batch keeps its shape
    and the finished sequence's later tokens are not recorded."""
    fed: list[tuple[list[int], int]] = []

    def step(tokens: np.ndarray, k: int) -> np.ndarray:
        assert tokens.shape == (2,)
        fed.append((tokens.tolist(), k))
        return _one_hot([int(tokens[0]) + 1, 9 if k == 0 else 3])

    tokens = decode_in_lockstep(_one_hot([2, 4]), step, max_new_tokens=4, stop_ids=[9])
    assert tokens == [[2, 3, 4, 5], [4, 9]]
    assert fed == [([2, 4], 0), ([3, 9], 1), ([4, 9], 2)]  # the finished slot is fed its last token


def test_lockstep_decoding_of_zero_tokens_feeds_nothing() -> None:
    def step(tokens: np.ndarray, k: int) -> np.ndarray:
        raise AssertionError("no step expected")

    assert decode_in_lockstep(_one_hot([1, 2]), step, max_new_tokens=0) == [[], []]
    assert decode_in_lockstep(_one_hot([1, 2]), step, max_new_tokens=1) == [[1], [2]]
