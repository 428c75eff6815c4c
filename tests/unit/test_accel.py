"""``-o accel=...``: which FUSE accelerators a mount switches on (backends/fuse/accel/__init__.py)."""

import pytest

from erofs_mount.backends.fuse.accel import NAMES, Accel
from erofs_mount.backends.fuse.config import COMPRESSED_READ_AHEAD_KB, FuseOptions
from erofs_mount.errors import UsageError
from erofs_mount.options import parse_options


def test_default_is_all():
    assert Accel.parse(None) == Accel.parse("all") == Accel()
    assert all(Accel().on(n) for n in NAMES)
    assert str(Accel()) == "all"


def test_none_and_lists():
    none = Accel.parse("none")
    assert not any(none.on(n) for n in NAMES) and str(none) == "none"
    two = Accel.parse("inline:pagestore")
    assert two.on("inline") and two.on("pagestore") and not two.on("decoder")
    assert str(two) == "inline:pagestore"
    minus = Accel.parse("-decoder:-readahead")
    assert not minus.on("decoder") and not minus.on("readahead") and minus.on("shim")
    assert Accel.parse("none:shim").enabled == {"shim"}


def test_an_accelerator_is_on_only_with_what_it_needs():
    assert not Accel.parse("busypoll").on("busypoll")          # needs the shim's wait hook
    assert Accel.parse("busypoll:shim").on("busypoll")
    assert not Accel.parse("-pagestore").on("storeahead")
    assert not Accel.parse("-shim").on("storeahead")           # via busypoll


@pytest.mark.parametrize("bad", ["fast", "inline:turbo", "-nothing"])
def test_unknown_names_are_one_line_errors(bad):
    with pytest.raises(UsageError, match="unknown accelerator"):
        Accel.parse(bad)
    with pytest.raises(UsageError, match="unknown accelerator"):
        FuseOptions(accel=bad).libfuse_options("img", is_root=True)


def test_from_the_mount_options():
    opts = parse_options(["ro,accel=none,poll_us=20"])
    fo = FuseOptions.from_strings(opts.flags, opts.fuse)
    assert fo.accelerators == Accel.parse("none")
    # the automatic read-ahead is the accelerator; an explicit one is a setting and stays
    assert fo.resolved_read_ahead_kb(is_root=True, compressed=True) == 0
    assert FuseOptions().resolved_read_ahead_kb(is_root=True, compressed=True) == COMPRESSED_READ_AHEAD_KB
    assert FuseOptions(accel="none", read_ahead_kb=512).resolved_read_ahead_kb(is_root=True, compressed=True) == 512
