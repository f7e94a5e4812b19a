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
