"""Checkpoint files an attacker controls: caps, non-regular files, hostile JSON, outputs over inputs.

The CLI-level catalogue is tests/hostile/test_sources.py; these are the library-level checks behind it.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sovpack._io import atomic_directory, check_not_input, open_regular, read_capped
from sovpack.cli._app import DEBUG, SovpackGroup
from sovpack.errors import SourceError, SovpackError, UsageError
from sovpack.source.checkpoint import MAX_CONFIG_BYTES, Checkpoint
from sovpack.source.model import open_model
from sovpack.source.tokenizer import check_tokenizer_json, load_tokenizer


def _error(path: Path) -> str:
    with pytest.raises(SourceError) as info:
        open_model(path)
    return str(info.value)


# -------------------------------------------------------------------------------------------- reading files


def test_oversized_config_is_refused_by_its_size(llama3: Path) -> None:
    with open(llama3 / "config.json", "r+b") as fh:
        fh.truncate(MAX_CONFIG_BYTES + 1)  # sparse: nothing is allocated, and nothing must be read
    assert _error(llama3) == f"{llama3 / 'config.json'}: larger than {MAX_CONFIG_BYTES} bytes; refused"


def test_fifo_shard_is_refused_not_opened(llama3: Path) -> None:
    (llama3 / "model.safetensors").rename(llama3 / "weights.safetensors")
    os.mkfifo(llama3 / "more.safetensors")
    assert _error(llama3) == f"{llama3 / 'more.safetensors'}: not a regular file"


def test_open_regular_and_read_capped_refuse_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SourceError, match="not a regular file"):
        open_regular(tmp_path / "pipe")
    with pytest.raises(UsageError, match="not a regular file"):
        read_capped(tmp_path / "pipe", 10, error=UsageError)


def test_symlink_loop_is_an_error(llama3: Path) -> None:
    (llama3 / "loop-a.json").symlink_to(llama3 / "loop-b.json")
    (llama3 / "loop-b.json").symlink_to(llama3 / "loop-a.json")
    assert "cannot resolve" in _error(llama3)


def test_source_files_hash_only_regular_files(llama3: Path) -> None:
    ckpt = Checkpoint(llama3)
    (llama3 / "added_tokens.json").unlink(missing_ok=True)
    os.mkfifo(llama3 / "added_tokens.json")  # swapped in after the checkpoint was opened
    with pytest.raises(SourceError, match=r"added_tokens\.json: not a regular file"):
        _ = ckpt.source_files


def test_duplicate_tensor_name_in_header_is_refused(llama3: Path) -> None:
    path = llama3 / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].decode().rstrip(" ")
    entry = json.dumps(json.loads(header)["model.norm.weight"])
    forged = (header[:-1] + f', "model.norm.weight": {entry}}}').encode()
    path.write_bytes(struct.pack("<Q", len(forged)) + forged + raw[8 + n :])
    assert "duplicate key 'model.norm.weight'" in _error(llama3)


def test_index_entries_are_plain_shard_names(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    ckpt = Path(shutil.copytree(checkpoints["llama2"], tmp_path / "llama2"))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    for bad in ("../x.safetensors", "sub/x.safetensors", ".hidden.safetensors", "config.json", 7):
        index["weight_map"]["model.norm.weight"] = bad
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        assert "invalid shard name" in _error(ckpt), bad


def test_chat_template_must_be_text(llama3: Path) -> None:
    (llama3 / "chat_template.jinja").write_bytes(b"\xff\xfe")
    with pytest.raises(SourceError, match=r"chat_template\.jinja: not UTF-8"):
        _ = Checkpoint(llama3).chat_template


def test_named_chat_templates(llama3: Path) -> None:
    (llama3 / "chat_template.jinja").unlink()
    config = json.loads((llama3 / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (llama3 / "tokenizer_config.json").write_text(json.dumps(config))
    assert Checkpoint(llama3).chat_template == "D"
    config["chat_template"] = 5
    (llama3 / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="'chat_template' is not a string"):
        _ = Checkpoint(llama3).chat_template


def test_layer_count_is_checked_before_building_per_layer(llama3: Path) -> None:
    config = json.loads((llama3 / "config.json").read_text())
    config["num_hidden_layers"] = 2_000_000_000
    (llama3 / "config.json").write_text(json.dumps(config))
    message = _error(llama3)
    assert message.endswith("'num_hidden_layers' is 2000000000 but the checkpoint stores 2 layers (indices 0 to 1)")


def test_generation_config_ids_inside_vocabulary(llama3: Path) -> None:
    (llama3 / "generation_config.json").write_text(json.dumps({"eos_token_id": [601, 605]}))
    assert "generation_config.json: 'eos_token_id': token id 605 is outside the vocabulary" in _error(llama3)


# ----------------------------------------------------------------------------------------------- tokenizer.json


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "the document must be an object"),
        ({"model": "BPE"}, "'model' must be an object"),
        ({"model": {"vocab": {"a": "1"}}}, "model.vocab['a'] must be a non-negative integer token id"),
        ({"model": {"merges": [["a"]]}}, "each merge must be"),
        ({"model": {}, "added_tokens": [{"content": 1, "id": 0}]}, "added_tokens[0].content must be a string"),
        ({"model": {}, "normalizer": {"type": "Sequence", "normalizers": [5]}}, "normalizer.normalizers[0]"),
        ({"model": {}, "pre_tokenizer": {"type": "Split", "pattern": "x"}}, "pre_tokenizer.pattern must be"),
        ({"model": {}, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": 3}}]}},
         "post_processor.single[0].id must be a string"),
    ],
)
def test_tokenizer_json_shape(data: object, problem: str) -> None:
    with pytest.raises(SourceError) as info:
        check_tokenizer_json(data, "tokenizer.json")
    assert str(info.value).startswith("tokenizer.json: malformed tokenizer.json: " + problem)


def test_load_tokenizer_refuses_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(SourceError, match="not a regular file"):
        load_tokenizer(tmp_path / "tokenizer.json")


# -------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("output", ["ck", "ck/out", ".", "link"])
def test_output_over_an_input_is_refused(tmp_path: Path, output: str) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ck")
    with pytest.raises(UsageError, match="refusing to"):
        check_not_input(tmp_path / output, [tmp_path / "ck"])
    with pytest.raises(UsageError), atomic_directory(tmp_path / output, force=True, inputs=[tmp_path / "ck"]):
        pytest.fail("must not be entered")


def test_output_beside_an_input_is_fine(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    check_not_input(tmp_path / "ck-out", [tmp_path / "ck"])  # a shared name prefix is not containment
    with atomic_directory(tmp_path / "out", inputs=[tmp_path / "ck"]) as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x"


def test_full_destination_is_one_error_and_nothing_left(tmp_path: Path) -> None:
    with pytest.raises(SovpackError, match=r"out: cannot write the output: No space left on device"), \
            atomic_directory(tmp_path / "out") as tmp:
        (tmp / "part").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_other_os_errors_keep_their_own_file(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere" / "input.bin"
    with pytest.raises(FileNotFoundError), atomic_directory(tmp_path / "out"):
        missing.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_forced_replacement_keeps_the_old_output_when_the_swap_fails(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self.name.endswith(".tmp"):
            raise OSError(errno.EACCES, "Permission denied", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SovpackError, match="cannot write the output"), \
            atomic_directory(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "old").read_text() == "old"


# ------------------------------------------------------------------------------------------------ CLI funnel


def _group(exc: BaseException) -> click.Group:
    @click.group(cls=SovpackGroup)
    @click.option("--debug", is_flag=True)
    def group(debug: bool) -> None:
        DEBUG["on"] = debug

    @group.command()
    def boom() -> None:
        raise exc

    return group


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), "error: /ro/out: Permission denied"),
        (OSError(errno.ENOSPC, "No space left on device"), "error: No space left on device"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp/a.tmp", None, "/tmp/dir"),
         "error: /tmp/a.tmp -> /tmp/dir: Is a directory"),
        (MemoryError(), "error: out of memory"),
        (RecursionError("maximum recursion depth exceeded"), "error: input nested too deeply"),
    ],
)
def test_cli_funnel_turns_os_and_memory_errors_into_one_line(exc: BaseException, line: str) -> None:
    try:
        result = CliRunner().invoke(_group(exc), ["boom"])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(line) and result.output.count("\n") == 1, result.output
        debug = CliRunner().invoke(_group(exc), ["--debug", "boom"])
        assert isinstance(debug.exception, type(exc))  # --debug keeps the traceback
    finally:
        DEBUG["on"] = False
