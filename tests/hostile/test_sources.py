"""Hostile sources: checkpoints, configs, tokenizer files and output paths an attacker controls.

Each case damages a private copy of the committed llama3 fixture in one way, runs the real CLI in a limited
child process (``harness.run_cli``: RLIMIT_CPU, RLIMIT_AS, a wall ceiling for blocked children) and asserts a
clean refusal: exit 1 (2 for usage errors), one ``error:`` line naming the file and the problem, no traceback.
Cases that write also prove that no input changed and nothing was left beside the output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hostile.harness import Outcome, assert_refused, run_cli, tree_snapshot

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints" / "llama3"
GIB = 1024**3
DROP = object()  # a config value that removes the key


@dataclass(frozen=True)
class Attack:
    """What one case does: damage the checkpoint copy, then run ``command`` (``{ck}``/``{tmp}`` substituted)."""

    damage: Callable[[Path, Path], None]
    mentions: tuple[str, ...]
    command: tuple[str, ...] = ("inspect", "{ck}")
    usage: bool = False
    writes: bool = False  # the command writes: check that the input is unchanged and nothing was left behind
    needs_mount: str | None = None  # "ro" or "full": a tmpfs mounted at {tmp}/mnt for the case


CASES: dict[str, Attack] = {}


def case(name: str, damage: Callable[[Path, Path], None], *mentions: str, **kwargs: Any) -> None:
    assert name not in CASES, name
    CASES[name] = Attack(damage=damage, mentions=mentions, **kwargs)


# ------------------------------------------------------------------------------------------------ damage helpers


def config(**changes: Any) -> Callable[[Path, Path], None]:
    """Change config.json keys (DROP removes one); NaN/inf values are written as JSON's non-standard literals."""

    def damage(ck: Path, _tmp: Path) -> None:
        data = json.loads((ck / "config.json").read_text())
        for key, value in changes.items():
            if value is DROP:
                data.pop(key, None)
            else:
                data[key] = value
        (ck / "config.json").write_text(json.dumps(data))

    return damage


def config_text(replace: dict[str, str]) -> Callable[[Path, Path], None]:
    """Edit config.json as text (for values json.dumps cannot write: 1e400, duplicate keys)."""

    def damage(ck: Path, _tmp: Path) -> None:
        text = json.dumps(json.loads((ck / "config.json").read_text()))
        for old, new in replace.items():
            assert old in text, old
            text = text.replace(old, new)
        (ck / "config.json").write_text(text)

    return damage


