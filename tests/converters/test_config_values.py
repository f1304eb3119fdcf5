"""Config values of the wrong type or out of range are SourceErrors naming config.json and the key."""

from __future__ import annotations

import math

import pytest

from sovpack.converters import family_for_config
from sovpack.converters.base import ConfigReader, check_generation_config
from sovpack.errors import SourceError
from sovpack.source.spec import ModelSpec

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def spec(**changes: object) -> ModelSpec:
    config = {**BASE, **changes}
    return family_for_config(config, "config.json").build_spec(config, "config.json")


def refused(**changes: object) -> str:
    with pytest.raises(SourceError) as info:
        spec(**changes)
    message = str(info.value)
    assert message.startswith("config.json: "), message
    return message


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"architectures": 5}, "'architectures' must be a list of strings"),
        ({"architectures": "LlamaForCausalLM"}, "'architectures' must be a list of strings"),
        ({"architectures": None, "model_type": ["llama"]}, "'model_type' must be a string"),
        ({"hidden_act": ["silu"]}, "'hidden_act': activation ['silu'] is not supported"),
        ({"hidden_act": "relu"}, "'hidden_act': activation 'relu' is not supported"),
        ({"hidden_size": "64"}, "'hidden_size' must be an integer, got '64'"),
        ({"hidden_size": True}, "'hidden_size' must be an integer, got True"),
        ({"hidden_size": 2**31}, "'hidden_size' must be an integer from 1 to 2147483647"),
        ({"vocab_size": 10**400}, "'vocab_size' must be an integer from 1 to 2147483647, got <an integer of"),
        ({"num_hidden_layers": 0}, "'num_hidden_layers' must be an integer from 1"),
        ({"num_attention_heads": {"a": 1}}, "'num_attention_heads' must be an integer"),
        ({"head_dim": 15}, "'head_dim' (15) must be even"),
        ({"head_dim": 0}, "'head_dim' must be an integer from 1"),
        ({"max_position_embeddings": -1}, "'max_position_embeddings' must be an integer from 1"),
        ({"rms_norm_eps": math.nan}, "'rms_norm_eps' must be a finite number"),
        ({"rms_norm_eps": math.inf}, "'rms_norm_eps' must be a finite number"),
        ({"rms_norm_eps": 10**400}, "'rms_norm_eps' must be a finite number"),
        ({"rms_norm_eps": -1e-6}, "'rms_norm_eps' must be greater than 0"),
        ({"rms_norm_eps": [1e-6]}, "'rms_norm_eps' must be a number"),
        ({"rope_theta": 0}, "'rope_theta' must be greater than 0"),
        ({"rope_theta": 1e39}, "'rope_theta' must be a finite number within float32's range"),
        ({"rope_theta": "1e4"}, "'rope_theta' must be a number"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -5}}, "'rope_parameters.rope_theta' must be"),
        ({"rope_parameters": [1]}, "'rope_parameters' must be a JSON object"),
        ({"rope_scaling": "linear"}, "'rope_scaling' must be a JSON object"),
        ({"rope_scaling": {"rope_type": 3}}, "'rope_scaling.rope_type' must be a string"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "'rope_scaling.factor' must be greater than 0"),
        ({"rope_scaling": {"rope_type": "linear", "factor": math.inf}}, "'rope_scaling.factor' must be a finite"),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "'rope_scaling.high_freq_factor' (1) must be greater"),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": -1.0}}, "'rope_scaling.low_freq_factor' must be greater"),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 0}},
         "'rope_scaling.original_max_position_embeddings' must be an integer from 1"),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": "64"}},
         "'rope_scaling.original_max_position_embeddings' must be an integer"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_slow": -1}}, "'rope_scaling.beta_slow' must be"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0}},
         "'rope_scaling.attention_factor' must be greater than 0"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}},
         "'rope_scaling.truncate' must be true or false"),
        ({"rope_theta": 1.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         "yarn rope scaling needs a rope theta greater than 1"),
        ({"partial_rotary_factor": "half"}, "'partial_rotary_factor' must be a number"),
        ({"eos_token_id": 100}, "'eos_token_id': token id 100 is outside the vocabulary (0 to 99)"),
        ({"eos_token_id": [1, -1]}, "'eos_token_id': token id -1 is outside the vocabulary"),
        ({"bos_token_id": "1"}, "'bos_token_id' must be a token id or a list of them"),
        ({"pad_token_id": True}, "'pad_token_id' must be a token id or a list of them"),
        ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
        ({"torch_dtype": 16}, "'torch_dtype' must be a string"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 0}, "'sliding_window' must be an integer from 1"),
        ({"architectures": ["Phi3ForCausalLM"], "sliding_window": -5}, "'sliding_window' must be an integer from 1"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "max_window_layers": "all"},
         "'max_window_layers' must be an integer"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": 1}, "'use_sliding_window' must be true"),
        ({"architectures": ["GemmaForCausalLM"], "hidden_activation": {"gelu": 1}},
         "'hidden_activation': activation {'gelu': 1} is not supported"),
    ],
)
def test_bad_value_names_the_key(changes: dict[str, object], key: str) -> None:
    assert key in refused(**changes)


def test_null_counts_as_absent() -> None:
    assert spec(head_dim=None, sliding_window=None, rope_scaling=None, eos_token_id=None).head_dim == 16


def test_valid_values_still_read() -> None:
    s = spec(rope_theta=500000, rope_scaling=LLAMA3, eos_token_id=[1, 2], bos_token_id=0, rms_norm_eps=1e-5)
    assert s.rope_theta == 500000.0 and s.rope_scaling.original_max_position_embeddings == 64
    assert s.eos_token_ids == (1, 2) and s.bos_token_id == 0 and s.norm_eps == 1e-5
    yarn = spec(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 64})
    assert yarn.rope_scaling.factor == 4.0  # 256 / 64: no factor given, the extension itself
    legacy_float = spec(rope_scaling={**LLAMA3, "original_max_position_embeddings": 64.0})
    assert legacy_float.rope_scaling.original_max_position_embeddings == 64


def test_generation_config_ids() -> None:
    check_generation_config({"eos_token_id": [1, 99], "pad_token_id": None}, 100, "generation_config.json")
    with pytest.raises(SourceError, match=r"generation_config\.json: 'eos_token_id': token id 100 is outside"):
        check_generation_config({"eos_token_id": [1, 100]}, 100, "generation_config.json")
    with pytest.raises(SourceError, match="'bos_token_id' must be a token id"):
        check_generation_config({"bos_token_id": {"id": 1}}, 100, "generation_config.json")


def test_long_values_are_shortened_in_messages() -> None:
    reader = ConfigReader({"hidden_size": "x" * 10_000}, "config.json")
    with pytest.raises(SourceError) as info:
        reader.positive("hidden_size")
    assert len(str(info.value)) < 200


def test_config_must_be_an_object() -> None:
    with pytest.raises(SourceError, match=r"config\.json: the config must be a JSON object"):
        ConfigReader([1], "config.json")  # type: ignore[arg-type]
