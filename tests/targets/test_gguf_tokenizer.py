"""tokenizer.json (and tokenizer.model) -> GGUF tokenizer metadata, derived from the tokenizer's definition.

Unit tests read the fixture tokenizers directly; the end-to-end tests tokenize in llama.cpp itself.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from sovpack.artifact import ArtifactMetadata
from sovpack.convert import convert
from sovpack.errors import ConversionError
from sovpack.parity.prompts import TOKENIZER_CORPUS
from sovpack.source.model import open_model
from sovpack.source.tokenizer import load_tokenizer
from sovpack.targets import gguf as gguf_target
from sovpack.targets.gguf.pretokenizer import GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX
from sovpack.targets.gguf.sentencepiece import parse_sentencepiece
from sovpack.targets.gguf.tokenizer import tokenizer_from_json
from sovpack.targets.gguf.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, GgufTokenizer

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
    reason="needs gguf and llama-cpp-python",
)


def load(checkpoints: dict[str, Path], variant: str) -> dict[str, Any]:
    return json.loads((checkpoints[variant] / "tokenizer.json").read_text(encoding="utf-8"))


def tokenizer_config(checkpoints: dict[str, Path], variant: str) -> dict[str, Any]:
    return json.loads((checkpoints[variant] / "tokenizer_config.json").read_text(encoding="utf-8"))


def convert_json(data: dict[str, Any], *, vocab_size: int | None = None, **kwargs: Any) -> GgufTokenizer:
    size = (
        vocab_size
        if vocab_size is not None
        else 1 + max([*data["model"]["vocab"].values(), *(a["id"] for a in data.get("added_tokens", []))])
    )
    return tokenizer_from_json(data, vocab_size=size, corpus=TOKENIZER_CORPUS, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# the pipeline llama.cpp runs is read off the definition


@pytest.mark.parametrize(
    ("variant", "model", "pre", "space_prefix"),
    [
        ("llama3", "gpt2", "llama-bpe", None),
        ("qwen2", "gpt2", "qwen2", None),
        ("qwen3", "gpt2", "qwen2", None),
        ("llama2", "llama", None, True),  # Prepend("▁") + Replace(" ", "▁") normalizer
        ("phi3", "llama", None, True),
        ("mistral", "llama", None, True),  # Metaspace pre-tokenizer
        ("gemma", "llama", None, False),  # Replace(" ", "▁") only: no dummy prefix
    ],
)
def test_pipeline_from_definition(
    checkpoints: dict[str, Path], variant: str, model: str, pre: str | None, space_prefix: bool | None
) -> None:
    tok = convert_json(load(checkpoints, variant))
    assert (tok.model, tok.pre, tok.add_space_prefix) == (model, pre, space_prefix)


def test_the_split_regex_decides_not_the_vocabulary(checkpoints: dict[str, Path]) -> None:
    """Swapping only the split regex swaps the llama.cpp pre-tokenizer: nothing is fingerprinted."""
    llama3 = load(checkpoints, "llama3")
    llama3["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_REGEX
    assert convert_json(llama3).pre == "qwen2"
    qwen2 = load(checkpoints, "qwen2")
    qwen2["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = LLAMA3_REGEX
    assert convert_json(qwen2).pre == "llama-bpe"
    gpt2 = load(checkpoints, "llama3")
    gpt2["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert convert_json(gpt2).pre == "gpt-2"
    gpt2["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    assert convert_json(gpt2).pre == "gpt-2"


def _set_regex(data: dict[str, Any], regex: str) -> None:
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = regex


UNSUPPORTED = {
    "unknown split regex": (
        "llama3",
        lambda d: _set_regex(d, r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"),
        "not one llama.cpp implements",
    ),
    "lowercasing normalizer": ("llama3", lambda d: d.update(normalizer={"type": "Lowercase"}), "Lowercase"),
    # Digits before Llama 3's own split: no llama.cpp pre-tokenizer splits that way (SmolLM's Digits + ByteLevel
    # is one: tests/fixtures_tests/test_real_weights.py and test_smollm_digits_map_to_llama_cpp_smollm).
    "digit splitting": (
        "llama3",
        lambda d: d["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Digits", "individual_digits": True}),
        "not one llama.cpp implements",
    ),
    "split that removes": (
        "llama3",
        lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"),
        "Removed",
    ),
    "prefix space": (
        "llama3",
        lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
        "add_prefix_space",
    ),
    "unigram model": ("llama2", lambda d: d["model"].update(type="Unigram"), "Unigram"),
    "NFKC before SentencePiece": (
        "llama2",
        lambda d: d["normalizer"]["normalizers"].insert(0, {"type": "NFKC"}),
        "NFKC",
    ),
    "odd Metaspace": ("mistral", lambda d: d["pre_tokenizer"].update(replacement="_"), "replacement"),
    "byte fallback without ▁": ("llama2", lambda d: d.update(normalizer=None), "no llama.cpp equivalent"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_what_llama_cpp_cannot_express_is_an_error(checkpoints: dict[str, Path], case: str) -> None:
    variant, mutate, message = UNSUPPORTED[case]
    data = copy.deepcopy(load(checkpoints, variant))
    mutate(data)
    with pytest.raises(ConversionError, match=message):
        convert_json(data)


# --------------------------------------------------------------------------------------------------------------
# vocabulary, scores, token types, special tokens


def test_spm_scores_follow_the_merge_ranks(checkpoints: dict[str, Path]) -> None:
    data = load(checkpoints, "llama2")
    tok = convert_json(data)
    assert tok.scores is not None
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    first_rank: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first_rank.setdefault(a + b, rank)
    index = {t: i for i, t in enumerate(tok.tokens)}
    for piece, rank in first_rank.items():
        assert tok.scores[index[piece]] == -rank
    # Pieces no merge creates score below every merge, so llama.cpp never prefers them.
    others = [s for t, s in zip(tok.tokens, tok.scores, strict=True) if t not in first_rank]
    assert max(others) < -max(first_rank.values())


def test_token_types(checkpoints: dict[str, Path]) -> None:
    llama2 = convert_json(load(checkpoints, "llama2"), tokenizer_config=tokenizer_config(checkpoints, "llama2"))
    types = dict(zip(llama2.tokens, llama2.token_types, strict=True))
    assert types["<unk>"] == UNKNOWN and types["<s>"] == CONTROL and types["</s>"] == CONTROL
    assert sum(t == BYTE for t in llama2.token_types) == 256 and types["<0x0A>"] == BYTE
    assert types["▁the"] == NORMAL
    assert (llama2.unk_id, llama2.bos_id, llama2.eos_id, llama2.add_bos, llama2.add_eos) == (0, 1, 2, True, False)

    llama3 = convert_json(load(checkpoints, "llama3"))
    specials = [t for t, ty in zip(llama3.tokens, llama3.token_types, strict=True) if ty == CONTROL]
    assert specials == [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
    ]
    assert llama3.merges is not None and all(" " in m for m in llama3.merges)
    assert llama3.scores is None and llama3.add_bos is True and llama3.bos_id == 600

    qwen2 = convert_json(load(checkpoints, "qwen2"))
    assert qwen2.add_bos is False and qwen2.bos_id is None


def test_vocabulary_is_padded_to_the_model(checkpoints: dict[str, Path]) -> None:
    data = load(checkpoints, "qwen2")
    size = len(convert_json(data).tokens)
    padded = convert_json(data, vocab_size=size + 3)
    assert padded.tokens[-3:] == [f"[PAD{size}]", f"[PAD{size + 1}]", f"[PAD{size + 2}]"]
    assert padded.token_types[-3:] == [UNUSED] * 3 and padded.padded == 3
    with pytest.raises(ConversionError, match="embedding rows"):
        convert_json(data, vocab_size=size - 1)


# --------------------------------------------------------------------------------------------------------------
# known divergences: predicted by rule, checked against llama.cpp in test_gguf.py


def test_metaspace_prefix_rule(checkpoints: dict[str, Path]) -> None:
    tok = convert_json(load(checkpoints, "mistral"))
    (rule,) = tok.divergences
    assert rule.rule == "metaspace-prefix"
    assert " leading space" in rule.texts  # Metaspace adds no '▁' before a leading space; llama.cpp does
    assert "<s>[INST] Hello [/INST]</s>" in rule.texts  # nor after a special token with scheme "first"
    assert "Hello, world!" not in rule.texts
    assert tok.divergent_texts == sorted(rule.texts)
    # The legacy Prepend normalizer behaves exactly like llama.cpp: nothing to declare.
    assert convert_json(load(checkpoints, "llama2")).divergences == []


def test_rstrip_rule_follows_llama_cpp_naming(checkpoints: dict[str, Path]) -> None:
    """llama.cpp strips whitespace after Phi-3's chat tokens only for models named phi3 / phi-3."""
    data = load(checkpoints, "phi3")
    chat = "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>"
    named = convert_json(data, model_name="phi3")
    assert chat not in named.divergent_texts
    other = convert_json(data, model_name="my-model")
    assert chat in other.divergent_texts
    assert [d.rule for d in other.divergences] == ["rstrip"]


