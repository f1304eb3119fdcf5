"""What cannot run here is refused before any work: each target's parity runtime must fit in the machine's memory
(issue 17: an fp32 artifact of an 8B model is refused up front, never OOM-killed halfway)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sovpack.attest.dsse import SigningKey, generate_key_pair
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig
from sovpack.convert import convert
from sovpack.errors import UsageError
from sovpack.source.model import open_model
from sovpack.targets.base import BASE_MEMORY_BYTES, TargetRef, check_runtime_memory, machine_memory

GIB = 2**30


def test_each_runtime_estimates_its_own_memory(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    spec = open_model(checkpoints["llama3"]).spec
    big = dataclasses.replace(spec, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                              num_kv_heads=8, head_dim=128, vocab_size=128256)
    params = big.parameter_count()
    assert 7.9e9 < params < 8.1e9  # Llama-3-8B
    need = {t: TargetRef.parse(t).info.runtime_memory(params) / GIB for t in
            ("onnx:fp32", "onnx:fp16", "onnx:int4", "openvino:fp16", "openvino:int4", "gguf:q4_k_m", "gguf:f16",
             "gguf:q8_0", "gguf:q6_k")}
    assert need["onnx:fp16"] == need["onnx:fp32"] > 29  # onnxruntime widens fp16 initializers at load
    assert 14 < need["openvino:fp16"] < 16 and need["onnx:int4"] < 6
    assert 7 < need["openvino:int4"] < 8  # the CPU plugin's f32 group scales and zero points (measured)
    assert need["gguf:f16"] == need["gguf:q8_0"] == need["gguf:q6_k"] == 0  # llama.cpp maps the file
    assert 4 < need["gguf:q4_k_m"] < 5.5  # ... but repacks 4-bit tensors into its own buffers (measured 4.1 GB)
    # On a 24 GB machine: fp32 refused by name with what it needs, the 4-bit set and llama.cpp let through.
    with pytest.raises(UsageError, match=r"onnx:fp32: .*8\.0B-parameter.*needs about 31\.9 GiB.*has 24\.0 GiB"):
        check_runtime_memory([TargetRef.parse("gguf:f16"), TargetRef.parse("onnx:fp32")], big, memory=24 * GIB)
    check_runtime_memory([TargetRef.parse(t) for t in ("onnx:int4", "gguf:q4_k_m", "openvino:int4")], big,
                         memory=24 * GIB)
    assert machine_memory() > BASE_MEMORY_BYTES


def test_a_build_that_cannot_fit_writes_nothing(checkpoints: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's size is the one thing faked here: the fixture's ~0.5 MB of weights on a 'machine' that
    cannot even hold the runtimes' fixed part. Refused before the reference runs, no output, no scratch."""
    import sovpack.targets.base as base

    monkeypatch.setattr(base, "machine_memory", lambda: BASE_MEMORY_BYTES)
    pair = generate_key_pair(tmp_path / "keys")
    out = tmp_path / "bundle"
    config = BuildConfig(checkpoint=checkpoints["llama3"], output=out, targets=("onnx:fp16",))
    with pytest.raises(UsageError, match=r"onnx:fp16: running this .* needs about"):
        build_bundle(config, key=SigningKey.load(pair.private_key, None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]
    with pytest.raises(UsageError, match="gguf:q8_0: running"):
        convert(checkpoints["llama3"], "gguf:q8_0", tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
    convert(checkpoints["llama3"], "gguf:q8_0", tmp_path / "converted", parity=False)  # no runtime: no check
