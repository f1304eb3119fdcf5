"""onnxruntime-genai at its DEFAULT settings on sovpack's decoder artifacts (issue 16): what a user types.

``og.Model(dir)``, ``og.Generator(model, og.GeneratorParams(model))`` with no search option set, the prompt
appended, ``generate_next_token`` until ``is_done()``: everything else comes from the artifact's
genai_config.json. Measured with onnxruntime-genai 0.18.0 on every fixture family at fp32/fp16/int8/int4, both
before and after the genai.py change of this test's commit (the change documents the defaults and adds a
tokenizer note; the config's bytes are unchanged, because they already carried what the defaults need):

- the defaults generate exactly what plain onnxruntime (the parity runner) generates: 84/84 family-precision
  pairs, every token;
- against the numpy reference's greedy tokens (matched prefix, 8 parity prompts x 12 tokens): fp32 exact for
  every family; fp16 exact except llama3 89/96 and olmo2 84/96, the same counts as plain onnxruntime (fp16 weight
  rounding, not genai); int8 and int4 likewise equal plain onnxruntime's counts (int8 68..96/96, int4 3..63/96 on
  these random-weight fixtures: quantization error, which the parity gate judges, not genai).

What genai_config.json cannot carry, tested here as a user meets it: genai's Tokenizer encodes raw text without
special tokens (no BOS), while ``apply_chat_template`` renders the source template whose text carries them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.variants import VARIANTS
from sovpack.convert import ConvertResult, convert
from sovpack.parity.prompts import PROMPTS, encode_prompts
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.source.tokenizer import load_tokenizer
from tests.targets.shared import reference_cache

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")

from sovpack.targets.onnx import GENAI_CONFIG, OnnxRunner  # noqa: E402
from sovpack.targets.onnx.graph import MODEL_FILE  # noqa: E402

FAMILIES = sorted(VARIANTS)  # every decoder fixture, each converted as a user would
PRECISIONS = ["fp32", "fp16", "int8", "int4"]
MAX_NEW = 12
# fp16 pairs whose greedy tokens differ from the fp32 reference (matched 89/96 and 84/96, plain onnxruntime
# identical): fp16 weights, not genai. Every other fp32/fp16 pair matches the reference exactly.
FP16_ROUNDING = {"llama3", "olmo2"}
# Families whose genai tokenizer splits the chat-template text differently from the source tokenizer: the
# fixture's Metaspace pre-tokenizer (prepend_scheme "first") gets an extra "▁" after "<s>" from
# onnxruntime-extensions (see GENAI_TOKENIZER_DIVERGENCES in test_onnx_genai.py); the rendered text itself is equal.
CHAT_ID_DIVERGENCES = {"mistral", "mixtral"}
# Families whose genai tokenizer merges runs of spaces differently from the source (the parity "code" prompt's
# four-space indents; GENAI_TOKENIZER_DIVERGENCES in test_onnx_genai.py): SentencePiece-style BPE fixtures.
SPACE_RUN_DIVERGENCES = {"llama2", "mistral", "mixtral", "phi3", "phi3.5", "phi4-mini"}


@pytest.fixture(scope="module")
def artifact(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str, str], ConvertResult]:
    """convert(variant, precision) once per module, without parity: this module judges the artifact itself,
    and a random-weight int4 artifact the parity gate would refuse still shows what genai's defaults do."""
    root = tmp_path_factory.mktemp("genai-defaults")
    cache: dict[tuple[str, str], ConvertResult] = {}

    def make(variant: str, precision: str) -> ConvertResult:
        if (variant, precision) not in cache:
            cache[variant, precision] = convert(checkpoints[variant], f"onnx:{precision}",
                                                root / f"{variant}-{precision}", parity=False)
        return cache[variant, precision]

    return make


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> Callable[[str], ReferenceModel]:
    return reference_cache(checkpoints)


