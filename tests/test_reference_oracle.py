"""The numpy reference is itself checked: Hugging Face transformers (PyTorch CPU, a test-only extra) is the
independent oracle. Every family must match to 1e-4 in logits and produce identical greedy tokens."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from sovpack.reference import ReferenceModel, rms_norm
from sovpack.source.model import open_model
from sovpack.source.tokenizer import SourceTokenizer

torch = pytest.importorskip("torch", reason="the oracle extra (torch + transformers) is required: make test")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.oracle

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then it keeps running far away.",
    "Le château de Versailles est situé près de Paris. 北京是中国的首都。",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345",
]
NEW_TOKENS = 8
# Prompt lengths in tokens (None: the whole prompt, 34-40 tokens). All are longer than every fixture's sliding
# window (8); with the longrope fixtures' switch at 24 positions, 20 tokens + 8 generated cross it during
# decoding, 24 is the last short-factor prefill and 25 the first long-factor one.
LENGTHS: tuple[int | None, ...] = (None, 20)
LONGROPE_LENGTHS: tuple[int | None, ...] = (None, 25, 24, 20)
MAX_PROMPT = 40


def hf_logits_and_greedy(model: object, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    # transformers >= 5.2x renamed past_key_values to cache; 4.x only knows the old name.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].numpy()
        past = getattr(out, "cache", None) or out.past_key_values
        token = int(out.logits[0, -1].argmax())
        generated = [token]
        for _ in range(NEW_TOKENS - 1):
            out = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: past})
            past = getattr(out, "cache", None) or out.past_key_values
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
    return logits, generated


def assert_matches_oracle(path: Path, **load: object) -> float:
    """Reference vs transformers on every prompt at every length; returns the largest |logit difference|.
    ``load``: extra from_pretrained arguments (a quantization_config)."""
    tokenizer = SourceTokenizer(path / "tokenizer.json")
    reference = ReferenceModel(open_model(path))
    spec = reference.spec
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load).eval()
    assert type(model).__name__ == spec.architecture
    lengths = LONGROPE_LENGTHS if spec.rope_scaling.kind == "longrope" else LENGTHS
    worst = 0.0
    for prompt in PROMPTS:
        for length in lengths:
            ids = tokenizer.encode(prompt)[: length or MAX_PROMPT]
            assert length is None or len(ids) == length, "the prompt is shorter than the length it should test"
            expected_logits, expected_tokens = hf_logits_and_greedy(model, ids)
            logits = reference.prefill_logits(ids)
            error = float(np.abs(logits - expected_logits).max())
            worst = max(worst, error)
            assert error <= 1e-4, f"{path.name}: max |logits difference| {error:.3g} > 1e-4 on {prompt[:20]!r}"
            assert reference.greedy(ids, NEW_TOKENS) == expected_tokens, (path.name, length)
            assert float(np.abs(expected_logits).max()) > 1.0  # the comparison is not between near-zero logits
    return worst


FIRST_SEVEN = ["llama3", "llama2", "mistral", "qwen2", "qwen3", "phi3", "gemma"]
NEWER = ["gemma2", "gemma3", "gemma3-vlm", "phi3.5", "phi4-mini", "smollm3", "olmo2", "granite"]
MOE = ["qwen3moe", "qwen3moe-mixed", "mixtral", "gptoss", "gptoss-clamp"]


@pytest.mark.parametrize("variant", FIRST_SEVEN + NEWER + MOE)
def test_reference_matches_transformers(checkpoints: dict[str, Path], variant: str) -> None:
    assert_matches_oracle(checkpoints[variant])
    window = open_model(checkpoints[variant]).spec.sliding_window
    if variant in NEWER and window is not None:
        assert window < min(LENGTHS[1:]), "windowed layers must really drop context"


@pytest.mark.parametrize(
    ("variant", "overrides"),
    [
        ("llama3", {"config_dialect": "v5"}),  # rope_parameters instead of rope_theta + rope_scaling
        ("qwen2", {"config_dialect": "v4"}),
        ("mistral", {"sliding_window": 8}),  # prompts are longer than the window
        ("gemma", {"dtype": "bfloat16"}),
        # The newer families in the other config dialect (and layout) than their fixture's.
        ("gemma2", {"config_dialect": "v4"}),  # layer pattern derived, rope_theta
        # query_pre_attn_scalar other than head_dim (Gemma 2 27B does that)
        ("gemma2", {"extra_config": {"query_pre_attn_scalar": 24, "attn_logit_softcapping": 8.0,
                                     "final_logit_softcapping": 20.0}}),
        ("gemma3", {"config_dialect": "v4"}),  # rope_local_base_freq, sliding_window_pattern, rope_scaling
        ("gemma3", {"config_dialect": "v4", "global_every": 2, "dtype": "float32"}),  # another pattern
        # Gemma3ForCausalLM applies a final soft-cap when its config has one
        ("gemma3", {"extra_config": {"query_pre_attn_scalar": 48, "final_logit_softcapping": 10.0}}),
        ("gemma3-vlm", {"config_dialect": "v4", "layout": "vlm_legacy"}),  # hub names: language_model.model.*
        ("gemma3-vlm", {"tie_word_embeddings": False, "dtype": "bfloat16"}),  # an untied head: lm_head.weight
        ("phi3.5", {"config_dialect": "v4"}),  # rope_scaling {"type": "longrope", ...}
        ("phi4-mini", {"config_dialect": "v5"}),  # partial_rotary_factor inside rope_parameters
        ("smollm3", {"config_dialect": "v4"}),
        ("smollm3", {"sliding_window": 8}),  # SmolLM3's optional window on its NoPE layers (< every length)
        ("olmo2", {"config_dialect": "v4", "tie_word_embeddings": True}),
        ("granite", {"config_dialect": "v4"}),
        # Mixture of experts: the other dialect, Qwen3MoeConfig's default (no top-k renormalisation), every
        # layer sparse, a window shorter than the prompts, top-1 routing, float32 storage.
        ("qwen3moe", {"config_dialect": "v4", "norm_topk_prob": False}),
        ("qwen3moe", {"mlp_only_layers": (), "experts_per_token": 3, "dtype": "float32"}),
        ("qwen3moe", {"decoder_sparse_step": 2, "mlp_only_layers": (),
                      "extra_config": {"use_sliding_window": True, "sliding_window": 8}}),
        ("mixtral", {"config_dialect": "v5", "sliding_window": 8}),
        ("mixtral", {"experts_per_token": 1, "tie_word_embeddings": True}),
        # gpt-oss as published in transformers 4's dialect (rope_theta + rope_scaling), a longer layer pattern
        # with a shorter window, top-1 routing on float32 weights.
        ("gptoss", {"config_dialect": "v4"}),
        ("gptoss", {"num_hidden_layers": 4, "sliding_window": 4, "seed": 101}),
        ("gptoss", {"experts_per_token": 1, "dtype": "float32"}),
    ],
)
def test_reference_matches_transformers_variants(tmp_path: Path, variant: str, overrides: dict) -> None:
    assert_matches_oracle(make_checkpoint(variant, tmp_path / variant, **overrides))


@pytest.mark.parametrize("variant", MOE)  # gpt-oss: the fused layout it is published in
def test_moe_fixture_is_saved_as_transformers_saves_it(
    checkpoints: dict[str, Path], variant: str, tmp_path: Path
) -> None:
    """transformers 5 fuses experts in memory; saving the loaded fixture writes back exactly its tensor names
    and shapes (the per-expert layout the converters map), so the fixture is what transformers 5 saves."""
    from safetensors import safe_open

    path = checkpoints[variant]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(tmp_path)

    def shapes(directory: Path) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(str(shard), "np") as f:
                found.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        return found

    assert shapes(tmp_path) == shapes(path)


def test_mxfp4_checkpoint_matches_transformers(checkpoints: dict[str, Path]) -> None:
    """gpt-oss as openai publishes it (MXFP4 experts): transformers dequantizes it on CPU (Mxfp4Config's
    dequantize, no kernels needed) and the reference, reading the blocks itself, matches it like any family."""
    dequantize = transformers.Mxfp4Config(dequantize=True)
    assert_matches_oracle(checkpoints["gptoss-mxfp4"], quantization_config=dequantize)
    # and transformers' own decoding of the blocks is the bfloat16 fixture: the two hold one model
    mx = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["gptoss-mxfp4"], dtype=torch.float32,
                                                           quantization_config=dequantize).state_dict()
    bf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["gptoss"], dtype=torch.float32).state_dict()
    assert mx.keys() == bf.keys() and all(torch.equal(mx[k], bf[k]) for k in bf)


def test_gpt_oss_fixture_exercises_sinks_window_and_clamp(checkpoints: dict[str, Path]) -> None:
    """What makes gpt-oss gpt-oss is live in the fixtures: sinks take attention mass, the window is shorter than
    the prompts, and (gptoss-clamp, whose limit is below gpt-oss's 7) the clamped SwiGLU clamps some values."""
    path = checkpoints["gptoss-clamp"]
    model = open_model(path)
    spec, moe = model.spec, model.spec.moe
    assert moe is not None and moe.swiglu_limit is not None and spec.sliding_window is not None
    assert spec.sliding_window < min(LENGTHS[1:]) and set(spec.layer_types) == {"sliding", "full"}
    assert all(float(np.abs(model.tensor(f"layers.{i}.sinks")).max()) > 0.5 for i in range(spec.num_layers))
    # layer 0's expert 0 on the prompt's normalised embeddings (about what its MLP sees)
    h = rms_norm(model.tensor("embed")[SourceTokenizer(path / "tokenizer.json").encode(PROMPTS[0])],
                 model.tensor("layers.0.mlp_norm"), spec.norm_eps)
    gate = h @ model.tensor("layers.0.experts.0.gate").T + model.tensor("layers.0.experts.0.gate_bias")
    assert 0.0 < float((gate > moe.swiglu_limit).mean()) < 0.5


@pytest.mark.parametrize("variant", MOE)
def test_moe_routes_tokens_to_several_experts(
    checkpoints: dict[str, Path], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixtures exercise routing: each sparse layer sends the prompt's tokens to more than k experts."""
    import sovpack.reference

    path = checkpoints[variant]
    reference = ReferenceModel(open_model(path))
    moe = reference.spec.moe
    assert moe is not None and moe.sparse_layers
    chosen_per_layer: list[set[int]] = []
    route = sovpack.reference.route

    def spy(logits: np.ndarray, spec_moe: object) -> tuple[np.ndarray, np.ndarray]:
        chosen, weights = route(logits, spec_moe)  # type: ignore[arg-type]
        chosen_per_layer.append({int(e) for e in chosen.ravel()})
        return chosen, weights

    monkeypatch.setattr(sovpack.reference, "route", spy)
    reference.prefill_logits(SourceTokenizer(path / "tokenizer.json").encode(PROMPTS[0]))
    assert len(chosen_per_layer) == len(moe.sparse_layers)
    assert all(len(experts) > moe.experts_per_token for experts in chosen_per_layer), chosen_per_layer


def test_longrope_switches_where_transformers_does(checkpoints: dict[str, Path]) -> None:
    """The factor switch is real in the fixture: a 25-token pass rotates its early positions differently from a
    24-token one (transformers and the reference agree on both, see LONGROPE_LENGTHS). Position 0 never rotates."""
    path = checkpoints["phi3.5"]
    reference = ReferenceModel(open_model(path))
    ids = SourceTokenizer(path / "tokenizer.json").encode(PROMPTS[0])
    assert reference.spec.rope_scaling.original_max_position_embeddings == 24
    short = reference.prefill_logits(ids[:24])
    long = reference.prefill_logits(ids[:25])
    np.testing.assert_array_equal(short[0], long[0])
    assert float(np.abs(short[1:24] - long[1:24]).max()) > 1e-2


def test_reference_matches_transformers_on_real_smollm2_weights(smollm2: Path) -> None:
    """Real trained weights (SmolLM2-135M-Instruct, fixtures/real_weights.py), where random-weight fixtures cannot
    show it: the reference tracks transformers through 30 layers and answers like the model does.

    NOTE: the bound is 1e-3, not 1e-4: 30 real layers amplify float32 summation-order differences (measured 1.2e-4
    on logits up to 27). Both prompts are checked; "The capital of France is" raw (no template, no BOS, as SmolLM2
    tokenizes it) and a chat-templated question, and each greedy continuation names Paris.
    """
    path = smollm2
    tokenizer = SourceTokenizer(path / "tokenizer.json")
    reference = ReferenceModel(open_model(path))
    assert reference.spec.family == "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chat = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    worst = 0.0
    for prompt in ("The capital of France is", chat):
        ids = tokenizer.encode(prompt)
        expected_logits, expected_tokens = hf_logits_and_greedy(model, ids)
        logits = reference.prefill_logits(ids)
        error = float(np.abs(logits - expected_logits).max())
        worst = max(worst, error)
        assert error <= 1e-3, f"max |logits difference| {error:.3g} > 1e-3 on {prompt[:30]!r}"
        tokens = reference.greedy(ids, NEW_TOKENS)
        assert tokens == expected_tokens, (prompt[:30], tokenizer.decode(tokens), tokenizer.decode(expected_tokens))
        assert "Paris" in tokenizer.decode(tokens), tokenizer.decode(tokens)
        if prompt.startswith("The capital"):
            assert tokenizer.decode(tokens).startswith(" Paris"), tokenizer.decode(tokens)
    print(f"SmolLM2-135M-Instruct: reference vs transformers fp32, max |logit diff| {worst:.3g}")