def test_nfc_rule(checkpoints: dict[str, Path]) -> None:
    tok = convert_json(load(checkpoints, "qwen2"))
    assert [d.rule for d in tok.divergences] == ["nfc"]
    assert tok.divergent_texts == []  # the corpus is NFC already


# --------------------------------------------------------------------------------------------------------------
# tokenizer.model (SentencePiece protobuf)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(int(payload))
    assert isinstance(payload, bytes)
    return key + (payload if wire == 5 else _varint(len(payload)) + payload)


def sentencepiece_model(tok: GgufTokenizer, *, add_dummy_prefix: bool = True) -> bytes:
    """A SentencePiece BPE ModelProto holding the pieces, scores and types of a converted tokenizer."""
    sp_type = {NORMAL: 1, UNKNOWN: 2, CONTROL: 3, BYTE: 6, UNUSED: 5}
    assert tok.scores is not None
    pieces = b"".join(
        _field(
            1,
            2,
            _field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, sp_type[kind]),
        )
        for piece, score, kind in zip(tok.tokens, tok.scores, tok.token_types, strict=True)
    )
    trainer = _field(3, 0, 2) + _field(35, 0, 1)  # model_type BPE, byte_fallback
    normalizer = _field(1, 2, b"identity") + _field(3, 0, int(add_dummy_prefix)) + _field(4, 0, 0)
    return pieces + _field(2, 2, trainer) + _field(3, 2, normalizer)


