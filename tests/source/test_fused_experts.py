"""Experts stored fused: gpt-oss's interleaved "in x out" bfloat16 tensors and its MXFP4 blocks, and transformers
5's in-memory layout of Qwen3-MoE / Mixtral. Each expert reads as the per-expert layout would give it, touching
only that expert's bytes, and broken fused tensors are refused naming the file and the tensor."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fixtures.generate import make_checkpoint
from sovpack.errors import SourceError
from sovpack.source.model import SourceModel, open_model

# FP4 E2M1 as transformers' integrations/mxfp4.py lists it (FP4_VALUES), written out again here on purpose.
LUT = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize_like_transformers(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """convert_moe_packed_tensors in numpy: [E, R, G, 16] + [E, R, G] -> [E, G * 32, R] (transposed as it does)."""
    *prefix, groups, size = blocks.shape
    rows = int(np.prod(prefix)) * groups
    flat = blocks.reshape(rows, size)
    out = np.empty((rows, size * 2), np.float32)
    out[:, 0::2] = LUT[flat & 0x0F]
    out[:, 1::2] = LUT[flat >> 4]
    out = np.ldexp(out, scales.reshape(rows, 1).astype(np.int32) - 127).astype(np.float32)
    return out.reshape(*prefix, groups * size * 2).swapaxes(1, 2)


def stored(path: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_file(str(path / "model.safetensors")).items()}


def test_gpt_oss_experts_are_slices_of_the_fused_tensors(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["gptoss"])
    raw = stored(checkpoints["gptoss"])
    moe = model.spec.moe
    assert moe is not None
    for i in moe.sparse_layers:
        x = f"model.layers.{i}.mlp.experts."
        gate_up, down = raw[x + "gate_up_proj"].astype(np.float32), raw[x + "down_proj"].astype(np.float32)
        bias, down_bias = raw[x + "gate_up_proj_bias"].astype(np.float32), raw[x + "down_proj_bias"].astype(np.float32)
        for e in range(moe.num_experts):
            c = f"layers.{i}.experts.{e}."
            np.testing.assert_array_equal(model.tensor(c + "gate"), gate_up[e][:, 0::2].T)
            np.testing.assert_array_equal(model.tensor(c + "up"), gate_up[e][:, 1::2].T)
            np.testing.assert_array_equal(model.tensor(c + "down"), down[e].T)
            np.testing.assert_array_equal(model.tensor(c + "gate_bias"), bias[e][0::2])
            np.testing.assert_array_equal(model.tensor(c + "up_bias"), bias[e][1::2])
            np.testing.assert_array_equal(model.tensor(c + "down_bias"), down_bias[e])
            assert model.tensor(c + "gate").flags.c_contiguous
            assert model.stored(c + "gate").dtype == raw[x + "gate_up_proj"].dtype  # a view in the stored dtype


def test_mxfp4_experts_dequantize_as_transformers_does(checkpoints: dict[str, Path]) -> None:
    """The MXFP4 fixture's experts equal an independent dequantization (transformers' recipe) and the bfloat16
    fixture's experts (the same model on the MXFP4 grid); everything else is stored identically."""
    mx, bf = open_model(checkpoints["gptoss-mxfp4"]), open_model(checkpoints["gptoss"])
    raw = stored(checkpoints["gptoss-mxfp4"])
    assert mx.spec == bf.spec and mx.tensor_names() == bf.tensor_names()
    moe = mx.spec.moe
    assert moe is not None
    for i in moe.sparse_layers:
        x = f"model.layers.{i}.mlp.experts."
        gate_up = dequantize_like_transformers(raw[x + "gate_up_proj_blocks"], raw[x + "gate_up_proj_scales"])
        down = dequantize_like_transformers(raw[x + "down_proj_blocks"], raw[x + "down_proj_scales"])
        assert gate_up.shape == (moe.num_experts, mx.spec.hidden_size, 2 * moe.expert_intermediate_size)
        for e in range(moe.num_experts):
            c = f"layers.{i}.experts.{e}."
            np.testing.assert_array_equal(mx.tensor(c + "gate"), gate_up[e][:, 0::2].T)
            np.testing.assert_array_equal(mx.tensor(c + "up"), gate_up[e][:, 1::2].T)
            np.testing.assert_array_equal(mx.tensor(c + "down"), down[e].T)
            assert mx.stored(c + "down").dtype == np.float32
            packed = mx.stored_mxfp4(c + "up")
            assert packed is not None and packed[0].dtype == packed[1].dtype == np.uint8
            np.testing.assert_array_equal(packed[0], raw[x + "gate_up_proj_blocks"][e][1::2])
            np.testing.assert_array_equal(packed[1], raw[x + "gate_up_proj_scales"][e][1::2])
    for name in mx.tensor_names():
        np.testing.assert_array_equal(mx.tensor(name), bf.tensor(name), err_msg=name)
        assert (mx.stored_mxfp4(name) is None) == (not name.endswith(("gate", "up", "down")) or ".experts." not in name)
        assert bf.stored_mxfp4(name) is None
    assert len(np.unique(raw["model.layers.0.mlp.experts.down_proj_scales"])) > 1  # scales that differ


