"""inspect / ls / cat / stat / getfattr over corpus images, and extract's safety with hostile names."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from erofs_mount.erofs.superblock import crc32c_raw
from tests import corpuslib
from tests.conftest import run_cli

PLAIN = "plain-inline-4k"


def test_inspect_shows_superblock():
    r = run_cli("inspect", str(corpuslib.image(PLAIN).path))
    out = r.stdout.decode()
    assert r.returncode == 0
    assert "corpus-public" in out and "2dc8e42c-9a57-538b-bf48-6a094ea15df1" in out
    assert "block size:       4096" in out and "sb_csum" in out and "inodes:           3233" in out


def test_ls_lists_manifest_children():
    img = corpuslib.image(PLAIN)
    manifest = corpuslib.load_manifest(img.manifest)["entries"]
    r = run_cli("ls", str(img.path), "/special")
    assert r.returncode == 0
    assert sorted(r.stdout.decode().split()) == sorted(manifest["/special"]["children"])
    r = run_cli("ls", "-l", str(img.path), "/special")
    assert "crw-------" in r.stdout.decode() and "300, 70000" in r.stdout.decode()


def test_cat_equals_source_bytes():
    img = corpuslib.image(PLAIN)
    path = max(corpuslib.source_files(), key=lambda p: corpuslib.source_files()[p][1])
    r = run_cli("cat", str(img.path), path)
    assert r.returncode == 0
    assert r.stdout == corpuslib.source_bytes(path, 0, 1 << 40)


def test_stat_and_getfattr_match_manifest():
    img = corpuslib.image(PLAIN)
    manifest = corpuslib.load_manifest(img.manifest)["entries"]
    path = "/xattrs/binary-value"
    rec = manifest[path]
    out = run_cli("stat", str(img.path), path).stdout.decode()
    assert f"size:    {rec['size']}" in out and f"{rec['mtime']['sec']}.{rec['mtime']['nsec']:09d}" in out
    out = run_cli("getfattr", str(img.path), path).stdout.decode()
    for name, value in rec["xattrs"].items():
        assert name in out
        assert value in out or bytes.fromhex(value).decode("utf-8", "replace") in out


@pytest.mark.parametrize("tool, args, message", [
    ("cat", ["/no/such"], "/no/such: no such file or directory"),
    ("cat", ["/special"], "is a directory"),
    ("ls", ["/README.txt/x"], "not a directory"),
])
def test_tool_errors_are_one_line(tool, args, message):
    r = run_cli(tool, str(corpuslib.image(PLAIN).path), *args)
    err = r.stderr.decode()
    assert r.returncode != 0 and err.count("\n") == 1 and message in err


def test_unknown_option_and_missing_file():
    r = run_cli("ls", "-o", "bogus", str(corpuslib.image(PLAIN).path))
    assert r.returncode == 2 and "unknown option 'bogus'" in r.stderr.decode()
    r = run_cli("ls", "/nonexistent.erofs")
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and "no such file" in r.stderr.decode().lower()


def reseal_superblock(raw: bytearray) -> None:
    """Recompute sb_crc32c after patching bytes of the first block (a small image keeps its dirs there)."""
    blksz = 1 << raw[1024 + 12]
    n = blksz - 1024 if blksz > 1024 else blksz
    area = bytes(raw[1024:1028]) + b"\0\0\0\0" + bytes(raw[1032:1024 + n])
    raw[1028:1032] = crc32c_raw(0xFFFFFFFF, area).to_bytes(4, "little")


@pytest.mark.skipif(not shutil.which("mkfs.erofs"), reason="mkfs.erofs (erofs-utils) not installed")
@pytest.mark.parametrize("hostile", [b"..", b"a/b", b"a\0b"])
def test_extract_never_writes_outside_dest(tmp_path, hostile):
    """A name that is '..', or holds '/' or NUL, is corruption: refused, nothing escapes DEST."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    placeholder = b"Q" * len(hostile)
    (tree / "sub" / os.fsdecode(placeholder)).write_bytes(b"payload\n")
    (tree / "sub" / "ok").write_bytes(b"fine\n")
    image = tmp_path / "img.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True, timeout=60)
    raw = bytearray(image.read_bytes())
    assert raw.count(placeholder) == 1
    at = raw.index(placeholder)
    raw[at:at + len(hostile)] = hostile
    reseal_superblock(raw)
    image.write_bytes(bytes(raw))
    outer = tmp_path / "outer"
    dest = outer / "dest"
    r = run_cli("extract", str(image), str(dest))
    assert r.returncode == 1
    assert "invalid file name" in r.stderr.decode() or "bogus dirent" in r.stderr.decode()
    assert sorted(os.listdir(outer)) == ["dest"]
    assert (dest / "sub" / "ok").read_bytes() == b"fine\n"
