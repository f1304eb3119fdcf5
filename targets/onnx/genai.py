"""``genai_config.json``: what ``onnxruntime_genai.Model(dir)`` needs to load an onnx artifact.

The per-family model types below are also the onnx target's list of families it can write: a family genai
has no decoder type for is refused by name, never written under another family's type.

# NOTE: model types. onnxruntime-genai runs every "LLM" model type (its ModelType::IsLLM list) through one
# decoder-only pipeline that feeds input_ids / attention_mask / position_ids / past KV and reads logits / present
# KV; the graph computes everything else (soft-caps, windows, norms, rope). The types are the ones its model
# builder writes for each architecture (Gemma3ForCausalLM -> "gemma3_text": plain "gemma3" is its vision-language
# type; Phi-3.5 / Phi-4-mini long-context -> "phi3"). OLMo 2 has no type of its own in onnxruntime-genai 0.18
# (its builder knows only OlmoForCausalLM, and the runtime refuses "olmo2"), so it gets genai's generic
# decoder-only type "decoder" rather than OLMo 1's "olmo"; the artifact's notes say so. The same holds for the
# mixture-of-experts families Qwen3-MoE and Mixtral (0.18's builder and runtime know neither: no "qwen3_moe" or
# "mixtral" type in its library); gpt-oss has its own type, "gptoss" (what its builder writes for
# GptOssForCausalLM, lower-cased architecture name). The experts run inside the graph (com.microsoft.MoE/QMoE),
# which genai's onnxruntime session executes like any other node.

# NOTE: defaults. A user runs ``og.Generator(model, og.GeneratorParams(model))`` and passes nothing else, so the
# ``search`` block is the generation policy: greedy (do_sample false, one beam; top_k 1 keeps even a caller who
# turns sampling on without choosing top_k on the argmax), no penalties, max_length the context length. Measured with
# onnxruntime-genai 0.18 on every fixture family at fp32/fp16/int8/int4: these defaults generate token for token
# what plain onnxruntime (the parity runner) generates, and at fp32 the numpy reference's greedy tokens
# (tests/targets/test_onnx_genai_defaults.py). ``past_present_share_buffer`` must be false: with true, genai
# hands the graph present-KV buffers preallocated to max_length and the graph's Concat (past + new) fails on the
# first run. Session options stay genai's (every core, all graph optimisations, the CPU provider:
# ``provider_options`` empty), which are plain onnxruntime's: on CPU they compute in float32, the thread count
# changed no token (measured at 1 and 2 threads), and pinning threads would only slow users down. What
# genai_config.json cannot carry: genai's ``Tokenizer`` encodes with ``add_special_tokens=false`` fixed in its
# constructor, so a raw-text prompt lacks the BOS the source tokenizer adds unless the caller asks
# (``update_options(add_special_tokens="true")``) or renders the prompt with ``apply_chat_template``, whose text
# carries it; genai_notes says so in the artifact metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sovpack.errors import ConversionError
from sovpack.source.spec import ModelSpec

GENAI_CONFIG = "genai_config.json"

# onnxruntime-genai model types (decoder-only types its runtime accepts) per sovpack family.
GENAI_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3_longrope": "phi3",
    "smollm3": "smollm3",
    "olmo2": "decoder",
    "granite": "granite",
    "qwen3_moe": "decoder",
    "mixtral": "decoder",
    "gpt_oss": "gptoss",
}


# The search block of every decoder's genai_config.json, apart from max_length (the context length): greedy,
# no penalties (see the NOTE on defaults above).
GREEDY_SEARCH: Mapping[str, Any] = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": True,
    "length_penalty": 1.0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    # Our graph concatenates past + new into present: genai must not preallocate the present buffers.
    "past_present_share_buffer": False,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 1,
    "top_p": 1.0,
}


def genai_model_type(spec: ModelSpec) -> str:
    """onnxruntime-genai's model type for ``spec``'s family; a ConversionError naming any other family."""
    model_type = GENAI_MODEL_TYPES.get(spec.family)
    if model_type is None:
        raise ConversionError(
            f"onnx: model family {spec.family!r} has no onnxruntime-genai model type; supported: "
            f"{', '.join(sorted(GENAI_MODEL_TYPES))}"
        )
    return model_type


def genai_notes(spec: ModelSpec) -> list[str]:
    """What a reader of the artifact should know about how onnxruntime-genai runs it (format metadata notes)."""
    notes = []
    if genai_model_type(spec) == "decoder":
        notes.append(
            f"onnxruntime-genai has no model type for {spec.family!r}; genai_config.json declares its generic "
            "decoder-only type 'decoder' (the graph computes the whole forward pass)"
        )
    if any(spec.layer_window(i) is not None for i in range(spec.num_layers)):
        notes.append(
            "sliding windows are applied by the graph's attention mask; genai_config.json declares no "
            "sliding_window, so onnxruntime-genai keeps every position in the KV cache (memory grows with context)"
        )
    if spec.rope_scaling.kind == "longrope":
        notes.append(
            "longrope: each forward pass picks the short or long factors in the graph from its largest "
            "position_id + 1 against original_max_position_embeddings; cached keys keep their rotation "
            "(as transformers does)"
        )
    notes.append(
        "onnxruntime-genai's Tokenizer.encode adds no special tokens (genai fixes add_special_tokens=false; "
        "genai_config.json cannot change it): a raw-text prompt lacks any BOS the source tokenizer adds unless "
        "the caller runs tokenizer.update_options(add_special_tokens='true') or renders it with "
        "apply_chat_template, whose text carries the BOS"
    )
    return notes


def genai_config(spec: ModelSpec, model_file: str) -> dict[str, Any]:
    """The onnxruntime-genai configuration for a graph with sovpack's decoder I/O, greedy by default."""
    eos = [int(t) for t in spec.eos_token_ids]
    pad = spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0)
    bos = spec.bos_token_id if spec.bos_token_id is not None else (eos[0] if eos else pad)
    return {
        "model": {
            "bos_token_id": int(bos),
            "context_length": int(spec.max_position_embeddings),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or int(pad)),
            "pad_token_id": int(pad),
            "type": genai_model_type(spec),
            "vocab_size": spec.vocab_size,
        },
        # sorted, as it always was: the same bytes whatever the order GREEDY_SEARCH lists its keys in
        "search": dict(sorted({**GREEDY_SEARCH, "max_length": int(spec.max_position_embeddings)}.items())),
    }