def _generate_at_defaults(model: Any, ids: list[int], max_new: int) -> list[int]:
    """What a user's loop gets: default GeneratorParams, stopping at genai's own is_done() (eos, max_length)."""
    generator = og.Generator(model, og.GeneratorParams(model))
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    tokens: list[int] = []
    while len(tokens) < max_new and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def _prefix(got: list[int], expected: list[int]) -> int:
    matched = 0
    for a, b in zip(got, expected, strict=False):
        if a != b:
            break
        matched += 1
    return matched


@pytest.mark.parametrize("family", FAMILIES)
def test_genai_config_carries_the_defaults(artifact: Callable[[str, str], ConvertResult],
                                           checkpoints: dict[str, Path], family: str) -> None:
    out = artifact(family, "fp32").out_dir
    spec = open_model(checkpoints[family]).spec
    config = json.loads((out / GENAI_CONFIG).read_text())
    model, decoder, search = config["model"], config["model"]["decoder"], config["search"]
    # greedy, one beam, no penalties, up to the context length; present KV not preallocated (see below)
    assert search == {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": spec.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 1, "top_p": 1.0,
    }
    assert model["context_length"] == spec.max_position_embeddings
    # genai's defaults for the session: the CPU provider, its thread count and graph optimisations
    assert decoder["session_options"] == {"log_id": "onnxruntime-genai", "provider_options": []}
    # the names genai binds are the graph's own
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    names = decoder["inputs"]
    assert [names["input_ids"], names["attention_mask"], names["position_ids"]] == inputs[:3]
    layers = range(decoder["num_hidden_layers"])
    assert inputs[3:] == [names[f"past_{kind}_names"] % i for i in layers for kind in ("key", "value")]
    assert outputs == [decoder["outputs"]["logits"]] + [
        decoder["outputs"][f"present_{kind}_names"] % i for i in layers for kind in ("key", "value")]
    # the special tokens, as genai itself reads them
    tokenizer = og.Tokenizer(og.Model(str(out)))
    assert [int(t) for t in tokenizer.eos_token_ids] == list(spec.eos_token_ids)
    pad = spec.pad_token_id if spec.pad_token_id is not None else spec.eos_token_ids[0]
    assert int(tokenizer.pad_token_id) == model["pad_token_id"] == pad
    if spec.bos_token_id is not None:
        assert int(tokenizer.bos_token_id) == model["bos_token_id"] == spec.bos_token_id
    # every precision writes the same genai_config.json
    for precision in PRECISIONS[1:]:
        assert json.loads((artifact(family, precision).out_dir / GENAI_CONFIG).read_text()) == config


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generator_at_its_defaults(artifact: Callable[[str, str], ConvertResult], checkpoints: dict[str, Path],
                                   references: Callable[[str], ReferenceModel], family: str, precision: str,
                                   record_property: Callable[[str, object], None]) -> None:
    """Default GeneratorParams: token for token what the parity runner generates; at fp32 (and fp16 where
    the weights' rounding moves nothing) the reference's greedy tokens."""
    out = artifact(family, precision).out_dir
    ref = references(family)
    stops = ref.spec.eos_token_ids
    model, plain = og.Model(str(out)), OnnxRunner(out)
    matched = total = 0
    for ids in encode_prompts(checkpoints[family] / "tokenizer.json"):
        got = _generate_at_defaults(model, ids, MAX_NEW)
        assert got == plain.greedy(ids, MAX_NEW, stops), ids
        expected = ref.greedy(ids, MAX_NEW, stops)
        matched, total = matched + _prefix(got, expected), total + len(expected)
    record_property("greedy_agreement_at_defaults", f"{matched}/{total}")
    if precision == "fp32" or (precision == "fp16" and family not in FP16_ROUNDING):
        assert matched == total


