"""The pure parts of a whole image in NBD mode (backends/nbd/image.py): overlayfs mount data and
how -u recognises our overlay."""

import pytest

from erofs_mount.backends.nbd.image import IMAGES_DIR, image_dir, is_ours, lower_dirs, overlay_data
from erofs_mount.errors import ErofsMountError


def test_overlay_data_top_layer_first_and_xino():
    lowers = [f"{IMAGES_DIR}/k/L{i}" for i in range(3)]
    data = overlay_data(lowers)
    assert data == f"lowerdir={IMAGES_DIR}/k/L2:{IMAGES_DIR}/k/L1:{IMAGES_DIR}/k/L0,xino=on"
    assert lower_dirs("ro,relatime," + data) == list(reversed(lowers))
    with pytest.raises(ErofsMountError):
        overlay_data(["/a:b"])


def test_only_our_overlays_are_ours():
    assert is_ours([f"{IMAGES_DIR}/k/L1", f"{IMAGES_DIR}/k/L0"])
    assert not is_ours(["/var/lib/containerd/x", f"{IMAGES_DIR}/k/L0"]) and not is_ours([])
    assert lower_dirs("rw,upperdir=/u,workdir=/w") == []
    assert image_dir("/mnt/x").startswith(IMAGES_DIR + "/") and image_dir("/mnt/x") != image_dir("/mnt/y")