def _fuse_transformers_5(path: Path, block: str, names: tuple[str, str, str], experts: int) -> None:
    """Rewrite a per-expert Qwen3-MoE / Mixtral checkpoint the way transformers 5 holds it in memory (and writes
    it with save_original_format=False): mlp.gate, mlp.experts.gate_up_proj [E, 2I, H] (gates, then ups) and
    mlp.experts.down_proj [E, H, I]."""
    tensors = stored(path)
    layers = sorted({k.split(".")[2] for k in tensors if f".{block}.experts." in k}, key=int)
    for i in layers:
        p, q = f"model.layers.{i}.{block}.", f"model.layers.{i}.mlp."
        per = {n: [tensors.pop(f"{p}experts.{e}.{n}.weight") for e in range(experts)] for n in names}
        tensors[q + "experts.gate_up_proj"] = np.concatenate([np.stack(per[names[0]]), np.stack(per[names[1]])], 1)
        tensors[q + "experts.down_proj"] = np.stack(per[names[2]])
        tensors[q + "gate.weight"] = tensors.pop(p + "gate.weight")
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("variant", "block", "names"),
    [("qwen3moe", "mlp", ("gate_proj", "up_proj", "down_proj")), ("mixtral", "block_sparse_moe", ("w1", "w3", "w2"))],
)
def test_transformers_5_fused_layout_reads_like_per_expert(
    checkpoints: dict[str, Path], tmp_path: Path, variant: str, block: str, names: tuple[str, str, str]
) -> None:
    per_expert = open_model(checkpoints[variant])
    moe = per_expert.spec.moe
    assert moe is not None
    path = make_checkpoint(variant, tmp_path / variant)
    _fuse_transformers_5(path, block, names, moe.num_experts)
    fused = open_model(path)
    assert fused.tensor_map["layers.0.experts.1.up"].name == "model.layers.0.mlp.experts.gate_up_proj"
    assert fused.tensor_map["layers.0.router"].name == "model.layers.0.mlp.gate.weight"
    assert fused.tensor_names() == per_expert.tensor_names()
    for name in per_expert.tensor_names():
        np.testing.assert_array_equal(fused.tensor(name), per_expert.tensor(name), err_msg=name)
        fused.release_pages(name)


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["qwen3moe", "mixtral"])
def test_transformers_save_original_format_false_is_read(
    checkpoints: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    """The layout transformers 5 itself writes with save_original_format=False reads as the published one."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[variant], dtype=torch.float32)
    model.save_pretrained(tmp_path, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored(tmp_path)
    fused, per_expert = open_model(tmp_path), open_model(checkpoints[variant])
    for name in per_expert.tensor_names():
        np.testing.assert_array_equal(fused.tensor(name), per_expert.tensor(name), err_msg=name)


def _largest_allocation_reading_experts(model: SourceModel) -> tuple[int, int]:
    """(peak traced bytes while reading any one expert tensor, bytes of the largest expert tensor as float32)."""
    names = [n for n in model.tensor_names() if ".experts." in n]
    worst = 0
    tracemalloc.start()
    try:
        for name in names:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            array = model.tensor(name)
            worst = max(worst, tracemalloc.get_traced_memory()[1] - before)
            del array
            model.release_pages(name)
    finally:
        tracemalloc.stop()
    return worst, max(model.tensor(n).nbytes for n in names)


@pytest.mark.parametrize("mxfp4", [False, True])
def test_reading_one_expert_allocates_about_one_expert(tmp_path: Path, mxfp4: bool) -> None:
    """16 experts of 256 x 512 fused in one tensor per layer: reading them one at a time never allocates more
    than ~2x one expert (float32), nowhere near the fused tensor (16x)."""
    path = make_checkpoint("gptoss", tmp_path / "big", hidden_size=256, intermediate_size=512, num_experts=16,
                           num_hidden_layers=1, mxfp4=mxfp4)
    model = open_model(path)
    peak, expert = _largest_allocation_reading_experts(model)
    fused = model.checkpoint.tensors[model.tensor_map["layers.0.experts.0.gate"].name].nbytes
    assert fused >= 4 * expert
    assert peak <= 2 * expert + 64 * 1024, (peak, expert, fused)


def test_broken_fused_tensors_are_refused_by_name(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = make_checkpoint("gptoss", tmp_path / "g")
    tensors = stored(path)
    x = "model.layers.1.mlp.experts."
    tensors[x + "gate_up_proj"] = np.concatenate([tensors[x + "gate_up_proj"]] * 2)  # 8 experts, config says 4
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(SourceError, match=r"model\.safetensors: fused tensor 'model\.layers\.1\.mlp\.experts\."
                       r"gate_up_proj' has shape \[8, 64, 128\] but config\.json implies \[4, 64, 128\]"):
        open_model(path)
    del tensors[x + "gate_up_proj"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(SourceError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.gate_up_proj' is missing"):
        open_model(path)
