"""Kernel-oracle fixtures: generated source trees, mkfs.erofs images, read-only loop mounts.

Every privileged fixture skips with the reason when the host cannot serve as the
oracle (not root, no /dev/loop-control, no erofs driver, no Debian mkfs.erofs 1.5).
Mounts are always unmounted and their loop devices detached in teardown.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.oracle import kmount, treegen

MKFS_TIMEOUT = 120


def require_kernel() -> None:
    reason = kmount.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)


def require_mkfs15() -> None:
    require_kernel()
    reason = kmount.mkfs15_unavailable_reason() or treegen.have_tools()
    if reason:
        pytest.skip(reason)


def mkfs(image: Path, src: Path, *args: str, exe: str = "mkfs.erofs") -> None:
    r = subprocess.run([exe, "--quiet", *args, str(image), str(src)], capture_output=True, text=True,
                       timeout=MKFS_TIMEOUT)
    if r.returncode != 0:
        raise AssertionError(f"mkfs.erofs {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")


@pytest.fixture(scope="session")
def full_tree(tmp_path_factory) -> Path:
    """The everything-tree (seed 1), built once per session."""
    require_mkfs15()
    root = tmp_path_factory.mktemp("oracle-src") / "tree"
    root.mkdir()
    treegen.build_tree(str(root), seed=1)
    return root


@pytest.fixture
def mounted(tmp_path):
    """``mounted(image, devices=())`` -> mountpoint; everything undone at teardown."""
    require_kernel()
    stack = []

    def mount(image, devices=()):
        cm = kmount.kernel_mount(image, tmp_path / f"mnt{len(stack)}", devices)
        mnt = cm.__enter__()
        stack.append(cm)
        return Path(mnt)

    yield mount
    while stack:
        stack.pop().__exit__(None, None, None)

