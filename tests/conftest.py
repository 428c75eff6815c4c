"""Shared fixtures: the corpus (tests/corpuslib.py) and helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import corpuslib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m erofs_mount ARGS`` as a separate process (exit status and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "erofs_mount", *args], capture_output=True, timeout=timeout,
                          cwd=REPO, **kw)


def zdata_available() -> bool:
    try:
        import erofs_mount.erofs.zdata  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def corpus():
    return corpuslib
