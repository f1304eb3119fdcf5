"""Checkpoint reading: bad input gives a SourceError naming the file and the problem, never a traceback."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from sovpack.errors import ConversionError, SourceError
from sovpack.source.checkpoint import Checkpoint
from sovpack.source.model import open_model


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(SourceError) as info:
        open_model(path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_reads_config_tensors_and_digests(llama3: Path) -> None:
    ckpt = Checkpoint(llama3)
    assert ckpt.config["architectures"] == ["LlamaForCausalLM"]
    assert ckpt.tokenizer_json is not None
    assert ckpt.chat_template and "{%" in ckpt.chat_template
    names = [f.path for f in ckpt.source_files]
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    for record in ckpt.source_files:
        assert len(record.sha256) == 64 and record.size == (llama3 / record.path).stat().st_size


def test_tensors_are_lazy_memory_maps(llama3: Path) -> None:
    model = open_model(llama3)
    view = model.stored("embed")
    assert not view.flags.writeable and not view.flags.owndata  # a view of the mmap, not a copy


def test_bf16_and_sharded_checkpoint(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["llama2"])
    assert len(model.checkpoint.shards) == 2
    assert model.checkpoint.stored_dtypes() == {"BF16": len(model.checkpoint.tensors)}
    embed = model.tensor("embed")
    assert embed.dtype == np.float32 and np.isfinite(embed).all()


def test_missing_config(llama3: Path) -> None:
    (llama3 / "config.json").unlink()
    assert _error(llama3) == f"{llama3 / 'config.json'}: missing (every checkpoint needs a config.json)"


def test_malformed_config(llama3: Path) -> None:
    (llama3 / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n "hidden_size": }')
    message = _error(llama3)
    assert message.startswith(f"{llama3 / 'config.json'}: malformed JSON at line 2")


def test_unknown_architecture_lists_supported(llama3: Path) -> None:
    config = json.loads((llama3 / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (llama3 / "config.json").write_text(json.dumps(config))
    message = _error(llama3)
    assert "unsupported architecture MambaForCausalLM" in message
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM", "GemmaForCausalLM"):
        assert arch in message


def test_missing_shard(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    ckpt = shutil.copytree(checkpoints["llama2"], tmp_path / "llama2")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert _error(ckpt) == f"{shard}: missing shard (listed in model.safetensors.index.json)"


def test_missing_tensor(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    header, data = _header(path)
    del header["model.layers.1.mlp.up_proj.weight"]
    _write(path, header, data)
    message = _error(llama3)
    assert "tensor 'model.layers.1.mlp.up_proj.weight' is missing" in message


def test_wrong_shape(llama3: Path) -> None:
    config = json.loads((llama3 / "config.json").read_text())
    config["intermediate_size"] += 8
    (llama3 / "config.json").write_text(json.dumps(config))
    message = _error(llama3)
    assert "model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape" in message
    assert "but config.json implies" in message


def test_header_length_past_end(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    assert "corrupt header: length" in _error(llama3) and "runs past the end of the file" in _error(llama3)


def test_offsets_out_of_range(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    header, data = _header(path)
    entry = header["model.norm.weight"]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(data), len(data) + size]
    _write(path, header, data)
    message = _error(llama3)
    assert message.startswith(f"{path}: truncated or corrupt: tensor 'model.norm.weight' ends at byte")


def test_overlapping_offsets(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    header, data = _header(path)
    names = [n for n in header if n != "__metadata__"]
    first, second = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    start = header[first]["data_offsets"][0]
    if header[first]["data_offsets"][1] - start >= size:
        header[second]["data_offsets"] = [start, start + size]
    _write(path, header, data)
    assert "overlap" in _error(llama3)


def test_unknown_dtype(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    header, data = _header(path)
    header["model.norm.weight"]["dtype"] = "F12"
    _write(path, header, data)
    assert "tensor 'model.norm.weight' has unknown dtype 'F12'" in _error(llama3)


def test_truncated_file(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    assert "truncated or corrupt" in _error(llama3)


def test_tiny_file_is_not_safetensors(llama3: Path) -> None:
    (llama3 / "model.safetensors").write_bytes(b"abc")
    assert "too short for a header" in _error(llama3)


def test_symlink_leaving_directory(llama3: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text((llama3 / "tokenizer.json").read_text())
    (llama3 / "tokenizer.json").unlink()
    os.symlink(outside, llama3 / "tokenizer.json")
    assert "a symlink that leaves the checkpoint directory" in _error(llama3)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.ckpt"])
def test_pickle_only_checkpoint_refused(llama3: Path, name: str) -> None:
    (llama3 / "model.safetensors").unlink()
    # A pickle that would run code if it were ever loaded: it must not be.
    marker = llama3 / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (llama3 / name).write_bytes(payload)
    message = _error(llama3)
    assert "pickle-based weights are refused, never loaded: unpickling runs arbitrary code" in message
    assert name in message
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(llama3: Path) -> None:
    (llama3 / "pytorch_model.bin").write_bytes(b"not loaded")
    assert open_model(llama3).spec.family == "llama"


def test_nonfinite_weights(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    header, data = _header(path)
    begin = header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"][0]
    data = data[:begin] + np.array([np.nan], dtype=np.float32).tobytes() + data[begin + 4 :]
    _write(path, header, data)
    model = open_model(llama3)
    with pytest.raises(SourceError, match=r"contains NaN or Inf values \(pass --allow-nonfinite"):
        model.tensor("layers.0.q")
    assert np.isnan(open_model(llama3, allow_nonfinite=True).tensor("layers.0.q")).any()


def test_values_beyond_the_requested_dtype_are_not_called_nonfinite(llama3: Path) -> None:
    """A finite weight that float16 cannot hold is a ConversionError naming the range, not "NaN or Inf"."""
    path = llama3 / "model.safetensors"
    header, data = _header(path)
    begin = header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"][0]
    data = data[:begin] + np.array([1e5], dtype=np.float32).tobytes() + data[begin + 4 :]
    _write(path, header, data)
    model = open_model(llama3)
    assert model.tensor("layers.0.q").max() == np.float32(1e5)
    with pytest.raises(ConversionError, match=r"'model.layers.0.self_attn.q_proj.weight' has values beyond "
                                              r"float16's range \(largest 65504\)"):
        model.tensor("layers.0.q", np.float16)


def test_not_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    file.write_bytes(b"")
    assert "not a directory" in _error(file)
    assert "no such directory" in _error(tmp_path / "nope")
