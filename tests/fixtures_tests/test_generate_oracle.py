"""transformers as the oracle: it loads every generated checkpoint and tokenizer and agrees on their semantics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from fixtures.generate import make_checkpoint
from fixtures.variants import VARIANTS
from tests.fixtures_tests.shared import MULTILINGUAL, generated_tensors


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_loads_model_and_tokenizer(name: str, generated: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = generated[name]
    # MXFP4 experts: transformers dequantizes them on CPU when asked to (no kernels or accelerate needed)
    load = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if VARIANTS[name].mxfp4 else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True, **load
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    assert type(model).__name__ == json.loads((d / "config.json").read_text())["architectures"][0]

    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert hf.encode("Hello world") == raw.encode("Hello world").ids
    for text in MULTILINGUAL:
        assert hf.encode(text) == raw.encode(text).ids, text

    ids = raw.encode("The quick brown fox jumps over the lazy dog. Привет, 你好! def f(x): return 42").ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    assert logits.shape == (len(ids), raw.get_vocab_size())
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    spread = logits.max(dim=-1).values - logits.min(dim=-1).values
    assert float(spread.min()) > 5.0, spread
    assert float(gap.mean()) > 0.5 and float(gap.median()) > 0.2, gap
    # The layers, not the input token, decide the prediction (tied random embeddings tend to echo the input).
    echo = (logits.argmax(-1) == torch.tensor(ids)).float().mean()
    assert float(echo) < 0.5

    chat = hf.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True)
    assert "Hi there" in chat
    gen = transformers.GenerationConfig.from_pretrained(d)
    assert gen.eos_token_id is not None


@pytest.mark.oracle
def test_phi3_fused_weights_split_into_llama(generated: dict[str, Path]) -> None:
    """Splitting qkv_proj as [q; k; v] and gate_up_proj as [gate; up] gives an equivalent Llama model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = generated["phi3"]
    v = VARIANTS["phi3"]
    phi3 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg = json.loads((d / "config.json").read_text())
    llama_cfg = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_key_value_heads=v.num_key_value_heads,
        head_dim=v.head_dim,
        rms_norm_eps=v.rms_norm_eps,
        rope_theta=v.rope_theta,
        max_position_embeddings=v.max_position_embeddings,
        tie_word_embeddings=False,
    )
    llama = transformers.LlamaForCausalLM(llama_cfg).eval()
    q = v.num_attention_heads * v.head_dim
    kv = v.num_key_value_heads * v.head_dim
    state = {}
    for k, w in generated_tensors(d).items():
        w = torch.from_numpy(w.astype(np.float32))
        if k.endswith("qkv_proj.weight"):
            p = k.removesuffix("qkv_proj.weight")
            state[p + "q_proj.weight"], state[p + "k_proj.weight"], state[p + "v_proj.weight"] = w.split([q, kv, kv])
        elif k.endswith("gate_up_proj.weight"):
            p = k.removesuffix("gate_up_proj.weight")
            state[p + "gate_proj.weight"], state[p + "up_proj.weight"] = w.chunk(2)
        else:
            state[k] = w
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.tensor([Tokenizer.from_file(str(d / "tokenizer.json")).encode("Hello world, again").ids])
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, phi3(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.oracle
def test_mistral_sliding_window_override_takes_effect(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    full = make_checkpoint("mistral", tmp_path / "full", dtype="float32")
    windowed = make_checkpoint("mistral", tmp_path / "sw", dtype="float32", sliding_window=8)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)(ids).logits[0]
        b = transformers.AutoModelForCausalLM.from_pretrained(windowed, dtype=torch.float32)(ids).logits[0]
    torch.testing.assert_close(a[:8], b[:8])  # identical while the context fits in the window
    assert float((a[8:] - b[8:]).abs().max()) > 1e-2
