"""Route mount actions to a backend.

``--mode auto`` (the default) picks NBD when running as root and the kernel's
``nbd`` generic-netlink family answers, else fanotify when the probe says it works
(backends/fanotify/kernel.py), FUSE otherwise, and says which and why in one line
on stderr.  ``-u MNT`` finds the backend from the mount table.
"""

from __future__ import annotations

import os
import sys

from .errors import UsageError
from .options import MountOptions


def choose_mode(opts: MountOptions, kind: str = "local") -> tuple[str, str]:
    """(mode, reason) for ``--mode auto``: NBD, else fanotify (probed: root, pre-content events,
    a cache directory that takes the marks, erofs file-backed mounts), else FUSE."""
    if opts.mode != "auto":
        return opts.mode, f"--mode {opts.mode}"
    if os.geteuid() != 0:
        return "fuse", "not running as root"
    try:
        from .backends.nbd import netlink

        present = netlink.family_available()
    except Exception:  # noqa: BLE001 - any failure to ask means no NBD here
        present = False
    if present:
        return "nbd", "root and the kernel's nbd netlink family answers"
    why_not = _fanotify_unsuitable(opts, kind)
    if why_not is None:
        return "fanotify", "no nbd netlink family; the kernel serves erofs over a sparse file with fanotify"
    return "fuse", f"no nbd netlink family in this kernel (modprobe nbd for NBD mode); not fanotify: {why_not}"


def _fanotify_unsuitable(opts: MountOptions, kind: str) -> str | None:
    if opts.devices:
        return "multi-device images are not served in fanotify mode"
    if opts.fuse or opts.nbd:
        return "FUSE or NBD options were given"
    from .backends.fanotify import kernel
    from .backends.fanotify.lifecycle import cache_root
    from .opener import raw_oci

    try:
        root = cache_root(raw_oci(opts))
    except UsageError as exc:
        return str(exc)
    return kernel.unsupported_reason(root)


def fuse_options(opts: MountOptions, foreground: bool):
    from .backends.fuse.lifecycle import FuseOptions

    return FuseOptions.from_strings(opts.flags, opts.fuse, foreground=foreground)


def _mount_flags(opts: MountOptions) -> tuple[int, str]:
    from .backends.nbd.config import split_mount_options

    return split_mount_options([*opts.flags, *opts.kernel])


def nbd_options(opts: MountOptions, foreground: bool):
    from dataclasses import replace

    from .backends.nbd.config import NbdOptions, apply_nbd_option

    no = NbdOptions(foreground=foreground)
    for key, value in opts.nbd.items():
        no = apply_nbd_option(no, key, value)
    flags, data = _mount_flags(opts)
    return replace(no, mount_flags=flags, mount_data=data)


def _mount(source: str, mountpoint: str, foreground: bool, opts: MountOptions) -> int:
    from .opener import classify

    kind, why = classify(source, opts)
    if kind == "image":
        print(f"erofs-mount: {why}", file=sys.stderr)
    is_oci = kind != "local"
    mode, reason = choose_mode(opts, kind)
    if opts.mode == "auto":
        print(f"erofs-mount: {mode.upper()} mode ({reason})", file=sys.stderr)
    if mode == "fanotify":
        if opts.nbd or opts.fuse or opts.devices:
            raise UsageError("nbd.*, FUSE options and --device do not apply to fanotify mode")
        from .backends.fanotify import lifecycle as fan
        from .opener import oci_options, raw_oci, raw_s3

        flags, data = _mount_flags(opts)
        if kind == "image":   # every layer its own fanotify mount, under the kernel's overlayfs
            from .backends.image import mount_image

            def mount_layer(pinned, d, o):
                raw = {k: v for k, v in raw_oci(opts).items() if k != "oci.layer"}
                return fan.mount(pinned, "layer", d, {**raw, "oci.blob": o.blob, "oci.platform": o.platform},
                                 flags=flags, data=data)
            return mount_image(source, mountpoint, oci_options(opts), mount_layer, _unmount, flags=flags)
        if kind == "s3":
            raw = {**raw_s3(opts), "oci.cache": opts.s3.get("s3.cache")}   # the sparse file's root
            return fan.mount(source, kind, mountpoint, raw, flags=flags, data=data, foreground=foreground)
        return fan.mount(source, kind, mountpoint, raw_oci(opts), flags=flags, data=data, foreground=foreground)
    if mode == "fuse":
        if opts.nbd:
            raise UsageError(f"nbd.* options do not apply to FUSE mode ({', '.join('nbd.' + k for k in opts.nbd)})")
        if kind == "s3":
            from .backends.fuse import lifecycle as fuse

            return fuse.mount_s3(source, mountpoint, fuse_options(opts, foreground), opts)
        if is_oci:
            from .backends.fuse import lifecycle as fuse

            if not hasattr(fuse, "mount_oci"):
                raise UsageError("FUSE mounts from a registry are not available yet (use the tools: "
                                 "erofs-mount ls/cat/extract -o oci.layer=N REF)")
            return fuse.mount_oci(source, mountpoint, fuse_options(opts, foreground), opts)
        from .backends.fuse.lifecycle import mount

        return mount(source, mountpoint, fuse_options(opts, foreground), foreground=foreground,
                     devices=opts.devices, verity=opts.verity_choice(what=source))
    if opts.fuse:
        raise UsageError(f"FUSE options do not apply to NBD mode ({', '.join(opts.fuse)})")
    if opts.devices:
        raise UsageError("multi-device images are not supported in NBD mode yet (use --mode fuse)")
    from .backends.nbd import lifecycle as nbd

    if kind == "s3":
        from .opener import s3_options

        return nbd.mount_s3(source, mountpoint, nbd_options(opts, foreground), s3_options(opts))
    if is_oci:
        from .opener import oci_options

        if kind == "image":   # every layer on its own device, under the kernel's overlayfs
            return nbd.mount_image(source, mountpoint, nbd_options(opts, foreground), oci_options(opts))
        return nbd.mount_oci(source, mountpoint, nbd_options(opts, foreground), oci_options(opts))
    return nbd.mount(source, mountpoint, nbd_options(opts, foreground), verity=opts.verity_choice(what=source))


