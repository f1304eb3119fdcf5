"""Building a canonical spec from a config dict, as the converter tests do it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from sovpack.converters import family_for_config
from sovpack.errors import SourceError
from sovpack.source.spec import ModelSpec


def build_spec(base: Mapping[str, Any], arch: str, **extra: Any) -> ModelSpec:
    """The spec the family claiming ``arch`` builds from ``base`` plus ``extra`` config keys."""
    config = {**base, "architectures": [arch], **extra}
    return family_for_config(config, "config.json").build_spec(config, "config.json")


def assert_config_refused(base: Mapping[str, Any], arch: str, message: str, **extra: Any) -> None:
    """The config is refused with a SourceError naming config.json and matching ``message``."""
    with pytest.raises(SourceError, match=message) as info:
        build_spec(base, arch, **extra)
    assert str(info.value).startswith("config.json: ")
