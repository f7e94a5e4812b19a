"""The package surface: every exported name resolves, and importing the package loads no torch."""

from __future__ import annotations

import subprocess
import sys

import retrieval


def test_every_exported_name_resolves() -> None:
    for name in retrieval.__all__:
        assert getattr(retrieval, name) is not None, name


def test_import_is_cheap() -> None:
    code = "import sys, retrieval, retrieval.cli; print('torch' in sys.modules, 'faiss' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_exported_functions_are_functions_not_modules() -> None:
    # `from retrieval import train` once gave the submodule retrieval.train, which shadowed the
    # lazily exported function of the same name.
    code = (
        "import types\n"
        "from retrieval import TrainConfig, train, evaluate, build_index\n"
        "print([isinstance(f, types.ModuleType) for f in (train, evaluate, build_index)], callable(train))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("] ")[0] + "]" == "[False, False, False]"
    assert result.stdout.strip().endswith("True")
    for name in retrieval.__all__:
        value = getattr(retrieval, name)
        assert not isinstance(value, type(retrieval)), name
