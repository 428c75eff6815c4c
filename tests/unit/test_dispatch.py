"""Backend selection and option conversion (no mounting)."""

import pytest

from erofs_mount import dispatch
from erofs_mount.errors import UsageError
from erofs_mount.options import parse_options


def test_auto_picks_fuse_for_non_root(monkeypatch):
    monkeypatch.setattr(dispatch.os, "geteuid", lambda: 1000)
    assert dispatch.choose_mode(parse_options([])) == ("fuse", "not running as root")


def _no_nbd(monkeypatch, fanotify_reason):
    from erofs_mount.backends.fanotify import kernel
    from erofs_mount.backends.nbd import netlink

    monkeypatch.setattr(dispatch.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlink, "family_available", lambda: False)
    monkeypatch.setattr(kernel, "unsupported_reason", lambda root: fanotify_reason)


def test_auto_without_nbd_picks_fanotify_when_the_probe_says_so(monkeypatch):
    _no_nbd(monkeypatch, None)
    mode, why = dispatch.choose_mode(parse_options([]))
    assert mode == "fanotify" and "no nbd" in why
    _no_nbd(monkeypatch, "no fanotify pre-content events in this kernel (Linux 6.14+): EINVAL")
    mode, why = dispatch.choose_mode(parse_options([]))
    assert mode == "fuse" and "not fanotify: no fanotify pre-content events" in why


def test_auto_sends_what_fanotify_mode_cannot_serve_to_fuse(monkeypatch):
    _no_nbd(monkeypatch, None)
    assert dispatch.choose_mode(parse_options([]), "image")[0] == "fanotify"
    assert dispatch.choose_mode(parse_options([], devices=("/x",))) == (
        "fuse", "no nbd netlink family in this kernel (modprobe nbd for NBD mode); not fanotify: "
                "multi-device images are not served in fanotify mode")
    assert dispatch.choose_mode(parse_options(["oci.layer=0,oci.cache=none"]), "layer")[0] == "fuse"


def test_fanotify_mode_words():
    assert parse_options([], fstype="erofs.fanotify").mode == "fanotify"
    assert dispatch.choose_mode(parse_options([], mode="fanotify")) == ("fanotify", "--mode fanotify")
    with pytest.raises(UsageError, match="do not apply to fanotify"):
        dispatch.run("mount", ("x", "/", False), parse_options(["nbd.index=1"], mode="fanotify"))


def test_explicit_mode_wins():
    assert dispatch.choose_mode(parse_options([], fstype="erofs.nbd"))[0] == "nbd"
    assert dispatch.choose_mode(parse_options([], mode="fuse"))[0] == "fuse"


def test_fuse_options_conversion():
    fo = dispatch.fuse_options(parse_options(["allow_other,fsname=x,uid=5,nosuid,noatime,relatime"]), True)
    assert fo.allow_other and fo.fsname == "x" and fo.uid == 5 and fo.nosuid and fo.noatime and fo.foreground
    assert fo.flags == ("relatime",)


def test_nbd_options_conversion():
    from erofs_mount.backends.nbd.config import MS_NOSUID, MS_RDONLY

    no = dispatch.nbd_options(parse_options(["nbd.index=2,nosuid,acl,nbd.mode=ioctl"]), False)
    assert no.index == 2 and no.mode == "ioctl"
    assert no.mount_flags & MS_NOSUID and no.mount_flags & MS_RDONLY and no.mount_data == "acl"


def test_mode_specific_options_refused(tmp_path):
    with pytest.raises(UsageError, match="nbd"):
        dispatch.run("mount", ("x", str(tmp_path), False), parse_options(["nbd.index=1"], mode="fuse"))
    with pytest.raises(UsageError, match="FUSE options"):
        dispatch.run("mount", ("x", str(tmp_path), False), parse_options(["allow_other"], mode="nbd"))


def test_unmount_of_something_else(tmp_path):
    with pytest.raises(UsageError, match="not mounted"):
        dispatch.run("unmount", str(tmp_path), parse_options([]))


def test_fuse_poll_window_option():
    assert dispatch.fuse_options(parse_options(["poll_us=0"]), False).poll_us == 0
    with pytest.raises(UsageError, match="poll_us"):
        parse_options(["poll_us=-5"])


def test_fuse_decoder_option():
    assert dispatch.fuse_options(parse_options([]), False).decoder is None       # auto
    assert dispatch.fuse_options(parse_options(["decoder=0"]), False).decoder == 0
    fo = dispatch.fuse_options(parse_options(["decoder=2"]), False)
    with pytest.raises(UsageError, match="decoder=2: 0 .off. or 1"):
        fo.libfuse_options("img", is_root=True)


def test_fuse_options_take_fstab_words_and_hex_numbers():
    fo = dispatch.fuse_options(parse_options(["defaults,silent,nodev,uid=0x10"]), False)
    assert fo.flags == () and fo.nodev and fo.uid == 16
    assert "nodev" in fo.libfuse_options("img", is_root=True)
    with pytest.raises(UsageError, match="nosymfollow"):     # a flag libfuse would not pass on: named
        dispatch.fuse_options(parse_options(["nosymfollow"]), False).libfuse_options("img", is_root=True)