def write_file(name: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def damage(ck: Path, _tmp: Path) -> None:
        path = ck / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return damage


def sparse(name: str, size: int = 2 * GIB) -> Callable[[Path, Path], None]:
    """A sparse file of ``size`` bytes starting with '{': reading it whole would take ``size`` bytes of memory."""

    def damage(ck: Path, _tmp: Path) -> None:
        path = ck / name
        with open(path, "wb") as fh:
            fh.write(b'{"a": "')
            fh.truncate(size)

    return damage


def fifo(name: str, *, remove: tuple[str, ...] = ()) -> Callable[[Path, Path], None]:
    def damage(ck: Path, _tmp: Path) -> None:
        for other in remove:
            (ck / other).unlink()
        path = ck / name
        if path.exists():
            path.unlink()
        os.mkfifo(path)

    return damage


def char_device(name: str, *, remove: tuple[str, ...] = ()) -> Callable[[Path, Path], None]:
    """A character device (/dev/zero's numbers) named like a checkpoint file (root can mknod)."""

    def damage(ck: Path, _tmp: Path) -> None:
        for other in remove:
            (ck / other).unlink()
        os.mknod(ck / name, stat.S_IFCHR | 0o600, os.makedev(1, 5))

    return damage


def _header(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def header_text(edit: Callable[[str, bytes], tuple[str, bytes]]) -> Callable[[Path, Path], None]:
    """Rewrite model.safetensors' JSON header as text, and maybe its data section."""

    def damage(ck: Path, _tmp: Path) -> None:
        path = ck / "model.safetensors"
        header, data = _header(path)
        text, data = edit(header.decode().rstrip(" "), data)  # the header may be padded with spaces
        new = text.encode()
        path.write_bytes(struct.pack("<Q", len(new)) + new + data)

    return damage


def _duplicate_tensor(text: str, data: bytes) -> tuple[str, bytes]:
    """A second entry for the final norm pointing at appended bytes: json.loads keeps the last one, so the
    model would silently read the attacker's bytes where a first-wins parser reads the original."""
    entry = json.loads(text)["model.norm.weight"]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    forged = {**entry, "data_offsets": [len(data), len(data) + size]}
    return text[:-1] + ', "model.norm.weight": ' + json.dumps(forged) + "}", data + b"\x7f" * size


def _nested_metadata(text: str, data: bytes) -> tuple[str, bytes]:
    return text[:-1] + ', "__metadata__": {"x": ' + "[" * 50_000 + "]" * 50_000 + "}}", data


def index(weight_map: dict[str, Any] | None = None, *, raw: str | None = None) -> Callable[[Path, Path], None]:
    """A model.safetensors.index.json beside the single file (the index takes precedence)."""

    def damage(ck: Path, _tmp: Path) -> None:
        path = ck / "model.safetensors.index.json"
        if raw is not None:
            path.write_text(raw)
            return
        header, _ = _header(ck / "model.safetensors")
        names = [n for n in json.loads(header) if n != "__metadata__"]
        mapping: dict[str, Any] = dict.fromkeys(names, "model.safetensors")
        mapping.update(weight_map or {})
        path.write_text(json.dumps({"metadata": {}, "weight_map": mapping}))

    return damage


def index_to(target: str, setup: Callable[[Path, Path], None] | None = None) -> Callable[[Path, Path], None]:
    """An index whose shard entries all point at ``target``."""

    def damage(ck: Path, tmp: Path) -> None:
        if setup is not None:
            setup(ck, tmp)
        header, _ = _header(ck / "model.safetensors")
        names = [n for n in json.loads(header) if n != "__metadata__"]
        (ck / "model.safetensors").rename(ck / "shard-1.safetensors")
        mapping = dict.fromkeys(names, target)
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": mapping}))

    return damage


def both(*damages: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def damage(ck: Path, tmp: Path) -> None:
        for one in damages:
            one(ck, tmp)

    return damage


def two_copies(ck: Path, _tmp: Path) -> None:
    """Two shards found by name (no index), each storing every tensor."""
    (ck / "model.safetensors").rename(ck / "model-a.safetensors")
    shutil.copyfile(ck / "model-a.safetensors", ck / "model-b.safetensors")


def nothing(_ck: Path, _tmp: Path) -> None:
    pass


# ------------------------------------------------------------------------------------- 1. unbounded memory
case("layers-1e9", config(num_hidden_layers=1_000_000_000), "config.json", "num_hidden_layers")
case("layers-more-than-stored", config(num_hidden_layers=3), "config.json", "num_hidden_layers")
case("hidden-size-1e12", config(hidden_size=10**12), "config.json", "hidden_size")
case("vocab-size-1e15", config(vocab_size=10**15), "config.json", "vocab_size")
case("intermediate-size-1e13", config(intermediate_size=10**13), "config.json", "intermediate_size")
case("heads-1e9", config(num_attention_heads=10**9, num_key_value_heads=10**9), "config.json")
case("head-dim-2e9", config(head_dim=2_000_000_000), "config.json")
case("int-with-5000-digits", config_text({'"vocab_size": 605': '"vocab_size": ' + "9" * 5000}), "config.json")
# ------------------------------------------------------------------------------------- 2. size caps, hostile JSON
case("config-2GiB-sparse", sparse("config.json"), "config.json", "larger than")
case("index-2GiB-sparse", sparse("model.safetensors.index.json"), "model.safetensors.index.json", "larger than")
case("generation-config-2GiB-sparse", sparse("generation_config.json"), "generation_config.json", "larger than")
case("tokenizer-config-2GiB-sparse", sparse("tokenizer_config.json"), "tokenizer_config.json", "larger than")
case("special-tokens-map-2GiB-sparse", sparse("special_tokens_map.json"), "special_tokens_map.json", "larger than")
case("tokenizer-json-2GiB-sparse", sparse("tokenizer.json"), "tokenizer.json", "larger than")
case("chat-template-2GiB-sparse", sparse("chat_template.jinja"), "chat_template.jinja", "larger than")
case("config-nested-100k", write_file("config.json", "[" * 100_000 + "]" * 100_000), "config.json", "nested")
case("index-nested-100k", index(raw='{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     "model.safetensors.index.json", "nested")
case("header-nested-metadata", header_text(_nested_metadata), "model.safetensors", "nested")
case("config-duplicate-key", config_text({'"hidden_size": 64': '"hidden_size": 64, "hidden_size": 32'}),
     "config.json", "duplicate key 'hidden_size'")
case("config-not-utf8", write_file("config.json", b'{"a": "\xff\xfe"}'), "config.json", "UTF-8")
case("generation-config-array", write_file("generation_config.json", "[1, 2]"), "generation_config.json")
case("chat-template-not-utf8", write_file("chat_template.jinja", b"{{ '\xff' }}"), "chat_template.jinja", "UTF-8")
def _template_named_by_a_list(ck: Path, _tmp: Path) -> None:
    (ck / "chat_template.jinja").unlink()  # else it wins over tokenizer_config.json's template
    (ck / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": ["x"], "template": "t"}]}))


case("tokenizer-config-template-name-list", _template_named_by_a_list, "tokenizer_config.json", "chat_template")
case("special-tokens-map-malformed", write_file("special_tokens_map.json", '{"bos_token": '),
     "special_tokens_map.json", "malformed JSON")
# ------------------------------------------------------------------------------------- 3. FIFOs and devices
case("fifo-shard-by-glob", fifo("weights.safetensors", remove=("model.safetensors",)), "weights.safetensors",
     "not a regular file")
case("fifo-model-safetensors", fifo("model.safetensors"), "model.safetensors", "not a regular file")
case("fifo-config", fifo("config.json"), "config.json", "not a regular file")
case("fifo-tokenizer-json", fifo("tokenizer.json"), "tokenizer.json", "not a regular file")
case("fifo-chat-template", fifo("chat_template.jinja"), "chat_template.jinja", "not a regular file")
case("fifo-index-shard", index_to("pipe.safetensors", fifo("pipe.safetensors")), "pipe.safetensors",
     "not a regular file")
case("device-shard-by-glob", char_device("zero.safetensors", remove=("model.safetensors",)), "zero.safetensors",
     "not a regular file")
case("symlink-loop",
     lambda ck, _t: ((ck / "a.json").symlink_to(ck / "b.json"), (ck / "b.json").symlink_to(ck / "a.json")),
     "a.json", "cannot resolve")
case("directory-named-model-safetensors",
     lambda ck, _t: ((ck / "model.safetensors").unlink(), (ck / "model.safetensors").mkdir()), "model.safetensors",
     "not a regular file")
# ------------------------------------------------------------------------------------- 4. config types
case("architectures-int", config(architectures=5), "config.json", "architectures")
case("architectures-list-of-int", config(architectures=[5]), "config.json", "architectures")
case("model-type-object", config(architectures=DROP, model_type={"a": 1}), "config.json", "model_type")
case("hidden-act-list", config(hidden_act=["silu"]), "config.json", "hidden_act")
case("hidden-size-string", config(hidden_size="64"), "config.json", "hidden_size")
case("hidden-size-bool", config(hidden_size=True), "config.json", "hidden_size")
case("hidden-size-float", config(hidden_size=64.0), "config.json", "hidden_size")
case("eps-object", config(rms_norm_eps={"v": 1e-5}), "config.json", "rms_norm_eps")
case("tie-embeddings-int", config(tie_word_embeddings=1), "config.json", "tie_word_embeddings")
case("dtype-object", config(torch_dtype={"a": 1}), "config.json", "torch_dtype")
case("rope-scaling-list", config(rope_scaling=[1, 2]), "config.json", "rope")
case("rope-factor-string", config(rope_scaling={"rope_type": "linear", "factor": "8"}), "config.json", "factor")
case("rope-type-list", config(rope_scaling={"rope_type": ["llama3"]}), "config.json", "rope")
case("max-window-layers-string",
     config(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, max_window_layers="2", sliding_window=8),
     "config.json", "max_window_layers")
# ------------------------------------------------------------------------------------- non-finite / out of range
case("eps-NaN", config(rms_norm_eps=float("nan")), "config.json", "NaN")
case("eps-Infinity", config(rms_norm_eps=float("inf")), "config.json", "Infinity")
case("eps-1e400", config_text({'"rms_norm_eps": 1e-05': '"rms_norm_eps": 1e400'}), "config.json", "rms_norm_eps")
case("eps-negative", config(rms_norm_eps=-1e-5), "config.json", "rms_norm_eps")
case("eps-zero", config(rms_norm_eps=0), "config.json", "rms_norm_eps")
case("rope-theta-zero", config(rope_theta=0), "config.json", "rope_theta")
case("rope-theta-1e400", config_text({'"rope_theta": 500000.0': '"rope_theta": 1e400'}), "config.json", "rope_theta")
case("rope-factor-zero",
     config(rope_scaling={"rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64}), "config.json", "factor")
case("rope-factor-1e400", config_text({'"factor": 8.0': '"factor": 1e400'}), "config.json", "factor")
case("rope-llama3-equal-freq-factors",
     config(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64}), "config.json", "high_freq_factor")
case("rope-original-max-1e400", config_text({'"original_max_position_embeddings": 64':
                                             '"original_max_position_embeddings": 1e400'}),
     "config.json", "original_max_position_embeddings")
case("yarn-beta-zero", config(rope_scaling={"rope_type": "yarn", "factor": 4, "beta_fast": 0,
                                            "original_max_position_embeddings": 64}), "config.json", "beta_fast")
case("eos-outside-vocab", config(eos_token_id=[601, 605]), "config.json", "eos_token_id")
case("bos-negative", config(bos_token_id=-1), "config.json", "bos_token_id")
case("pad-1e9", config(pad_token_id=10**9), "config.json", "pad_token_id")
case("head-dim-odd", config(head_dim=15), "config.json", "head_dim")
case("head-dim-zero", config(head_dim=0), "config.json", "head_dim")
case("sliding-window-zero", config(architectures=["MistralForCausalLM"], sliding_window=0), "config.json",
     "sliding_window")
case("max-position-zero", config(max_position_embeddings=0), "config.json", "max_position_embeddings")
case("generation-eos-outside-vocab",
     write_file("generation_config.json", json.dumps({"eos_token_id": [601, 9999]})), "generation_config.json",
     "eos_token_id")
# ------------------------------------------------------------------------------------- 5. tensor names and shards
case("header-dtype-list", header_text(lambda text, data: (text.replace('"dtype":"F32"', '"dtype":[]', 1), data)),
     "model.safetensors", "unknown dtype")
case("header-duplicate-tensor", header_text(_duplicate_tensor), "model.safetensors", "duplicate key")
case("duplicate-tensor-across-shards", two_copies, "model-b.safetensors", "also stored in")
case("index-shard-outside", index({"model.norm.weight": "../outside.safetensors"}),
     "model.safetensors.index.json", "shard name")
case("index-shard-absolute", index({"model.norm.weight": "/etc/passwd"}), "model.safetensors.index.json",
     "shard name")
case("index-shard-int", index({"model.norm.weight": 5}), "model.safetensors.index.json", "shard name")
case("index-shard-list", index({"model.norm.weight": ["model.safetensors"]}), "model.safetensors.index.json",
     "shard name")
case("index-shard-symlink-out",
     index_to("out.safetensors", lambda ck, tmp: (ck / "out.safetensors").symlink_to(tmp / "elsewhere.safetensors")),
     "out.safetensors", "leaves the checkpoint")
case("index-shard-directory", index_to("dir.safetensors", lambda ck, _t: (ck / "dir.safetensors").mkdir()),
     "dir.safetensors", "not a regular file")
# ------------------------------------------------------------------------------------- 6. outputs over inputs
CONVERT = ("convert", "{ck}", "-t", "onnx:fp32", "--no-parity", "--force", "-o")
case("convert-output-is-checkpoint", nothing, "output", "the input", command=(*CONVERT, "{ck}"), usage=True,
     writes=True)
case("convert-output-inside-checkpoint", nothing, "output", "the input", command=(*CONVERT, "{ck}/out"),
     usage=True, writes=True)
case("convert-output-contains-checkpoint", nothing, "output", "the input", command=(*CONVERT, "{tmp}"),
     usage=True, writes=True)
case("convert-output-symlink-to-checkpoint", lambda ck, tmp: (tmp / "link").symlink_to(ck), "output", "the input",
     command=(*CONVERT, "{tmp}/link"), usage=True, writes=True)
case("logits-out-directory", lambda ck, tmp: (tmp / "logits").mkdir(), "logits",
     command=("run", "{ck}", "--ids", "1,2", "--max-new-tokens", "1", "--logits-out", "{tmp}/logits"), usage=True)
case("logits-out-over-weights", nothing, "model.safetensors",
     command=("run", "{ck}", "--ids", "1,2", "--max-new-tokens", "1", "--logits-out", "{ck}/model.safetensors"),
     usage=True, writes=True)
case("convert-read-only-destination", nothing, "mnt", command=(*CONVERT, "{tmp}/mnt/out"), needs_mount="ro",
     writes=True)
case("convert-disk-full", nothing, "mnt", command=(*CONVERT, "{tmp}/mnt/out"), needs_mount="full", writes=True)
case("logits-out-disk-full", nothing, "logits.npy",
     command=("run", "{ck}", "--ids", ",".join(["1"] * 200), "--max-new-tokens", "1", "--logits-out",
              "{tmp}/mnt/logits.npy"), needs_mount="full", writes=True)
# ------------------------------------------------------------------------------------- tokenizer files for targets
GGUF = ("convert", "{ck}", "-t", "gguf:f32", "--no-parity", "-o", "{tmp}/out")
case("tokenizer-json-nested-gguf", write_file("tokenizer.json", "[" * 100_000 + "]" * 100_000), "tokenizer.json",
     "nested", command=GGUF, writes=True)
case("tokenizer-json-model-list-gguf", write_file("tokenizer.json", json.dumps({"model": [1, 2]})),
     "tokenizer.json", "model", command=GGUF, writes=True)
case("tokenizer-json-duplicate-key-gguf", write_file("tokenizer.json", '{"model": {}, "model": {}}'),
     "tokenizer.json", "duplicate key", command=GGUF, writes=True)
case("tokenizer-model-endless-varint-gguf",
     both(lambda ck, _t: (ck / "tokenizer.json").unlink(),
          write_file("tokenizer.model", b"\x0a" + b"\xff" * 3_000_000)),
     "tokenizer.model", "varint", command=GGUF, writes=True)
case("tokenizer-json-nested-run", write_file("tokenizer.json", "[" * 100_000 + "]" * 100_000), "tokenizer.json",
     command=("run", "{ck}", "--prompt", "hi", "--max-new-tokens", "1"))


@contextlib.contextmanager
def _mounted(where: Path, kind: str) -> Iterator[None]:
    """A tiny tmpfs at ``where``: read-only ("ro"), or 64 KiB that the output cannot fit in ("full")."""
    where.mkdir()
    options = "ro,size=64k" if kind == "ro" else "size=64k"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a {kind} destination (needs root): {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=False)


def _leftovers(root: Path, ck: Path) -> list[str]:
    """Temporary siblings an interrupted atomic write would leave (``.NAME.*.tmp``)."""
    return sorted(str(p) for p in root.rglob(".*.tmp") if not p.is_relative_to(ck))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_source_is_refused(name: str, tmp_path: Path) -> None:
    attack = CASES[name]
    ck = tmp_path / "llama3"
    shutil.copytree(FIXTURE, ck)
    attack.damage(ck, tmp_path)
    before = tree_snapshot(ck)
    args = [a.replace("{ck}", str(ck)).replace("{tmp}", str(tmp_path)) for a in attack.command]
    with _mounted(tmp_path / "mnt", attack.needs_mount) if attack.needs_mount else contextlib.nullcontext():
        outcome: Outcome = run_cli(args, cwd=tmp_path)
        leftovers = _leftovers(tmp_path, ck)
    assert_refused(outcome, mentions=attack.mentions, usage=attack.usage)
    if attack.writes:
        assert tree_snapshot(ck) == before, "an input file changed"
        assert not leftovers, f"temporary output left behind: {leftovers}"


# ------------------------------------------------------------------------------------- 7. MXFP4 experts (gpt-oss)
# Each case rewrites one tensor of a private gptoss-mxfp4 fixture (experts as MXFP4 blocks/scales, as published).
X = "model.layers.1.mlp.experts."


def _retensor(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(ck: Path) -> None:
        import numpy as np
        from safetensors.numpy import load_file, save_file

        tensors = {k: np.array(v) for k, v in load_file(str(ck / "model.safetensors")).items()}
        edit(tensors)
        save_file(tensors, str(ck / "model.safetensors"))

    return damage


def _scales_255(t: dict[str, Any]) -> None:
    t[X + "down_proj_scales"][...] = 255  # E8M0's NaN; 2^128 overflows float32 (every expert: any routing hits it)


def _reshape(name: str, shape: tuple[int, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(t: dict[str, Any]) -> None:
        t[X + name] = t[X + name].reshape(shape)

    return edit


RUN = ("run", "{ck}", "--ids", "1,2,3", "--max-new-tokens", "1")
MXFP4_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...], tuple[str, ...]]] = {
    "mxfp4-scales-missing": (lambda t: t.pop(X + "gate_up_proj_scales"), ("model.safetensors", "gate_up_proj_scales",
                                                                            "missing"), ("inspect", "{ck}")),
    # [E, 2I, H/32] -> [E, 2I, 1, H/32]: not the blocks' leading shape
    "mxfp4-scales-wrong-shape": (_reshape("gate_up_proj_scales", (4, 128, 1, 2)),
                                 ("model.safetensors", "gate_up_proj_scales", "shape"), ("inspect", "{ck}")),
    # [E, 2I, H/32, 16] -> [E, 2I, H/16, 8]: blocks of 8 bytes are not MXFP4
    "mxfp4-blocks-wrong-shape": (_reshape("gate_up_proj_blocks", (4, 128, 4, 8)),
                                 ("model.safetensors", "gate_up_proj_blocks", "shape"), ("inspect", "{ck}")),
    # blocks for 8 experts where the config says 4 (the scales agree with the blocks)
    "mxfp4-blocks-more-experts": (
        lambda t: t.update({X + n: t[X + n].reshape(8, 64, *t[X + n].shape[2:]) for n in ("gate_up_proj_blocks",
                                                                                          "gate_up_proj_scales")}),
        ("model.safetensors", "gate_up_proj_blocks", "config.json implies"), ("inspect", "{ck}")),
    "mxfp4-blocks-as-bf16": (lambda t: t.update({X + "down_proj_blocks": t[X + "down_proj_blocks"].view("<i2")}),
                             ("model.safetensors", "down_proj_blocks", "I16"), ("inspect", "{ck}")),
    "u8-outside-mxfp4": (lambda t: t.update({X + "down_proj_bias": t[X + "down_proj_bias"].view("u1")[..., ::2]}),
                         ("model.safetensors", "down_proj_bias", "U8"), ("inspect", "{ck}")),
    "mxfp4-scale-255": (_scales_255, ("model.safetensors", "down_proj_scales", "255"), RUN),
}


@pytest.fixture(scope="module")
def mxfp4_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.generate import make_checkpoint

    return make_checkpoint("gptoss-mxfp4", tmp_path_factory.mktemp("mxfp4") / "gptoss-mxfp4")


@pytest.mark.parametrize("name", list(MXFP4_CASES))
def test_hostile_mxfp4_is_refused(name: str, tmp_path: Path, mxfp4_fixture: Path) -> None:
    edit, mentions, command = MXFP4_CASES[name]
    ck = tmp_path / "gptoss"
    shutil.copytree(mxfp4_fixture, ck)
    _retensor(edit)(ck)
    args = [a.replace("{ck}", str(ck)) for a in command]
    assert_refused(run_cli(args, cwd=tmp_path), mentions=mentions)