def test_past_present_share_buffer_must_stay_false(artifact: Callable[[str, str], ConvertResult],
                                                    checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """With true, genai preallocates present KV to max_length; the graph's past+new Concat refuses it."""
    out = tmp_path / "shared"
    shutil.copytree(artifact("llama3", "fp32").out_dir, out)
    config = json.loads((out / GENAI_CONFIG).read_text())
    config["search"]["past_present_share_buffer"] = True
    (out / GENAI_CONFIG).write_text(json.dumps(config))
    ids = encode_prompts(checkpoints["llama3"] / "tokenizer.json")[0]
    with pytest.raises(RuntimeError, match="present"):
        _generate_at_defaults(og.Model(str(out)), ids, 2)


def test_is_done_at_every_eos_id(artifact: Callable[[str, str], ConvertResult], checkpoints: dict[str, Path],
                                 references: Callable[[str], ReferenceModel], tmp_path: Path) -> None:
    """A list-valued eos_token_id (llama3 has two) stops the default loop at any of them."""
    ref = references("llama3")
    ids = encode_prompts(checkpoints["llama3"] / "tokenizer.json")[0]
    expected = ref.greedy(ids, MAX_NEW, ())
    stop_at = next(i for i in range(2, len(expected)) if expected[i] not in expected[:i])
    out = tmp_path / "eos"
    shutil.copytree(artifact("llama3", "fp32").out_dir, out)
    config = json.loads((out / GENAI_CONFIG).read_text())
    assert isinstance(config["model"]["eos_token_id"], list)
    config["model"]["eos_token_id"] = [config["model"]["eos_token_id"][0], expected[stop_at]]
    (out / GENAI_CONFIG).write_text(json.dumps(config))
    assert _generate_at_defaults(og.Model(str(out)), ids, MAX_NEW) == expected[:stop_at + 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_at_its_defaults_adds_no_bos(artifact: Callable[[str, str], ConvertResult],
                                               checkpoints: dict[str, Path], family: str) -> None:
    """genai fixes add_special_tokens=false in its Tokenizer (no genai_config field changes it): raw text gets
    the source's ids without special tokens; update_options gives the reference's prompt ids; the artifact
    metadata tells users so."""
    result = artifact(family, "fp32")
    source = load_tokenizer(checkpoints[family] / "tokenizer.json")
    tokenizer = og.Tokenizer(og.Model(str(result.out_dir)))
    plain = {text: [int(t) for t in tokenizer.encode(text)] for text in PROMPTS}
    tokenizer.update_options(add_special_tokens="true")
    special = {text: [int(t) for t in tokenizer.encode(text)] for text in PROMPTS}
    for text in PROMPTS:
        want_plain = list(source.encode(text, add_special_tokens=False).ids)
        want_special = list(source.encode(text, add_special_tokens=True).ids)
        added = len(want_special) - len(want_plain)  # the BOS (no fixture's tokenizer appends anything)
        assert want_special[added:] == want_plain
        # the defaults lack exactly the special tokens the source adds, which update_options restores
        assert special[text] == want_special[:added] + plain[text]
        if not (family in SPACE_RUN_DIVERGENCES and "\n    " in text):
            assert plain[text] == want_plain
    assert any("add_special_tokens" in note for note in result.metadata.format_metadata["notes"])


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_at_its_defaults(artifact: Callable[[str, str], ConvertResult], checkpoints: dict[str, Path],
                                       references: Callable[[str], ReferenceModel], family: str) -> None:
    """The user's chat path: genai renders the source's template as transformers does, and greedy decoding of
    the encoded prompt at the defaults gives the reference's tokens."""
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "user", "content": PROMPTS[0]}]
    source = transformers.AutoTokenizer.from_pretrained(str(checkpoints[family]))
    want_text = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_ids = [int(t) for t in source(want_text, add_special_tokens=False)["input_ids"]]
    out = artifact(family, "fp32").out_dir
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert text == want_text
    ids = [int(t) for t in tokenizer.encode(text)]
    if family in CHAT_ID_DIVERGENCES:
        assert ids != want_ids and len(ids) == len(want_ids) + 1  # the one extra "▁" token
    else:
        assert ids == want_ids
    ref = references(family)
    assert _generate_at_defaults(model, ids, MAX_NEW) == ref.greedy(ids, MAX_NEW, ref.spec.eos_token_ids)
