"""Command line: mount.erofs-compatible mounting plus inspection tools.

    erofs-mount [--mode auto|nbd|fanotify|fuse] [-t erofs[.nbd|.fanotify|.fuse]] [-o OPTS] [--device PATH] SOURCE MNT
    erofs-mount -u MNT | --reattach /dev/nbdN|MNT | --disconnect /dev/nbdN | status
    erofs-mount inspect|ls [-l]|cat|stat|getfattr|extract IMAGE [PATH|DEST [PATH]]
    erofs-mount verity-format [--salt HEX] IMAGE      (append a dm-verity tree; prints the root hash)

Every failure is one line on stderr, ``erofs-mount: <what>: <problem>``, and a
non-zero exit status; ``-d 9`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable

from . import __version__
from .errors import ErofsMountError, UsageError, leaf_error
from .options import MountOptions, parse_options

TOOLS = ("inspect", "ls", "cat", "stat", "getfattr", "extract", "oci-inspect", "verity-format")
PROG = "erofs-mount"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other failure
        raise UsageError(message)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="comma-separated options (device=PATH, oci.layer=N, oci.blob=sha256:..., ...)")
    p.add_argument("--device", action="append", default=[], metavar="PATH",
                   help="an extra device of a multi-device image (repeatable, in device-table order)")
    p.add_argument("-d", dest="debug", type=int, default=0, metavar="N", help="debug level (9: tracebacks)")


def tool_parser(name: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} {name}")
    _common(p)
    p.add_argument("image", metavar="REF" if name == "oci-inspect" else "IMAGE")
    if name == "ls":
        p.add_argument("-l", dest="long", action="store_true", help="long listing")
        p.add_argument("path", nargs="?", default="/")
    elif name in ("cat", "stat", "getfattr"):
        p.add_argument("path")
    elif name == "verity-format":
        p.add_argument("--salt", metavar="HEX", help="the salt (default: 32 random bytes)")
        p.add_argument("--force", action="store_true", help="replace a tree (or other bytes) after the image")
    elif name == "extract":
        p.add_argument("dest", metavar="DEST")
        p.add_argument("path", nargs="?", default="/")
        p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    return p


def mount_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Mount an EROFS image (local file, OCI layer or whole image) over NBD, fanotify or FUSE.",
                epilog=f"tools: {PROG} {{{','.join(TOOLS)}}} IMAGE ...; {PROG} status")
    _common(p)
    p.add_argument("-t", dest="fstype", metavar="TYPE", help="erofs, erofs.nbd, erofs.fanotify or erofs.fuse")
    p.add_argument("--mode", choices=("auto", "nbd", "fanotify", "fuse"), help="backend (default: auto)")
    p.add_argument("-u", dest="unmount", action="store_true", help="unmount MNT")
    p.add_argument("--reattach", metavar="DEV|MNT",
                   help="attach a new daemon to a live NBD device or fanotify mount")
    p.add_argument("--disconnect", metavar="DEV", help="force-disconnect an NBD device")
    p.add_argument("--supervise", action="store_true",
                   help="start a supervisor that reattaches NBD devices (NBD_CMD_LINK_DEAD) "
                        "and fanotify mounts whose daemon died")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached (don't detach the daemon)")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("args", nargs="*", metavar="SOURCE MNT")
    return p


# ---------------------------------------------------------------------- sources
def open_image(source: str, opts: MountOptions):
    """An Image over SOURCE: a local file or block device, or an OCI layer (with -o oci.layer/oci.blob)."""
    from .erofs.image import Image
    from .opener import classify, open_devices, open_layers_sync, open_sync

    if classify(source, opts)[0] == "image" and not opts.devices:  # the whole image: its layers merged
        sources = open_layers_sync(source, opts)
        images = [Image(s, size=s.size) for s in sources]
        if len(images) == 1:
            return images[0]
        from .merge.image import MergedImage

        return MergedImage(images)
    primary = open_sync(source, opts)
    devices = open_devices(opts)
    return Image(primary, size=primary.size, devices=devices)


# ---------------------------------------------------------------------- tools
def run_tool(name: str, argv: list[str]) -> int:
    global _SUBJECT
    ns = tool_parser(name).parse_args(argv)
    _SUBJECT = ns.image
    _set_debug(ns.debug)
    opts = parse_options(ns.options, devices=tuple(ns.device))
    if name == "verity-format":
        from .verity.format import format_image, format_lines

        try:
            salt = None if ns.salt is None else bytes.fromhex(ns.salt)
        except ValueError:
            raise UsageError(f"--salt {ns.salt!r}: not hex") from None
        root, offset, params = format_image(ns.image, salt=salt, force=ns.force)
        _write_lines(format_lines(ns.image, root, offset, params))
        return 0
    if name == "oci-inspect":
        from .opener import inspect_oci_lines

        _write_lines(inspect_oci_lines(ns.image, opts))
        return 0
    img = open_image(ns.image, opts)
    from . import tools

    lines = {
        "inspect": lambda: tools.inspect_lines(img),
        "ls": lambda: tools.ls_lines(img, ns.path, ns.long),
        "stat": lambda: tools.stat_lines(img, ns.path),
        "getfattr": lambda: tools.getfattr_lines(img, ns.path),
    }.get(name)
    if lines is not None:
        _write_lines(lines())
        return 0
    if name == "cat":
        _cat(img, ns.path)
    elif name == "extract":
        return _extract(img, ns)
    return 0


def _write_lines(lines) -> None:
    out = getattr(sys.stdout, "buffer", None)
    for line in lines:
        if out is not None:
            out.write((line + "\n").encode("utf-8", "surrogateescape"))
        else:
            print(line)
    if out is not None:
        out.flush()


def _cat(img, path: str) -> None:
    from .errors import IsADirError

    nid = img.resolve(path)
    inode = img.inode(nid)
    if inode.is_dir:
        raise IsADirError(f"{path}: is a directory")
    sink = sys.stdout.buffer
    pos = 0
    while pos < inode.size:
        data = img.read(nid, pos, min(1 << 20, inode.size - pos))
        if not data:
            break
        sink.write(data)
        pos += len(data)
    sink.flush()


def _extract(img, ns) -> int:
    from .extract import Extractor, TtyProgress

    progress = None
    if not ns.no_progress and sys.stderr.isatty():
        progress = TtyProgress(img.sb.blocks * img.block_size)
    report = Extractor(img, ns.dest, progress=progress).run(ns.path)
    if progress:
        progress.done()
    for path, message in report.errors:
        eprint(f"{PROG}: extract: {path}: {message}")
    for message in report.warnings:
        eprint(f"{PROG}: warning: {message}")
    return 1 if report.errors else 0


# ---------------------------------------------------------------------- mounting
def run_mount(argv: list[str]) -> int:
    ns = mount_parser().parse_args(argv)
    _set_debug(ns.debug)
    opts = parse_options(ns.options, fstype=ns.fstype, mode=ns.mode, devices=tuple(ns.device))
    if ns.unmount:
        if len(ns.args) != 1:
            raise UsageError("-u takes exactly one mount point")
        return _backend_call("unmount", ns.args[0], opts)
    if ns.reattach:
        return _backend_call("reattach", ns.reattach, opts)
    if ns.disconnect:
        return _backend_call("disconnect", ns.disconnect, opts)
    if ns.supervise:
        if ns.args:
            raise UsageError("--supervise takes no SOURCE or MOUNTPOINT")
        return _backend_call("supervise", ns.foreground, opts)
    if ns.args == ["status"]:
        return _backend_call("status", None, opts)
    if len(ns.args) != 2:
        raise UsageError("expected SOURCE and MOUNTPOINT (see --help)")
    source, mountpoint = ns.args
    return _backend_call("mount", (source, mountpoint, ns.foreground), opts)


def _backend_call(action: str, arg, opts: MountOptions) -> int:
    from . import dispatch

    return dispatch.run(action, arg, opts)


# ---------------------------------------------------------------------- main
_DEBUG = 0
_SUBJECT = ""


def _set_debug(level: int) -> None:
    """-d N: 0 prints only the final one-line error; 1+ warnings, 5+ info, 7+ debug, 9 tracebacks."""
    global _DEBUG
    _DEBUG = level
    root = logging.getLogger()
    if level <= 0:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level >= 7 else logging.INFO if level >= 5 else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    global _SUBJECT
    argv = list(sys.argv[1:] if argv is None else argv)
    _SUBJECT = ""
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        return _main(argv)
    finally:  # main() may run in-process (tests, embedding): leave logging as it was
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def _main(argv: list[str]) -> int:
    try:
        try:
            if argv and argv[0] in TOOLS:
                return run_tool(argv[0], argv[1:])
            return run_mount(argv)
        except BaseExceptionGroup as group:  # a trio nursery's: its telling leaf is the error
            raise leaf_error(group) from None
    except ErofsMountError as exc:
        return _fail(_SUBJECT, exc, exc.exit_status)
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        return _fail(_SUBJECT, exc, 1)
    except Exception as exc:  # noqa: BLE001 - the last resort: still one line
        return _fail(_SUBJECT, exc, 70, unexpected=True)


def _fail(subject: str, exc: BaseException, status: int, unexpected: bool = False) -> int:
    if _DEBUG >= 9:
        traceback.print_exc()
    if isinstance(exc, OSError) and not isinstance(exc, ErofsMountError) and exc.strerror:
        text = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    if unexpected:
        text = f"internal error: {type(exc).__name__}: {text} (run with -d 9 for details)"
    prefix = f"{PROG}: {subject}: " if subject and subject not in text else f"{PROG}: "
    eprint(prefix + text.splitlines()[0] if text else prefix.rstrip(": "))
    return status


def eprint(line: str) -> None:
    """One line on stderr; names from an image may hold any bytes (kept as surrogate escapes)."""
    data = (line + "\n").encode("utf-8", "surrogateescape")
    buf = getattr(sys.stderr, "buffer", None)
    if buf is not None:
        sys.stderr.flush()
        buf.write(data)
        buf.flush()
    else:
        sys.stderr.write(data.decode("utf-8", "backslashreplace"))


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


Callback = Callable[..., int]
