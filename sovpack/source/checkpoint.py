"""Reading a local Hugging Face-style checkpoint directory, safely and lazily.

Only JSON, safetensors and tokenizer files are ever opened. Pickle-based weights are refused, never loaded:
unpickling runs arbitrary code. Tensors are memory-mapped views read one at a time. Every file opened must be a
regular file inside the directory (a FIFO or device named ``model.safetensors`` would block or never end), and
every document read whole is size-capped before it is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import hashing_copy, open_regular, read_capped, read_json_file, shorten
from sovpack.errors import SourceError
from sovpack.source.safetensors import SafetensorsFile, TensorInfo

MIB = 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)
# NOTE: size caps for the documents read whole. Real config-like files are a few KB; tokenizer_config.json
# lists every added token and reaches ~1 MB (Gemma 3), so 16 MiB is ample. Indexes list every tensor: ~9 MB for
# DeepSeek-V3's 90k tensors, hence 64 MiB. tokenizer.json holds the whole vocabulary and merges: Gemma 3's
# 262k-token one is ~33 MB and the largest seen ~35 MB, so 128 MiB leaves room for 4x larger vocabularies while
# still refusing a file that would take gigabytes once parsed into Python objects. tokenizer.model
# (SentencePiece protobuf) is a few MB; it gets the same cap.
MAX_CONFIG_BYTES = 16 * MIB
MAX_INDEX_BYTES = 64 * MIB
MAX_TOKENIZER_BYTES = 128 * MIB
FILE_LIMITS: dict[str, int] = {
    "config.json": MAX_CONFIG_BYTES,
    "generation_config.json": MAX_CONFIG_BYTES,
    "tokenizer_config.json": MAX_CONFIG_BYTES,
    "special_tokens_map.json": MAX_CONFIG_BYTES,
    "added_tokens.json": MAX_CONFIG_BYTES,
    "chat_template.jinja": MAX_CONFIG_BYTES,
    INDEX_NAME: MAX_INDEX_BYTES,
    "tokenizer.json": MAX_TOKENIZER_BYTES,
    "tokenizer.model": MAX_TOKENIZER_BYTES,
}
# A shard named by an index: one plain file name in the checkpoint directory (no path, no hidden file).
_SHARD_NAME = re.compile(r"[^/\\\x00-\x1f.][^/\\\x00-\x1f]*\.safetensors")


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceFile:
    """One input file, recorded for provenance."""

    path: str  # POSIX path relative to the checkpoint root
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def _resolve(path: Path, display: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise SourceError(f"{display}: cannot resolve: {e}") from e


class Checkpoint:
    """A validated checkpoint directory: configs, tokenizer files and a lazy tensor index."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._real_root = self._check_root()
        self._check_links()
        self._check_sizes()
        self.config: dict[str, Any] = self._load_config()
        self.generation_config: dict[str, Any] | None = self._optional_json("generation_config.json")
        self.tokenizer_config: dict[str, Any] | None = self._optional_json("tokenizer_config.json")
        # Not used by sovpack itself, but runtimes read it beside the weights: a broken one is refused here.
        self._optional_json("special_tokens_map.json")
        self.shards: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._tensor_shard: dict[str, str] = {}
        self._open_weights()

    # -- paths ------------------------------------------------------------------------------------------
    def _check_root(self) -> Path:
        if not self.root.exists():
            raise SourceError(f"{self.root}: no such directory")
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: not a directory (expected a Hugging Face checkpoint folder)")
        return _resolve(self.root, str(self.root))

    def _check_links(self) -> None:
        """Refuse any entry that links out of the directory, before reading anything."""
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink():
                real = _resolve(entry, str(entry))
                if not real.is_relative_to(self._real_root):
                    raise SourceError(f"{entry}: a symlink that leaves the checkpoint directory ({real})")

    def _check_sizes(self) -> None:
        """Refuse an oversized document by its size before reading anything (cheap; reads are capped too)."""
        for name, limit in FILE_LIMITS.items():
            path = self.file(name)
            if path is not None and path.stat().st_size > limit:
                raise SourceError(f"{self._display(name)}: larger than {limit} bytes; refused")

    def _display(self, name: str) -> str:
        return str(self.root / name)

    def file(self, name: str) -> Path | None:
        """The path of a file inside the checkpoint, or None; a link that leaves the directory is refused."""
        path = self.root / name
        if not path.exists() and not path.is_symlink():
            return None
        real = _resolve(path, self._display(name))
        if not real.is_relative_to(self._real_root):
            raise SourceError(f"{self._display(name)}: a symlink that leaves the checkpoint directory ({real})")
        if not real.exists():
            raise SourceError(f"{self._display(name)}: a broken symlink")
        if not real.is_file():
            raise SourceError(f"{self._display(name)}: not a regular file")
        return path

    def _optional_json(self, name: str) -> dict[str, Any] | None:
        path = self.file(name)
        if path is None:
            return None
        data = read_json_file(path, FILE_LIMITS[name], where=self._display(name))
        if not isinstance(data, dict):
            raise SourceError(f"{self._display(name)}: expected a JSON object")
        return data

    def read_bytes(self, name: str) -> bytes | None:
        """A checkpoint file's bytes (None if absent), read only if it is a regular file within its size cap."""
        path = self.file(name)
        if path is None:
            return None
        limit = FILE_LIMITS.get(name, MAX_CONFIG_BYTES)
        return read_capped(path, limit, error=SourceError, where=self._display(name))

    def _load_config(self) -> dict[str, Any]:
        if self.file("config.json") is None:
            raise SourceError(f"{self._display('config.json')}: missing (every checkpoint needs a config.json)")
        return self._optional_json("config.json") or {}

    # -- weights ----------------------------------------------------------------------------------------
    def _open_weights(self) -> None:
        index = self._optional_json(INDEX_NAME)
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError(f"{self._display(INDEX_NAME)}: no 'weight_map' object")
            for tensor, shard in weight_map.items():
                if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
                    raise SourceError(
                        f"{self._display(INDEX_NAME)}: tensor {shorten(tensor)} has an invalid shard name "
                        f"{shorten(shard)} (expected a file name like model-00001-of-00002.safetensors in the "
                        "checkpoint directory)"
                    )
            shard_names = sorted(set(weight_map.values()))
            for shard in shard_names:
                if self.file(shard) is None:
                    raise SourceError(f"{self._display(shard)}: missing shard (listed in {INDEX_NAME})")
            self._add_shards(shard_names)
            for name, shard in weight_map.items():
                if self._tensor_shard.get(name) != shard:
                    raise SourceError(
                        f"{self._display(INDEX_NAME)}: tensor {shorten(name)} is listed in {shard} but not stored there"
                    )
        elif self.file(SINGLE_NAME) is not None:
            self._add_shards([SINGLE_NAME])
        else:
            others = sorted(p.name for p in self.root.glob("*.safetensors"))
            for name in others:
                self.file(name)  # a link out of the directory or a non-regular file is refused by name
            if others:
                self._add_shards(others)
            else:
                self._refuse_missing_weights()

    def _add_shards(self, names: list[str]) -> None:
        for shard in names:
            st = SafetensorsFile(self.root / shard, self._display(shard))
            self.shards[shard] = st
            for name, info in st.tensors.items():
                if name in self.tensors:
                    raise SourceError(
                        f"{self._display(shard)}: tensor {shorten(name)} is also stored in {self._tensor_shard[name]}"
                    )
                self.tensors[name] = info
                self._tensor_shard[name] = shard

    def _refuse_missing_weights(self) -> None:
        pickles = sorted(p.name for p in self.root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise SourceError(
                f"{self._display(pickles[0])}: pickle-based weights are refused, never loaded: unpickling runs "
                "arbitrary code. Convert the checkpoint to safetensors in a sandbox you trust, then retry."
            )
        raise SourceError(f"{self.root}: no safetensors weights (model.safetensors or {INDEX_NAME})")

    def shard_of(self, tensor: str) -> str:
        return self._tensor_shard[tensor]

    def read(self, tensor: str) -> np.ndarray:
        """A zero-copy, read-only view of one stored tensor."""
        try:
            shard = self._tensor_shard[tensor]
        except KeyError:
            raise SourceError(f"{self.root}: tensor {shorten(tensor)} is not in the checkpoint") from None
        return self.shards[shard].read(tensor)

    # -- tokenizer ---------------------------------------------------------------------------------------
    @property
    def tokenizer_json(self) -> Path | None:
        return self.file("tokenizer.json")

    @property
    def tokenizer_model(self) -> Path | None:
        return self.file("tokenizer.model")

    @cached_property
    def chat_template(self) -> str | None:
        """The chat template from chat_template.jinja (transformers 5) or tokenizer_config.json."""
        raw = self.read_bytes("chat_template.jinja")
        if raw is not None:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"{self._display('chat_template.jinja')}: not UTF-8 text ({e.reason})") from e
        template = (self.tokenizer_config or {}).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
                raise SourceError(
                    f"{self._display('tokenizer_config.json')}: 'chat_template' must be a string or a list of "
                    "{\"name\": ..., \"template\": ...} objects with string names"
                )
            template = next((t.get("template") for t in template if t["name"] == "default"), None)
        if template is not None and not isinstance(template, str):
            raise SourceError(f"{self._display('tokenizer_config.json')}: 'chat_template' is not a string")
        return template

    # -- provenance --------------------------------------------------------------------------------------
    def source_paths(self) -> list[str]:
        """The files sovpack reads from this checkpoint (relative POSIX paths, sorted)."""
        names = {"config.json", *self.shards}
        for optional in ("generation_config.json", INDEX_NAME, *TOKENIZER_FILES):
            if self.file(optional) is not None:
                names.add(optional)
        return sorted(names)

    @cached_property
    def source_files(self) -> tuple[SourceFile, ...]:
        """sha256 and size of every file sovpack reads (a full read: computed once, on demand)."""
        records = []
        for name in self.source_paths():
            path = self.file(name)
            if path is None:
                raise SourceError(f"{self._display(name)}: disappeared while the checkpoint was read")
            with open_regular(path, where=self._display(name)) as fh:
                try:
                    digest, size = hashing_copy(fh, None)
                except OSError as e:
                    raise SourceError(f"{self._display(name)}: cannot read: {e.strerror or e}") from e
            records.append(SourceFile(path=name, size=size, sha256=digest.removeprefix("sha256:")))
        return tuple(records)

    def stored_dtypes(self) -> dict[str, int]:
        """How many tensors are stored in each dtype."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return dict(sorted(counts.items()))
