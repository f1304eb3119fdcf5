"""Fixtures shared by the transport tests: a built bundle and a real Distribution registry on loopback.

Each test module names its registry directory, the repository ``pushed`` uses and the options it pushes with
(``REGISTRY_DIR``, ``PUSHED_REPOSITORY``, ``PUSH_OPTIONS``); every fixture is built once per module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovpack.transport import copy_bundle
from tests.transport.registry_harness import BuiltBundle, Registry, build_test_bundle, running_registry


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def bundle(work: Path) -> BuiltBundle:
    return build_test_bundle(work / "build")


@pytest.fixture(scope="module")
def registry(work: Path, request: pytest.FixtureRequest) -> Iterator[Registry]:
    if shutil.which("docker-registry") is None and shutil.which("registry") is None:
        pytest.skip("needs docker-registry")
    with running_registry(work / request.module.REGISTRY_DIR) as reg:
        yield reg


@pytest.fixture(scope="module")
def pushed(bundle: BuiltBundle, registry: Registry, request: pytest.FixtureRequest) -> str:
    ref = registry.ref(request.module.PUSHED_REPOSITORY)
    copy_bundle(bundle.path, ref, options=request.module.PUSH_OPTIONS)
    return ref
