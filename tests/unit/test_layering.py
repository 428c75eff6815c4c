"""The design's import rules, checked on the real import graph (a fresh interpreter per check)."""

import subprocess
import sys

import pytest

IO_LIBS = ("trio", "httpx", "httpcore", "pyfuse3", "pyroute2", "anyio")
PURE = [
    "erofs_mount.errors", "erofs_mount.options", "erofs_mount.erofs.image", "erofs_mount.erofs.zdata",
    "erofs_mount.erofs.decompress", "erofs_mount.erofs.zmap", "erofs_mount.erofs.xattr", "erofs_mount.tools",
    "erofs_mount.backends.nbd.proto", "erofs_mount.backends.nbd.recovery",
    "erofs_mount.sources.oci.reference", "erofs_mount.sources.oci.manifest", "erofs_mount.sources.oci.auth",
    "erofs_mount.sources.oci.zseek", "erofs_mount.status", "erofs_mount.zstdframe",
]


def loaded_after(imports: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in imports) + "print('\\n'.join(sys.modules))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_async_io(module):
    bad = sorted(m for m in loaded_after([module]) if m.split(".")[0] in IO_LIBS)
    assert not bad, f"{module} pulls in {bad}"


def test_reader_is_independent_of_sources_and_backends():
    mods = loaded_after(["erofs_mount.erofs.image", "erofs_mount.erofs.zdata"])
    assert not [m for m in mods if m.startswith(("erofs_mount.sources", "erofs_mount.backends"))]


def test_nbd_backend_never_imports_the_reader():
    mods = loaded_after(["erofs_mount.backends.nbd.server", "erofs_mount.backends.nbd.lifecycle"])
    assert not [m for m in mods if m.startswith("erofs_mount.erofs.")]
