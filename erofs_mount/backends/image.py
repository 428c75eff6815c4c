"""A whole image from kernel mounts (NBD and fanotify modes): every layer mounted by the kernel's
erofs driver under a private directory — an ordinary single-layer mount of the mode, with its own
daemon, record and reattach — and the kernel's overlayfs (read-only: lower directories only) at MNT.

    /run/erofs-mount/layers/<layer key>/   one layer: an NBD device or a fanotify sparse file
    /run/erofs-mount/images/<key>.json     one mounted image: MNT, reference, platform, manifest
                                           digest and its layers (bottom first)
    MNT                                    overlay, lowerdir=<top layer>:…:<bottom layer>

Layers are shared: a layer already mounted for another image is used again, not mounted twice
(same device, same daemon, fetched once).  The layer key names the registry, the repository, the
media type and the digest, so a layer is shared only between images of the same repository:

* the layer's recovery record names the reference it was first mounted with, and every reattach
  fetches from there — within one repository a blob cannot disappear while any manifest that a
  mounted image pinned still references it; across repositories (or registries) it can, and the
  pull credentials (token scopes are per repository) may differ;
* the media type decides how the blob is read (EROFS or a tar index over it).

The first image's per-layer options (cache, timeouts, connections) stay with a shared layer.  A
layer is taken down only when no mounted image uses it any more; ``images.lock`` (images_lock)
makes mount and -u of images atomic with respect to each other.  The same layer twice in one image
(overlayfs refuses a lower directory given twice: "conflicting lowerdir path") is stacked once, at
its topmost place: applying a changeset again on top makes its earlier application invisible.

Tar layers carry overlayfs whiteouts in their index (tarindex/tree.py), EROFS layers made by
``mkfs.erofs --tar``/``--oci`` have them too, so the kernel applies the OCI changeset rules itself.
Every layer is pinned to the digest resolved once here, so all come from the same image even if
the tag moves meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import fcntl
import glob
import hashlib
import os
import time
from typing import Iterator

from ..errors import ErofsMountError
from ..status import size_text
from ..statefile import read_json, write_json
from . import kmount
from .fuse.mountinfo import find_mount

RUN_DIR = "/run/erofs-mount"
IMAGES_DIR = RUN_DIR + "/images"
LAYERS_DIR = RUN_DIR + "/layers"


# ---- pure ---------------------------------------------------------------------------------------

def image_doc_path(mountpoint: str) -> str:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return os.path.join(IMAGES_DIR, key + ".json")


def layer_key(registry: str, repository: str, media_type: str, digest: str) -> str:
    return hashlib.sha256("\0".join((registry, repository, media_type, digest)).encode()).hexdigest()[:32]


def layer_dir(key: str) -> str:
    return os.path.join(LAYERS_DIR, key)


def stack_once(keys: list[str]) -> list[str]:
    """The layers to stack (bottom first), each once, at its topmost place."""
    top = {k: i for i, k in enumerate(keys)}
    return [k for i, k in enumerate(keys) if top[k] == i]


def overlay_data(lowers: list[str]) -> str:
    """overlayfs mount data for ``lowers`` (bottom first): the top layer first
    (Documentation/filesystems/overlayfs.rst)."""
    for d in lowers:
        if any(c in d for c in ":,\\"):
            raise ErofsMountError(f"{d}: a layer directory overlayfs cannot name", errno=_errno.EINVAL)
    # xino=on: inode numbers unique across the layers (their own in the low bits, the layer's fsid
    # above), else two files of different layers may show one st_ino, i.e. look hard-linked
    return "lowerdir=" + ":".join(reversed(lowers)) + ",xino=on"


def lower_dirs(super_options: str) -> list[str]:
    """The lowerdir list of an overlay mount's options (top first), [] when none."""
    for opt in super_options.split(","):
        if opt.startswith("lowerdir="):
            return [d for d in opt[len("lowerdir="):].split(":") if d]
    return []


def is_ours(lowers: list[str]) -> bool:
    return bool(lowers) and all(d.startswith(LAYERS_DIR + "/") for d in lowers)


def group_layers(entries: list[dict], docs: list[dict]) -> tuple[list[tuple[dict, list]], list[dict]]:
    """``status``: each image document with its layers' device entries (bottom first; None for a
    layer no device serves), and the entries that belong to no image.  A shared layer's device
    appears under every image that stacks it."""
    by_dir = {mp: e for e in entries for mp in e.get("mountpoints") or ()}
    grouped, claimed = [], set()
    for doc in docs:
        layers = []
        for layer in doc.get("layers") or ():
            e = by_dir.get(layer.get("dir"))
            layers.append((layer, e))
            if e is not None:
                claimed.add(id(e))
        grouped.append((doc, layers))
    return grouped, [e for e in entries if id(e) not in claimed]


def image_line(doc: dict, layers: list) -> str:
    """``status``: the line of one image; ``layers`` as group_layers gives them (entries carry
    ``key``, ``alive`` and ``bytes_fetched_total``)."""
    served = list({e["key"]: e for _layer, e in layers if e is not None}.values())  # a layer given twice: once
    alive = sum(1 for e in served if e["alive"])
    fetched = sum(e.get("bytes_fetched_total", 0) for e in served)
    shared = sum(1 for layer, _e in layers if layer.get("shared"))
    return " ".join([f"image {doc.get('mountpoint')}", f"ref={doc.get('ref')}",
                     f"platform={doc.get('platform') or '-'}", f"manifest={doc.get('manifest_digest') or '-'}",
                     f"layers={len(layers)}", f"mounts={len(served)}", f"daemons_alive={alive}/{len(served)}",
                     f"shared_when_mounted={shared}", f"bytes_fetched_total={size_text(fetched)}"])


