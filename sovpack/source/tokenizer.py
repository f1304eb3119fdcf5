"""The source tokenizer (tokenizer.json via the ``tokenizers`` package): encode prompts, decode outputs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sovpack.errors import SourceError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def load_tokenizer(tokenizer_json: Path) -> Tokenizer:
    """Open a tokenizer.json with the ``tokenizers`` library (no transformers, no network); errors name the file."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_json)
    if not path.is_file():
        raise SourceError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises plain Exception subclasses on malformed files
        raise SourceError(f"{path}: cannot load tokenizer: {e}") from e


class SourceTokenizer:
    """A tokenizer.json, loaded without transformers (and without any network)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tok = load_tokenizer(path)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))
