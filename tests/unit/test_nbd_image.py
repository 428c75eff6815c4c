"""The pure parts of a whole image in NBD mode (backends/image.py): overlayfs mount data, how
-u recognises our overlay, layer keys (what may be shared), the stack of a layer given twice, and
how status groups devices under images."""

import io

import pytest

from erofs_mount.backends.nbd import lifecycle
from erofs_mount.backends.image import (IMAGES_DIR, LAYERS_DIR, group_layers, image_doc_path, in_use_elsewhere,
                                            is_ours, layer_dir, layer_key, lower_dirs, overlay_data, stack_once)
from erofs_mount.errors import ErofsMountError

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def test_overlay_data_top_layer_first_and_xino():
    lowers = [f"{LAYERS_DIR}/k{i}" for i in range(3)]
    data = overlay_data(lowers)
    assert data == f"lowerdir={LAYERS_DIR}/k2:{LAYERS_DIR}/k1:{LAYERS_DIR}/k0,xino=on"
    assert lower_dirs("ro,relatime," + data) == list(reversed(lowers))
    with pytest.raises(ErofsMountError):
        overlay_data(["/a:b"])


def test_only_our_overlays_are_ours():
    assert is_ours([f"{LAYERS_DIR}/a", f"{LAYERS_DIR}/b"])
    assert not is_ours(["/var/lib/containerd/x", f"{LAYERS_DIR}/b"]) and not is_ours([])
    assert lower_dirs("rw,upperdir=/u,workdir=/w") == []
    assert image_doc_path("/mnt/x").startswith(IMAGES_DIR + "/") and image_doc_path("/mnt/x") != image_doc_path("/mnt/y")


def test_layer_key_shares_only_within_a_repository_and_media_type():
    k = layer_key("reg:5000", "team/app", GZ, D1)
    assert k == layer_key("reg:5000", "team/app", GZ, D1)          # another tag of the same repository
    assert len({k, layer_key("reg:5000", "team/other", GZ, D1), layer_key("mirror:5000", "team/app", GZ, D1),
                layer_key("reg:5000", "team/app", "application/vnd.erofs", D1),
                layer_key("reg:5000", "team/app", GZ, D2)}) == 5
    assert layer_dir(k).startswith(LAYERS_DIR + "/")


def test_a_layer_given_twice_is_stacked_once_at_its_topmost_place():
    assert stack_once(["a", "b", "c"]) == ["a", "b", "c"]
    assert stack_once(["a", "b", "a"]) == ["b", "a"]
    assert stack_once(["e", "a", "e", "b", "e"]) == ["a", "b", "e"]


def _entry(index, mountpoints, alive=True, fetched=100):
    return {"index": index, "device": f"/dev/nbd{index}", "kind": "oci", "source": "r/app@x", "ref": "r/app@x",
            "platform": "linux/amd64", "digest": "sha256:d", "pid": 10 + index, "alive": alive,
            "mountpoints": mountpoints, "published": True, "bytes_fetched": fetched,
            "bytes_fetched_total": fetched, "cache_hit_ratio": 0.5, "retries": 0, "retries_total": 0, "daemons": 1}


def test_status_groups_devices_under_their_images_and_shared_layers_under_both():
    a, b = f"{LAYERS_DIR}/a", f"{LAYERS_DIR}/b"
    entries = [_entry(0, [a]), _entry(1, [b], alive=False), _entry(2, ["/mnt/plain"])]
    docs = [{"mountpoint": "/mnt/one", "ref": "r/app:1", "layers": [{"dir": a, "digest": D1}, {"dir": b, "digest": D2}]},
            {"mountpoint": "/mnt/two", "ref": "r/app:2", "layers": [{"dir": a, "digest": D1, "shared": True},
                                                                 {"dir": f"{LAYERS_DIR}/gone", "digest": D2}]}]
    grouped, rest = group_layers(entries, docs)
    assert [d["mountpoint"] for d, _ in grouped] == ["/mnt/one", "/mnt/two"]
    assert [e["index"] for _, e in grouped[0][1]] == [0, 1]
    assert grouped[1][1][0][1]["index"] == 0 and grouped[1][1][1][1] is None
    assert [e["index"] for e in rest] == [2]
    assert in_use_elsewhere([a, b], docs, "/mnt/one") == {a}
    assert in_use_elsewhere([a, b], docs, "/mnt/two") == {a, b}


def test_status_prints_the_image_then_its_layers(monkeypatch):
    a = f"{LAYERS_DIR}/a"
    monkeypatch.setattr(lifecycle, "status_entries", lambda: [_entry(3, [a], fetched=2 << 20)])
    from erofs_mount.backends import image

    monkeypatch.setattr(image, "live_images", lambda: [
        {"mountpoint": "/mnt/one", "ref": "r/app:1", "platform": "linux/amd64", "manifest_digest": D2, "started": 1,
         "layers": [{"dir": a, "digest": D1}, {"dir": f"{LAYERS_DIR}/x", "digest": D2, "shared": True}]}])
    out = io.StringIO()
    assert lifecycle.status(out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("image /mnt/one ref=r/app:1 platform=linux/amd64 manifest=" + D2)
    assert "layers=2 mounts=1 daemons_alive=1/1 shared_when_mounted=1" in lines[0]
    assert "bytes_fetched_total=2097152(2.0MiB)" in lines[0]
    assert lines[1].startswith(f"  L0 {D1} nbd3 ") and f"mount={a}" in lines[1]
    assert lines[2] == f"  L1 {D2} nothing serves {LAYERS_DIR}/x"
    assert len(lines) == 3
