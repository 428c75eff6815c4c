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


def pytest_terminal_summary(terminalreporter):
    """Say how user-mode Linux was booted on this machine, when a test booted it (tests/nbd/uml.py)."""
    uml = sys.modules.get("tests.nbd.uml")
    if uml is None:
        return
    if uml._decision is not None:
        terminalreporter.write_line(uml._decision.log_line())
    elif uml._failure is not None:
        terminalreporter.write_line(f"UML boot path: none ({uml._failure})")
