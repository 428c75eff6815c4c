"""Whole images in fanotify mode on this host's kernel: every layer its own fanotify mount (the
kernel's erofs over a sparse file), the kernel's overlayfs on top (backends/image.py, shared with
NBD mode); the tree equals the layers unpacked by the reference applier; a second image of the
repository shares the common layers; status groups the layers under the image; -u leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

from erofs_mount.backends.fanotify import record
from erofs_mount.backends.fuse.mountinfo import find_mount
from erofs_mount.backends.image import LAYERS_DIR, image_doc_path, lower_dirs
from tests.kernel.test_nbd_image import _same, image  # noqa: F401 (the fixture)

from .conftest import cli


def test_whole_images_in_fanotify_mode(fan, image):  # noqa: F811
    m1, m2 = fan.mountpoint(), fan.mountpoint()
    res, _ = fan.mount(image["ref"], "oci.insecure", mnt=m1)
    assert res.returncode == 0, res.stderr
    try:
        m = find_mount(m1)
        assert m is not None and m.fstype == "overlay", m
        lowers1 = lower_dirs(m.super_options)
        assert len(lowers1) == image["n"] and all(d.startswith(LAYERS_DIR + "/") for d in lowers1)
        for d in lowers1:   # each layer: the kernel's erofs over a regular (sparse cache) file
            lm = find_mount(d)
            assert lm.fstype == "erofs" and os.path.isfile(lm.source) and record.read(d) is not None
        _same(Path(m1), image["oracle"])
        res, _ = fan.mount(image["ref2"], "oci.insecure", mnt=m2)
        assert res.returncode == 0, res.stderr
        lowers2 = lower_dirs(find_mount(m2).super_options)
        assert len(lowers2) == 4 and len(set(lowers1) & set(lowers2)) == 3
        _same(Path(m2), image["oracle2"])
        st = cli("status", env=fan.env)
        assert st.returncode == 0, st.stderr
        lines = st.stdout.splitlines()
        heads = [i for i, line in enumerate(lines) if line.startswith("image ")]
        assert len(heads) == 2, st.stdout
        h = heads[0]
        assert m1 in lines[h] and f"layers={image['n']}" in lines[h] and f"mounts={image['n']}" in lines[h]
        assert all(line.startswith(f"  L{i} sha256:") and " fanotify " in line
                   for i, line in enumerate(lines[h + 1:h + 1 + image["n"]])), st.stdout
        res = fan.unmount(m1)
        assert res.returncode == 0, res.stderr
        assert find_mount(m1) is None and not os.path.exists(image_doc_path(m1))
        assert not os.path.exists(lowers1[0]) and record.read(lowers1[0]) is None   # v1's own top layer
        _same(Path(m2), image["oracle2"])
    finally:
        for mnt in (m1, m2):
            if find_mount(mnt) is not None:
                res = fan.unmount(mnt)
                assert res.returncode == 0, res.stderr
    for d in set(lowers1) | set(lowers2):
        assert find_mount(d) is None and record.read(d) is None and not os.path.exists(d)