def _unmount(mountpoint: str) -> int:
    from .backends.fuse.mountinfo import find_mount

    entry = find_mount(os.path.abspath(mountpoint))
    if entry is None:
        raise UsageError(f"{mountpoint}: not mounted")
    if entry.fstype.startswith("fuse"):
        from .backends.fuse.lifecycle import unmount

        return unmount(mountpoint)
    if entry.fstype == "erofs" and not entry.source.startswith("/dev/"):
        from .backends.fanotify import lifecycle as fan

        if fan.owns(mountpoint):
            return fan.unmount(mountpoint)
    if entry.fstype == "erofs" and (entry.source.startswith("/dev/nbd")
                                    or entry.source.startswith("/dev/mapper/erofs-nbd")):  # + dm-verity
        from .backends.nbd.lifecycle import unmount

        return unmount(mountpoint)
    if entry.fstype == "overlay":
        from .backends.image import is_ours, lower_dirs, unmount_image

        lowers = lower_dirs(entry.super_options)
        if is_ours(lowers):   # a whole image (NBD or fanotify): the overlay, then each layer's mount
            return unmount_image(mountpoint, lowers, _unmount)
    raise UsageError(f"{mountpoint}: not an erofs-mount mount ({entry.fstype} from {entry.source})")


def _reattach_oci(opts: MountOptions) -> dict[str, str]:
    """``-o oci.*`` (and ``cache_limit``) given to --reattach: they override the record."""
    oci = dict(opts.oci)
    if "limit" in opts.cache:
        oci["cache_limit"] = opts.cache["limit"]
    return oci


def run(action: str, arg, opts: MountOptions) -> int:
    if action == "mount":
        source, mountpoint, foreground = arg
        return _mount(source, mountpoint, foreground, opts)
    if action == "unmount":
        return _unmount(arg)
    from .backends.nbd import lifecycle as nbd

    if action == "reattach":
        from .backends.fanotify import lifecycle as fan

        if os.path.isdir(arg):
            if fan.owns(arg):
                return fan.reattach(arg)
            raise UsageError(f"{arg}: not a fanotify mount of erofs-mount (NBD: --reattach /dev/nbdN; a whole "
                             "image: reattach the layer mount that `erofs-mount status` lists under it)")
        return nbd.reattach(arg, nbd_options(opts, False), oci=_reattach_oci(opts))
    if action == "disconnect":
        return nbd.disconnect(arg)
    if action == "status":
        from .backends.fuse.status import status as fuse_status

        return _status(nbd, fuse_status)
    if action == "supervise":
        return _supervise(nbd_options(opts, bool(arg)))
    raise UsageError(f"unknown action {action}")


def _supervise(no) -> int:
    """The supervisor: NBD devices (on NBD_CMD_LINK_DEAD, when the kernel has NBD) and fanotify
    mounts (polled) whose daemon died get a new one."""
    from .backends.fanotify.supervise import supervise as fanotify_loop
    from .backends.nbd import netlink
    from .daemon import log_path, run_detached

    nbd_present = netlink.family_available()

    def worker(ready):
        import threading

        ready.ok()
        if not nbd_present:
            return fanotify_loop()
        from .backends.nbd.supervise import supervise as nbd_loop

        threading.Thread(target=fanotify_loop, daemon=True, name="fanotify-supervise").start()
        return nbd_loop(no)

    return run_detached(worker, log_file=no.log_file or log_path("supervise"), foreground=no.foreground)


def _status(nbd, fuse_status) -> int:
    """Whole images (NBD or fanotify layers) with their layers under them, then the single NBD
    devices and fanotify mounts, then FUSE mounts."""
    from .backends.fanotify import lifecycle as fan
    from .backends.image import live_images, status_lines

    entries = [{**e, "key": ("nbd", e["index"]), "line": nbd.status_line(e)} for e in nbd.status_entries()]
    entries += [{**e, "key": ("fanotify", e["mountpoint"]), "mountpoints": [e["mountpoint"]],
                 "alive": e["alive"].get("daemon", False), "bytes_fetched_total": e["bytes_fetched"],
                 "line": fan.status_line(e)} for e in fan.status_entries()]
    lines = status_lines(entries, live_images())
    for line in lines:
        print(line)
    if not lines:
        print("no NBD devices or fanotify mounts served by erofs-mount")
    return fuse_status()
