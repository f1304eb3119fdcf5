"""Reading a local Hugging Face-style checkpoint directory, safely and lazily.

Only JSON, safetensors and tokenizer files are ever opened. Pickle-based weights are refused, never loaded:
unpickling runs arbitrary code. Tensors are memory-mapped views read one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import sha256_file
from sovpack.errors import SourceError
from sovpack.source.safetensors import SafetensorsFile, TensorInfo

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


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceFile:
    """One input file, recorded for provenance."""

    path: str  # POSIX path relative to the checkpoint root
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def _read_json(path: Path, display: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SourceError(f"{display}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise SourceError(f"{display}: not UTF-8 text ({e.reason})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{display}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


class Checkpoint:
    """A validated checkpoint directory: configs, tokenizer files and a lazy tensor index."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._real_root = self._check_root()
        self._check_links()
        self.config: dict[str, Any] = self._load_config()
        self.generation_config: dict[str, Any] | None = self._optional_json("generation_config.json")
        self.tokenizer_config: dict[str, Any] | None = self._optional_json("tokenizer_config.json")
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
        return self.root.resolve()

    def _check_links(self) -> None:
        """Refuse any entry that links out of the directory, before reading anything."""
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink() and not entry.resolve().is_relative_to(self._real_root):
                raise SourceError(
                    f"{entry}: a symlink that leaves the checkpoint directory ({entry.resolve()})"
                )

    def _display(self, name: str) -> str:
        return str(self.root / name)

    def file(self, name: str) -> Path | None:
        """The path of a file inside the checkpoint, or None; a link that leaves the directory is refused."""
        path = self.root / name
        if not path.exists() and not path.is_symlink():
            return None
        real = path.resolve()
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
        data = _read_json(path, self._display(name))
        if not isinstance(data, dict):
            raise SourceError(f"{self._display(name)}: expected a JSON object")
        return data

    def _load_config(self) -> dict[str, Any]:
        if self.file("config.json") is None:
            raise SourceError(f"{self._display('config.json')}: missing (every checkpoint needs a config.json)")
        return self._optional_json("config.json") or {}

    # -- weights ----------------------------------------------------------------------------------------
    def _open_weights(self) -> None:
        index_path = self.file(INDEX_NAME)
        if index_path is not None:
            index = _read_json(index_path, self._display(INDEX_NAME))
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError(f"{self._display(INDEX_NAME)}: no 'weight_map' object")
            shard_names = sorted(set(weight_map.values()))
            for shard in shard_names:
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                    raise SourceError(f"{self._display(INDEX_NAME)}: invalid shard name {shard!r}")
                if self.file(shard) is None:
                    raise SourceError(f"{self._display(shard)}: missing shard (listed in {INDEX_NAME})")
            self._add_shards(shard_names)
            for name, shard in weight_map.items():
                if self._tensor_shard.get(name) != shard:
                    raise SourceError(
                        f"{self._display(INDEX_NAME)}: tensor {name!r} is listed in {shard} but not stored there"
                    )
        elif self.file(SINGLE_NAME) is not None:
            self._add_shards([SINGLE_NAME])
        else:
            others = sorted(p.name for p in self.root.glob("*.safetensors"))
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
                        f"{self._display(shard)}: tensor {name!r} is also stored in {self._tensor_shard[name]}"
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
            raise SourceError(f"{self.root}: tensor {tensor!r} is not in the checkpoint") from None
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
        path = self.file("chat_template.jinja")
        if path is not None:
            return path.read_text(encoding="utf-8")
        template = (self.tokenizer_config or {}).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

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
            path = self.root / name
            digest = sha256_file(path).removeprefix("sha256:")
            records.append(SourceFile(path=name, size=path.stat().st_size, sha256=digest))
        return tuple(records)

    def stored_dtypes(self) -> dict[str, int]:
        """How many tensors are stored in each dtype."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return dict(sorted(counts.items()))