def status_lines(entries: list[dict], docs: list[dict]) -> list[str]:
    """Images first (``image MNT …``, then one indented line per layer, bottom first), then the
    entries (NBD devices, fanotify mounts: each with its ``line``) that belong to no image."""
    grouped, single = group_layers(entries, docs)
    lines = []
    for doc, layers in grouped:
        lines.append(image_line(doc, layers))
        for i, (layer, e) in enumerate(layers):
            lines.append(f"  L{i} {layer.get('digest')} " + (e["line"] if e else f"nothing serves {layer.get('dir')}"))
    return lines + [e["line"] for e in single]


def in_use_elsewhere(dirs: list[str], docs: list[dict], mountpoint: str) -> set[str]:
    """Which of ``dirs`` another live image (``docs``, not the one at ``mountpoint``) stacks."""
    used: set[str] = set()
    for doc in docs:
        if doc.get("mountpoint") != mountpoint:
            used.update(layer.get("dir") for layer in doc.get("layers") or ())
    return {d for d in dirs if d in used}


# ---- the mounts ---------------------------------------------------------------------------------

@contextlib.contextmanager
def images_lock() -> Iterator[None]:
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(RUN_DIR, "images.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + 600  # an image mount holds it while its layers mount
        while True:
            try:
                # a POSIX record lock, not flock: the layer daemons forked meanwhile must not
                # inherit it (flock locks belong to the open file, which a fork shares)
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                if time.monotonic() > deadline:
                    raise ErofsMountError("another image mount or unmount holds images.lock for 10 minutes",
                                          errno=_errno.EBUSY) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def live_images() -> list[dict]:
    """The documents of the images mounted now (an overlay of ours at the document's mount point)."""
    out = []
    for path in sorted(glob.glob(os.path.join(IMAGES_DIR, "*.json"))):
        doc = read_json(path)
        if not doc or not isinstance(doc.get("mountpoint"), str):
            continue
        m = find_mount(doc["mountpoint"])
        if m is not None and m.fstype == "overlay" and is_ours(lower_dirs(m.super_options)):
            out.append(doc)
    return sorted(out, key=lambda d: (d.get("started") or 0, d["mountpoint"]))


def _layer_mounted(d: str) -> bool:
    m = find_mount(d)
    return m is not None and m.fstype == "erofs"


def mount_image(ref: str, mountpoint: str, oci_options, mount_layer, unmount, *, flags: int = 0) -> int:
    """``mount_layer(pinned_ref, directory, oci_options with the layer's blob)`` mounts one layer
    (the mode's own single-layer mount), ``unmount(directory)`` takes one down; ``flags``: mount(2)
    flags for the overlay."""
    import trio

    from ..sources.oci.resolve import inspect_oci

    res = trio.run(lambda: inspect_oci(ref, options=oci_options))
    layers = res.manifest.layers
    pinned = str(res.ref)
    base_opts = dataclasses.replace(oci_options, platform=res.platform)
    if len(layers) == 1:
        return mount_layer(pinned, mountpoint, dataclasses.replace(base_opts, blob=layers[0].digest))
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise ErofsMountError(f"{mountpoint}: mount point is not a directory", errno=_errno.ENOTDIR)
    keys = [layer_key(res.ref.registry, res.ref.repository, d.media_type, d.digest) for d in layers]
    by_key = {k: d for k, d in zip(keys, layers)}
    doc_path = image_doc_path(mountpoint)
    with images_lock():
        top = find_mount(mountpoint)
        if top is not None and top.fstype == "overlay" and is_ours(lower_dirs(top.super_options)):
            raise ErofsMountError(f"{mountpoint}: an image is already mounted there", errno=_errno.EBUSY)
        mounted: list[str] = []   # layer directories this call mounted (undone on failure)
        overlay = False
        try:
            stacked = stack_once(keys)
            for k in stacked:
                d = layer_dir(k)
                if _layer_mounted(d):
                    continue      # shared with an image mounted before
                os.makedirs(d, mode=0o755, exist_ok=True)
                mount_layer(pinned, d, dataclasses.replace(base_opts, blob=by_key[k].digest))
                mounted.append(d)
            lowers = [layer_dir(k) for k in stacked]
            data = overlay_data(lowers)
            kmount.mount("overlay", mountpoint, "overlay", flags, data)
            overlay = True
            write_json(doc_path, {
                "mountpoint": mountpoint, "ref": ref, "pinned_ref": pinned, "platform": res.platform,
                "manifest_digest": res.manifest_digest, "started": time.time(),
                "layers": [{"digest": d.digest, "media_type": d.media_type, "size": d.size, "dir": layer_dir(k),
                            "shared": layer_dir(k) not in mounted} for k, d in zip(keys, layers)],
            }, make_dir=True)
        except BaseException:
            if overlay:
                with contextlib.suppress(ErofsMountError):
                    kmount.umount(mountpoint)
            for d in reversed(mounted):
                with contextlib.suppress(ErofsMountError, OSError):
                    unmount(d)
                    os.rmdir(d)
            raise
    return 0


def unmount_image(mountpoint: str, lowers: list[str], unmount) -> int:
    mountpoint = os.path.realpath(mountpoint)
    with images_lock():
        kmount.umount(mountpoint)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image_doc_path(mountpoint))
        shared = in_use_elsewhere(lowers, live_images(), mountpoint)
        failed = []
        for lower in lowers:
            if lower in shared or not _layer_mounted(lower):
                continue
            try:
                unmount(lower)
                os.rmdir(lower)
            except (ErofsMountError, OSError) as exc:
                failed.append(f"{lower}: {exc}")
    if failed:
        raise ErofsMountError(f"{mountpoint}: overlay unmounted, but " + "; ".join(failed))
    return 0
