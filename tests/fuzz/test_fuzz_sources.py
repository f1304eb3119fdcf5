"""Fuzzing the parsers of checkpoint sources: safetensors headers, config.json, tokenizer.json, tokenizer.model.

Each property feeds a parser hostile input built by ``hypothesis`` (arbitrary bytes, arbitrary JSON, or a real
fixture file with parts replaced by arbitrary JSON) and accepts exactly two outcomes: a value, or a
SovpackError. Any other exception is a bug. Example counts are bounded and the search is derandomized, so the
file runs in seconds and CI is reproducible.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.generate import make_checkpoint
from sovpack.converters import family_for_config
from sovpack.errors import SovpackError
from sovpack.source.model import open_model
from sovpack.source.safetensors import DTYPES, SafetensorsFile
from sovpack.targets.gguf.sentencepiece import tokenizer_from_sentencepiece
from sovpack.targets.gguf.tokenizer import tokenizer_from_json

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints" / "llama3"
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Arbitrary JSON values, with the scalars that break naive config readers well represented.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["silu", "llama3", "yarn", "linear", "default", "longrope", "gelu", "float16", ""]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a parser: its value, or None after a SovpackError; any other exception fails the property."""
    try:
        return fn(*args, **kwargs)
    except SovpackError:
        return None


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------- safetensors header

_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(DTYPES)) | JSON,
        "shape": st.lists(st.integers(min_value=-2, max_value=2**40) | JSON, max_size=3) | JSON,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**65), min_size=2, max_size=2) | JSON,
    }
)
_HEADERS = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=6), _ENTRY | JSON, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), _ENTRY, max_size=3).map(
        lambda v: json.dumps(v).encode() + b"   "
    ),
)


@FUZZ
@given(header=_HEADERS, data=st.binary(max_size=64), claimed=st.none() | st.integers(min_value=0, max_value=2**64 - 1))
def test_safetensors_header(workdir: Path, header: bytes, data: bytes, claimed: int | None) -> None:
    path = workdir / "fuzz.safetensors"
    length = len(header) if claimed is None else claimed
    path.write_bytes(struct.pack("<Q", length) + header + data)
    st_file = _outcome(SafetensorsFile, path)
    if st_file is not None:
        for name in st_file.tensors:  # every tensor a valid header declares is readable, within the file
            assert st_file.read(name).nbytes == st_file.tensors[name].nbytes
        st_file.close()


# --------------------------------------------------------------------------------------------- config.json

_BASE_CONFIG: dict[str, Any] = json.loads((FIXTURE / "config.json").read_text())
_CONFIG_KEYS = sorted(
    {
        *_BASE_CONFIG,
        "head_dim", "rope_parameters", "sliding_window", "use_sliding_window", "max_window_layers",
        "partial_rotary_factor", "hidden_activation", "dtype", "attention_bias", "mlp_bias", "model_type",
    }
)  # fmt: skip
_ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate",
              "mscale", "mscale_all_dim", "rope_theta"]
_ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                  "Phi3ForCausalLM", "GemmaForCausalLM"]


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """The fixture's config with some keys replaced by arbitrary JSON (and maybe another family's name)."""
    config = dict(_BASE_CONFIG)
    if draw(st.booleans()):
        config["architectures"] = [draw(st.sampled_from(_ARCHITECTURES))]
    for key in draw(st.lists(st.sampled_from(_CONFIG_KEYS), max_size=4, unique=True)):
        config[key] = draw(JSON)
    if draw(st.booleans()):
        scaling_key = draw(st.sampled_from(["rope_scaling", "rope_parameters"]))
        keys = draw(st.lists(st.sampled_from(_ROPE_KEYS), max_size=5, unique=True))
        scaling = {key: draw(JSON | st.sampled_from(["llama3", "yarn", "linear"])) for key in keys}
        config[scaling_key] = scaling
    return config


@FUZZ
@given(config=configs())
def test_config_to_spec(config: dict[str, Any]) -> None:
    family = _outcome(family_for_config, config, "config.json")
    if family is not None:
        _outcome(family.build_spec, config, "config.json")


@pytest.fixture(scope="module")
def fuzz_checkpoint(workdir: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, workdir / "checkpoint"))


@settings(FUZZ, max_examples=150)
@given(config=configs())
def test_config_through_open_model(fuzz_checkpoint: Path, config: dict[str, Any]) -> None:
    # NOTE: json.dumps writes NaN/Infinity as the non-standard literals real hostile files carry.
    (fuzz_checkpoint / "config.json").write_text(json.dumps(config))
    model = _outcome(open_model, fuzz_checkpoint)
    if model is not None:
        assert model.spec.num_layers == _BASE_CONFIG["num_hidden_layers"]


# ------------------------------------------------------------------------------------------- tokenizer.json


