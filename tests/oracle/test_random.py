"""Hypothesis-generated trees, each built with a drawn mkfs.erofs 1.5 configuration, checked against the kernel.

Bounded: a fixed number of examples, each tree small (<= 30 entries, <= ~200 KiB).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_mount.cli import main
from tests import corpuslib
from tests.oracle import kmount, records, treegen
from tests.oracle.conftest import mkfs, require_mkfs15

BS = treegen.BS
SIZES = st.sampled_from([0, 1, 2, 100, BS - 1, BS, BS + 1, 2 * BS, 3 * BS - 1, 40000, 131073])
NAME_BYTES = st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"-"))
NAMES = st.one_of(NAME_BYTES, st.sampled_from([b"-", b".x", b"..y", b"...", b"!", b"n" * 254, b"\xff"])) \
    .filter(lambda n: n not in (b".", b".."))
CONFIG_ARGS = st.sampled_from([
    [], ["-Enoinline_data"], ["-Eforce-inode-extended"], ["-zlz4"], ["-zlz4hc"], ["-zlz4hc", "-C16384"],
    ["-zlz4", "-Eztailpacking"], ["-zlz4hc", "-Eztailpacking", "-C65536"], ["-zlz4hc", "-Elegacy-compress"],
    ["--chunksize=4096"], ["--chunksize=8192", "-Eforce-chunk-indexes"], ["-zlz4", "--max-extent-bytes=4096"],
])


@st.composite
def specs(draw):
    n = draw(st.integers(1, 30))
    dirs = [b""]
    used: set[bytes] = set()
    nodes = []
    for i in range(n):
        parent = draw(st.sampled_from(dirs))
        name = draw(NAMES)
        path = (parent + b"/" if parent else b"") + name
        if path in used:
            continue
        used.add(path)
        kind = draw(st.sampled_from(["reg", "reg", "reg", "dir", "symlink", "chr", "fifo", "link"]))
        regs = [x for x in nodes if x.kind == "reg"]
        if kind == "link" and not regs:
            kind = "reg"
        node = treegen.Node(path, kind, mode=draw(st.sampled_from([0o644, 0o755, 0o4711, 0o1600, 0o000])),
                            uid=draw(st.sampled_from([0, 1000, 65535, 65536, 3_000_000_000])),
                            gid=draw(st.sampled_from([0, 100, 70000])),
                            mtime_ns=draw(st.integers(-(2**40), 2**43) | st.just(0)) * 1000
                            + draw(st.integers(0, 999)))
        if kind == "dir":
            node.mode |= 0o700
            dirs.append(path)
        elif kind == "reg":
            size = draw(SIZES)
            seed = draw(st.integers(0, 2**16))
            node.data = treegen._content(__import__("random").Random(seed), size)
        elif kind == "symlink":
            node.target = draw(st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"z")))
        elif kind == "chr":
            node.rdev = (draw(st.integers(0, 4095)), draw(st.integers(0, (1 << 20) - 1)))
        elif kind == "link":
            node.target = draw(st.sampled_from(regs)).path
        if kind != "link" and draw(st.booleans()):
            key = b"user.k" if kind in ("reg", "dir") else b"trusted.k"   # user.* only on files and dirs
            node.xattrs = {key + b"%d" % j: draw(st.binary(max_size=80)) for j in range(draw(st.integers(1, 4)))}
        nodes.append(node)
    return nodes


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(spec=specs(), args=CONFIG_ARGS)
def test_random_tree_matches_kernel(spec, args):
    require_mkfs15()
    work = Path(tempfile.mkdtemp(prefix="oracle-rand-"))
    try:
        src = work / "src"
        src.mkdir()
        treegen.apply_spec(str(src), spec)
        image = work / "img.erofs"
        mkfs(image, src, *args)
        with kmount.kernel_mount(image, work / "mnt") as mnt:
            kernel = records.kernel_records(mnt)
            kstatfs = records.kernel_statfs(mnt)
        img, readers = records.open_image(image)
        try:
            bad = records.diff(kernel, records.image_records(img)) + records.dirent_checks(img)
            assert {k: img.statfs()[k] for k in kstatfs} == kstatfs
        finally:
            for r in readers:
                r.close()
        assert not bad, f"mkfs {args}: {bad[:10]}"
        dest = work / "out"
        assert main(["extract", str(image), str(dest)]) == 0
        bad = corpuslib.compare_tree({"entries": kernel[0]}, dest, dir_size=False, dir_nlink=False)
        assert not bad, f"mkfs {args} extract: {bad[:10]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_oracle_diff_notices_a_difference():
    """The comparison itself: identical records agree; any changed field is reported."""
    k = ({"/": {"type": "dir", "mode": "40755", "children": ["a"]}, "/a": {"type": "reg", "sha256": "00"}},
         {"/": {"ino": 36, "order": ["a"]}, "/a": {"ino": 40, "blocks": 8}})
    assert records.diff(k, k) == []
    o = ({"/": dict(k[0]["/"]), "/a": {"type": "reg", "sha256": "01"}}, {"/": {"ino": 36, "order": ["a"]},
                                                                          "/a": {"ino": 41, "blocks": 8}})
    bad = records.diff(k, o)
    assert any("sha256" in b for b in bad) and any("ino" in b for b in bad)
    assert records.diff(k, ({"/": k[0]["/"]}, {"/": k[1]["/"]})) == ["/a: missing from the image walk"]

