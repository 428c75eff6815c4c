"""Random byte ranges of every regular file equal the source tree's bytes (hypothesis), through
``Image.read`` and ``Image.read_into``.

The oracle is the corpus' ``tree.tar`` (made from ``make_tree.py --seed 1``): its member
data are the source tree's exact bytes.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_mount.erofs.image import Image
from tests import corpuslib
from tests.conftest import zdata_available

# images whose file contents equal the source tree (mkfs 1.5 excluded three 255-byte names)
NAMES = [n for n in corpuslib.names(expect="ok")]


@cache
def open_image(name: str) -> Image:
    img = corpuslib.image(name)
    fd = os.open(img.path, os.O_RDONLY)
    devs = []
    for d in img.devices:
        dfd = os.open(d, os.O_RDONLY)
        devs.append(lambda off, n, dfd=dfd: os.pread(dfd, n, off))
    return Image(lambda off, n: os.pread(fd, n, off), size=os.fstat(fd).st_size, devices=devs)


@cache
def files_in(name: str) -> list[tuple[str, int]]:
    manifest = corpuslib.load_manifest(corpuslib.image(name).manifest)["entries"]
    src = corpuslib.source_files()
    return sorted((p, r["size"]) for p, r in manifest.items() if r.get("type") == "reg" and p in src)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_ranges_equal_source(name, data):
    if corpuslib.image(name).compressed and not zdata_available():
        pytest.skip("compressed data support not present")
    img = open_image(name)
    path, size = data.draw(st.sampled_from(files_in(name)), label="file")
    offset = data.draw(st.integers(0, size + 4096), label="offset")
    length = data.draw(st.one_of(st.integers(0, 8192), st.integers(0, size + 1)), label="length")
    nid = img.resolve(path)
    got = img.read(nid, offset, length)
    assert got == corpuslib.source_bytes(path, offset, length)
    # read_into (compressed data decoded in place, as the FUSE decoder process does): the same bytes,
    # and nothing written past them
    buf = bytearray(b"\xa5" * (length + 7))
    n = img.read_into(nid, offset, length, memoryview(buf))
    assert n == len(got) and buf[:n] == got and buf[n:] == b"\xa5" * (length + 7 - n)