@pytest.fixture(scope="module")
def tokenizers(workdir: Path) -> dict[str, dict[str, Any]]:
    """A byte-level BPE tokenizer.json (llama3) and a SentencePiece-style one (llama2), with their vocab sizes."""
    spm = make_checkpoint("llama2", workdir / "llama2")
    out = {}
    for name, root in (("llama3", FIXTURE), ("llama2", spm)):
        out[name] = {
            "data": json.loads((root / "tokenizer.json").read_text()),
            "config": json.loads((root / "tokenizer_config.json").read_text()),
            "vocab_size": json.loads((root / "config.json").read_text())["vocab_size"],
        }
    return out


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to the containers and scalars of a JSON value (the first few children of long ones: vocabularies
    and merge lists would otherwise drown every other part)."""
    found = [prefix]
    if isinstance(value, dict):
        for key in list(value)[:12]:
            found += _paths(value[key], (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:3]):
            found += _paths(item, (*prefix, i))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


CORPUS = ("Hello world", "  two  spaces", "<|eot_id|> after", "naïve café 123")


@settings(FUZZ, max_examples=200)
@given(which=st.sampled_from(["llama3", "llama2"]), picks=st.data())
def test_tokenizer_json_with_parts_replaced(tokenizers: dict[str, dict[str, Any]], which: str,
                                            picks: st.DataObject) -> None:
    source = tokenizers[which]
    data = source["data"]
    for _ in range(picks.draw(st.integers(min_value=1, max_value=3))):
        path = picks.draw(st.sampled_from(_paths(data)))
        data = _replace(data, path, picks.draw(JSON))
    _outcome(tokenizer_from_json, data, vocab_size=source["vocab_size"], tokenizer_config=source["config"],
             model_name=which, corpus=CORPUS, where="tokenizer.json")


_STEP_TYPES = ["Sequence", "NFC", "NFKC", "Prepend", "Replace", "Metaspace", "ByteLevel", "Split", "Strip",
               "TemplateProcessing", "ByteFallback", "Fuse", "Digits", "BertProcessing", "Lowercase"]
_STEP_VALUES = st.one_of(
    JSON,
    st.sampled_from(["\u2581", " ", "always", "first", "never", "Isolated", "Removed", "<s>", "</s>"]),
    st.fixed_dictionaries({}, optional={"String": st.sampled_from([" ", "\u2581"]) | JSON,
                                        "Regex": st.sampled_from([r"\s+", r"\p{N}", "("]) | JSON}),
    st.lists(st.fixed_dictionaries({}, optional={"SpecialToken": st.fixed_dictionaries(
        {"id": st.sampled_from(["<s>", "</s>", "<|begin_of_text|>"]) | JSON}, optional={"type_id": JSON}),
        "Sequence": st.fixed_dictionaries({"id": st.sampled_from(["A", "B"])})}), max_size=3),
)
_STEP_KEYS = ["type", "pattern", "content", "prepend", "replacement", "prepend_scheme", "split", "behavior",
              "invert", "add_prefix_space", "use_regex", "single", "pair", "special_tokens", "start", "stop",
              "normalizers", "pretokenizers", "processors", "decoders", "trim_offsets"]


@st.composite
def steps(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    """A normalizer / pre-tokenizer / post-processor / decoder step made of the fields the converters read."""
    step: dict[str, Any] = {"type": draw(st.sampled_from(_STEP_TYPES))}
    for key in draw(st.lists(st.sampled_from(_STEP_KEYS), max_size=4, unique=True)):
        if key in ("normalizers", "pretokenizers", "processors", "decoders") and depth < 2:
            step[key] = draw(st.lists(steps(depth + 1), max_size=3))
        else:
            step[key] = draw(_STEP_VALUES)
    return step


@settings(FUZZ, max_examples=200)
@given(which=st.sampled_from(["llama3", "llama2"]), component=st.sampled_from(
    ["normalizer", "pre_tokenizer", "post_processor", "decoder"]), step=steps() | st.none())
def test_tokenizer_json_components(tokenizers: dict[str, dict[str, Any]], which: str, component: str,
                                   step: dict[str, Any] | None) -> None:
    source = tokenizers[which]
    data = {**source["data"], component: step}
    _outcome(tokenizer_from_json, data, vocab_size=source["vocab_size"], tokenizer_config=source["config"],
             model_name=which, corpus=CORPUS, where="tokenizer.json")


@settings(FUZZ, max_examples=100)
@given(data=JSON, vocab_size=st.integers(min_value=1, max_value=64))
def test_tokenizer_json_arbitrary(data: Any, vocab_size: int) -> None:
    _outcome(tokenizer_from_json, data, vocab_size=vocab_size, where="tokenizer.json")


# ---------------------------------------------------------------------------------- tokenizer.model (protobuf)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def protobuf(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A protobuf message with random fields; length-delimited ones may nest another such message."""
    out = bytearray()
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        number = draw(st.sampled_from([1, 2, 3, 35]) | st.integers(min_value=1, max_value=40))
        wire = draw(st.sampled_from([0, 1, 2, 5]) | st.integers(min_value=0, max_value=7))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.integers(min_value=0, max_value=2**64 - 1)))
        elif wire == 1:
            out += draw(st.binary(min_size=0, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=0, max_size=4))
        elif wire == 2:
            payload = draw(protobuf(depth + 1)) if depth < 2 and draw(st.booleans()) else draw(st.binary(max_size=12))
            out += _varint(len(payload) + draw(st.sampled_from([0, 0, 0, 1, -1])) if payload else 0) + payload
        else:
            out += draw(st.binary(max_size=4))
    return bytes(out)


@settings(FUZZ, max_examples=400)
@given(data=protobuf() | st.binary(max_size=300), vocab_size=st.integers(min_value=1, max_value=50))
def test_sentencepiece_model(data: bytes, vocab_size: int) -> None:
    _outcome(tokenizer_from_sentencepiece, data, vocab_size=vocab_size, tokenizer_config={"bos_token": "<s>"},
             where="tokenizer.model")


def test_long_varint_is_refused_quickly() -> None:
    """A run of continuation bytes must not build an ever larger integer (quadratic time)."""
    with pytest.raises(SovpackError, match="varint longer than"):
        tokenizer_from_sentencepiece(b"\x0a" + b"\xff" * 5_000_000, vocab_size=8)
