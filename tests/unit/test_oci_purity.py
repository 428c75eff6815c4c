"""The pure parts of erofs_mount.sources import no trio/httpx (design.md import rules)."""

import subprocess
import sys

PURE = ["erofs_mount.sources.oci.reference", "erofs_mount.sources.oci.manifest", "erofs_mount.sources.oci.auth",
        "erofs_mount.sources.oci.options", "erofs_mount.sources.cache", "erofs_mount.sources.retry",
        "erofs_mount.sources"]


def test_pure_modules_import_no_io_libraries():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PURE)
            + "bad = sorted(m for m in ('trio', 'httpx', 'httpcore', 'pyfuse3', 'pyroute2', 'anyio') if m in sys.modules)\n"
            + "print(' '.join(bad))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"pure modules pulled in: {r.stdout.strip()}"


def test_sources_never_import_the_reader_or_backends():
    code = ("import sys\nimport erofs_mount.sources.oci.blob, erofs_mount.sources.local, erofs_mount.sources.bridge\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('erofs_mount.erofs', 'erofs_mount.backends')))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
