"""The fixtures' tokenizers (fixtures.tokenizers_gen): deterministic, lossless, laid out like the real ones."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from fixtures.tokenizers_gen import KINDS, build_tokenizer, tokenizer_spec
from fixtures.variants import VARIANTS
from tests.fixtures_tests.shared import MULTILINGUAL, ROOT

# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_tokenizer_training_is_deterministic() -> None:
    first = {k: build_tokenizer(k).to_str() for k in KINDS}
    assert first == {k: build_tokenizer(k).to_str() for k in KINDS}
    code = (
        "import hashlib, json\n"
        "from fixtures.tokenizers_gen import KINDS, _tokenizer_json\n"
        "print(json.dumps({k: hashlib.sha256(_tokenizer_json(k).encode()).hexdigest() for k in KINDS}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "987", "RAYON_NUM_THREADS": "4", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    other = json.loads(proc.stdout)
    mine = {k: hashlib.sha256(build_tokenizer(k).to_str(pretty=True).encode()).hexdigest() for k in KINDS}
    assert other == mine


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: str) -> None:
    tok = build_tokenizer(kind)
    for text in MULTILINGUAL:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=True) == text, (kind, text)


@pytest.mark.parametrize("kind", ["llama2-spm", "mistral-spm", "phi3-spm", "gemma-spm"])
def test_sentencepiece_byte_fallback(kind: str) -> None:
    tok = build_tokenizer(kind)
    assert tok.token_to_id("𝄞") is None
    tokens = tok.encode("a𝄞b", add_special_tokens=False).tokens
    assert [t for t in tokens if t.startswith("<0x")] == ["<0xF0>", "<0x9D>", "<0x84>", "<0x9E>"]
    assert tok.encode("line\nbreak", add_special_tokens=False).tokens.count("<0x0A>") == 1
    # SentencePiece pieces never cross a word boundary: "▁" only leads a piece (or forms whitespace pieces).
    for piece in tok.get_vocab():
        body = piece.lstrip("▁")
        assert "▁" not in body, piece


def test_byte_level_layout() -> None:
    for kind, specials in (("llama3-bpe", 5), ("qwen2-bpe", 3)):
        tok = build_tokenizer(kind)
        spec = tokenizer_spec(kind)
        assert tok.get_vocab_size(with_added_tokens=False) == 600
        assert [tok.token_to_id(s) for s in spec.specials] == list(range(600, 600 + specials))
        assert tok.id_to_token(0) == "!" and tok.id_to_token(255) is not None
        for text in MULTILINGUAL:  # byte-level: never an unknown token
            assert None not in tok.encode(text).ids
    j3 = json.loads(build_tokenizer("llama3-bpe").to_str())
    assert j3["normalizer"] is None and j3["model"]["ignore_merges"] is True
    assert [p["type"] for p in j3["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert j3["pre_tokenizer"]["pretokenizers"][1]["use_regex"] is False
    llama3, qwen2 = build_tokenizer("llama3-bpe"), build_tokenizer("qwen2-bpe")
    assert llama3.encode("Hi").tokens[0] == "<|begin_of_text|>"
    assert qwen2.encode("Hi").tokens[0] != "<|endoftext|>"
    # Llama 3 pre-splits numbers into groups of up to three digits, Qwen2 into single digits.
    assert [w for w, _ in llama3.pre_tokenizer.pre_tokenize_str("12345")] == ["123", "45"]
    assert qwen2.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert json.loads(qwen2.to_str())["normalizer"]["type"] == "NFC"


def test_sentencepiece_layout() -> None:
    llama2 = build_tokenizer("llama2-spm")
    assert [llama2.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert llama2.id_to_token(258) == "<0xFF>"
    assert llama2.encode("Hello").tokens[0] == "<s>"
    j2 = json.loads(llama2.to_str())
    assert [n["type"] for n in j2["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert j2["pre_tokenizer"] is None and j2["model"]["byte_fallback"] is True
    jm = json.loads(build_tokenizer("mistral-spm").to_str())
    assert jm["normalizer"] is None
    assert (jm["pre_tokenizer"]["type"], jm["pre_tokenizer"]["prepend_scheme"], jm["pre_tokenizer"]["split"]) == (
        "Metaspace",
        "first",
        False,
    )
    # Same vocabulary, two HF pipeline forms: identical ids.
    for text in MULTILINGUAL:
        assert build_tokenizer("mistral-spm").encode(text).ids == llama2.encode(text).ids, text
    phi3 = build_tokenizer("phi3-spm")
    n = llama2.get_vocab_size()
    assert [phi3.id_to_token(n + i) for i in range(5)] == [
        "<|endoftext|>",
        "<|assistant|>",
        "<|user|>",
        "<|system|>",
        "<|end|>",
    ]
    gemma = build_tokenizer("gemma-spm")
    assert [gemma.id_to_token(i) for i in range(7)] == [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<0x00>",
    ]
    assert gemma.encode("Hello world").tokens[:3] == ["<bos>", "Hello", "▁world"]  # no dummy prefix


def test_tokenizer_config_and_chat_template(generated: dict[str, Path]) -> None:
    for name, d in generated.items():
        v = VARIANTS[name]
        tc = json.loads((d / "tokenizer_config.json").read_text())
        spec = tokenizer_spec(v.tokenizer)
        assert tc["eos_token"] == spec.eos_token and tc["add_bos_token"] == spec.add_bos_token
        assert tc["model_max_length"] == v.max_position_embeddings
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        for id_str, entry in tc["added_tokens_decoder"].items():
            assert tok.token_to_id(entry["content"]) == int(id_str)
        if v.chat_template_in == "jinja_file":
            assert "chat_template" not in tc
            assert "{%" in (d / "chat_template.jinja").read_text()
        else:
            assert "{%" in tc["chat_template"]