def test_parse_sentencepiece(checkpoints: dict[str, Path]) -> None:
    tok = convert_json(load(checkpoints, "llama2"))
    sp = parse_sentencepiece(sentencepiece_model(tok, add_dummy_prefix=False))
    assert [p for p, _, _ in sp.pieces] == tok.tokens
    assert sp.pieces[0][2] == 2 and sp.pieces[5][2] == 6  # <unk> UNKNOWN, <0x02> BYTE
    assert (sp.model_type, sp.byte_fallback, sp.add_dummy_prefix, sp.remove_extra_whitespaces) == (
        2,
        True,
        False,
        False,
    )


@needs_llama
def test_tokenizer_model_alone_converts_and_tokenizes_like_the_source(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A checkpoint with tokenizer.model but no tokenizer.json: read without the sentencepiece package."""
    source = checkpoints["llama2"]
    ckpt = tmp_path / "llama2-spm-only"
    shutil.copytree(source, ckpt)
    model_bytes = sentencepiece_model(convert_json(load(checkpoints, "llama2")))
    (ckpt / "tokenizer.model").write_bytes(model_bytes)
    (ckpt / "tokenizer.json").unlink()
    out = tmp_path / "out"
    out.mkdir()
    model = open_model(ckpt)
    written = gguf_target.GgufTarget().write(model, "f16", out, lambda *_: None)
    assert written.format_metadata["tokenizer"]["source"] == "tokenizer.model"
    runner = gguf_target.LlamaCppRunner(out / written.format_metadata["gguf_file"], spec=model.spec)
    reference = load_tokenizer(source / "tokenizer.json")
    try:
        mismatched = [t for t in TOKENIZER_CORPUS if runner.tokenize(t) != reference.encode(t).ids]
    finally:
        runner.close()
    assert mismatched == []


@needs_llama
def test_tokenizer_json_wins_over_tokenizer_model(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "both"
    shutil.copytree(checkpoints["llama2"], ckpt)
    (ckpt / "tokenizer.model").write_bytes(b"\x0a\x03not a real model")
    result = convert(ckpt, "gguf:f16", tmp_path / "out")
    meta = ArtifactMetadata.load(result.out_dir).format_metadata
    assert meta["tokenizer"]["source"] == "tokenizer.json"
    assert result.parity is not None and result.parity.tokenizer.mismatched == 0


# --------------------------------------------------------------------------------------------------------------
# other pipelines, end to end in llama.cpp


@needs_llama
def test_gpt2_pre_tokenizer_in_llama_cpp(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The llama3 vocabulary behind GPT-2's ByteLevel regex: llama.cpp's gpt-2 pre-tokenizer must agree."""
    ckpt = tmp_path / "gpt2-style"
    shutil.copytree(checkpoints["llama3"], ckpt)
    data = load(checkpoints, "llama3")
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["model"]["ignore_merges"] = False
    (ckpt / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    result = convert(ckpt, "gguf:f32", tmp_path / "out")
    assert result.parity is not None and result.parity.status == "PASSED", result.parity.reasons
    tok = result.parity.tokenizer
    assert (tok.matched, tok.known_divergent, tok.mismatched) == (tok.total, 0, 0)
    assert ArtifactMetadata.load(result.out_dir).format_metadata["tokenizer"]["pre"] == "gpt-2"


@needs_llama
def test_predicted_rstrip_divergence_is_real(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Phi-3 saved under another name: llama.cpp keeps the whitespace after chat tokens, as predicted."""
    ckpt = tmp_path / "my-assistant"
    shutil.copytree(checkpoints["phi3"], ckpt)
    result = convert(ckpt, "gguf:f16", tmp_path / "out")
    assert result.parity is not None and result.parity.status == "PASSED", result.parity.reasons
    tok = result.parity.tokenizer
    known = ArtifactMetadata.load(result.out_dir).traits.known_tokenizer_divergences
    assert "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>" in known
    assert tok.mismatched == 0 and tok.known_divergent == len(known)


def _with_normal_token(data: dict[str, Any], text: str) -> dict[str, Any]:
    """``text`` as an ordinary vocabulary entry that no merge creates.

    It takes the id of the last-learned piece that no other merge builds on (that piece and its merge are
    dropped), so the vocabulary stays contiguous and the checkpoint's embedding rows still fit.
    """
    data = copy.deepcopy(data)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    inputs = {part for pair in merges for part in pair}
    results = [a + b for a, b in merges]
    rank = max(r for r, piece in enumerate(results) if piece not in inputs and results.count(piece) == 1)
    vocab = data["model"]["vocab"]
    vocab[text] = vocab.pop(results[rank])
    del data["model"]["merges"][rank]
    return data


def test_control_looking_rule(checkpoints: dict[str, Path]) -> None:
    tok = convert_json(_with_normal_token(load(checkpoints, "llama3"), "<|im_end|>"))
    assert [d.rule for d in tok.divergences] == ["control-looking"]
    assert tok.divergent_texts == ["<|im_start|>user\nHi there<|im_end|>"]


@needs_llama
def test_predicted_control_looking_divergence_is_real(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp matches a normal '<|im_end|>' entry whole; the source spells it out in pieces."""
    ckpt = tmp_path / "control-looking"
    shutil.copytree(checkpoints["llama3"], ckpt)
    data = _with_normal_token(load(checkpoints, "llama3"), "<|im_end|>")
    (ckpt / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    model = open_model(ckpt)
    written = gguf_target.GgufTarget().write(model, "f16", out, lambda *_: None)
    runner = gguf_target.LlamaCppRunner(out / written.format_metadata["gguf_file"], spec=model.spec)
    source = load_tokenizer(ckpt / "tokenizer.json")
    try:
        differ = [t for t in TOKENIZER_CORPUS if runner.tokenize(t) != source.encode(t).ids]
    finally:
        runner.close()
    known = list(written.traits.known_tokenizer_divergences)
    assert differ == known == ["<|im_start|>user\nHi there<|im_end|>"]


VARIANT_RULES = {
    # llama.cpp's llama-bpe always ignores merges for whole-word vocabulary entries
    "llama3-merges": ("llama3", lambda d: d["model"].update(ignore_merges=False), "ignore-merges"),
    # llama.cpp's SPM tokenizer never splits at '▁' before merging
    "mistral-split": ("mistral", lambda d: d["pre_tokenizer"].update(split=True), "metaspace-split"),
}


@needs_llama
@pytest.mark.parametrize("case", sorted(VARIANT_RULES))
def test_one_option_rules_predict_llama_cpp(checkpoints: dict[str, Path], tmp_path: Path, case: str) -> None:
    """Rules computed by running the source tokenizer against a variant of itself predict llama.cpp exactly."""
    variant, mutate, rule = VARIANT_RULES[case]
    ckpt = tmp_path / case
    shutil.copytree(checkpoints[variant], ckpt)
    data = load(checkpoints, variant)
    mutate(data)
    (ckpt / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    result = convert(ckpt, "gguf:f32", tmp_path / "out")
    assert result.parity is not None and result.parity.status == "PASSED", result.parity.reasons
    meta = ArtifactMetadata.load(result.out_dir)
    assert rule in [d["rule"] for d in meta.format_metadata["tokenizer"]["known_divergences"]]
    tok = result.parity.tokenizer
    assert tok.mismatched == 0 and tok.known_divergent == len(meta.traits.known_tokenizer_divergences)


# --------------------------------------------------------------------------------------------------------------
# real vocabularies (opt-in: SOVPACK_LLAMA_CPP_MODELS=<llama.cpp source>/models, with its ggml-vocab-* files)

REAL_VOCABS = {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX, "gpt-2": None}


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_VOCABS))
def test_real_vocabulary_against_llama_cpp_test_vectors(name: str, tmp_path: Path) -> None:
    """llama.cpp ships each supported tokenizer's vocabulary with inputs and the ids Hugging Face produced.

    The vocabulary is rebuilt as a tokenizer.json (its split regex as published, merges in rank order),
    converted by sovpack, and tokenized by llama.cpp from the written GGUF: every test vector must come out.
    """
    import os

    gguf = pytest.importorskip("gguf")
    models = os.environ.get("SOVPACK_LLAMA_CPP_MODELS")
    if not models or not (Path(models) / f"ggml-vocab-{name}.gguf").is_file():
        pytest.skip("set SOVPACK_LLAMA_CPP_MODELS to llama.cpp's models/ directory")
    base = Path(models) / f"ggml-vocab-{name}.gguf"
    reader = gguf.GGUFReader(base)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    regex = REAL_VOCABS[name]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": regex is None}
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    data = {
        "added_tokens": [
            {"id": i, "content": t, "special": ty == CONTROL, "normalized": False, "lstrip": False, "rstrip": False}
            for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
            if ty != NORMAL
        ],
        "normalizer": {"type": "NFC"} if name == "qwen2" else None,
        "pre_tokenizer": byte_level if regex is None else {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "model": {
            "type": "BPE",
            "vocab": {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == NORMAL},
            "merges": reader.fields["tokenizer.ggml.merges"].contents(),
            "ignore_merges": name == "llama-bpe",
        },
    }
    tok = tokenizer_from_json(data, vocab_size=len(tokens))
    assert tok.pre == name
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 64)):
        add(value)
    writer.add_head_count(1)
    writer.add_feed_forward_length(64)
    writer.add_layer_norm_rms_eps(1e-5)
    tok.add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    texts = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    expected = [[int(i) for i in line.split()] for line in base.with_suffix(".gguf.out").read_text().split("\n")]
    runner = gguf_target.LlamaCppRunner(path)
    try:
        got = [runner.encode(t, add_special=False, parse_special=False) for t in texts]
    finally:
        runner.close()
    assert got == expected[: len(texts)]


def test_smollm_digits_map_to_llama_cpp_smollm() -> None:
    """SmolLM / SmolLM2 publish Digits(individual_digits) then ByteLevel with its GPT-2 regex: llama.cpp's
    "smollm" pre-tokenizer splits the same way."""
    from sovpack.targets.gguf.pretokenizer import byte_level_rule

    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}
    assert byte_level_rule(None, pre, "tokenizer.json").pre == "smollm"
    pre["pretokenizers"][0]["individual_digits"] = False
    with pytest.raises(ConversionError, match="Digits"):
        byte_level_rule(None, pre, "tokenizer.json")
