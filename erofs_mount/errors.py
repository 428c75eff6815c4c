"""The one exception tree of erofs-mount.

Every class carries an ``errno``; the edges convert once: the FUSE backend
raises ``pyfuse3.FUSEError(exc.errno)``, the NBD server replies with the
(positive) errno, the CLI prints ``erofs-mount: <message>`` and exits with
``exc.exit_status``.  Classes that have a natural builtin twin also derive
from it, so ``except FileNotFoundError`` works as a caller expects.

    ErofsMountError (EIO)
    ├── UsageError (EINVAL)                 bad command line / -o options
    ├── ImageError (EINVAL)                 the image as a whole is unusable
    │   ├── NotErofsError (EINVAL)          bad magic at offset 1024
    │   ├── ChecksumError (EBADMSG)         sb_crc32c mismatch
    │   └── UnsupportedError (EOPNOTSUPP)   unknown feature bit / layout / algorithm
    ├── CorruptedError (EUCLEAN)            one inode, dirent or extent is damaged
    ├── LoopError (ELOOP)                   directory cycle
    ├── NotFoundError (ENOENT)              + FileNotFoundError
    ├── NotADirError (ENOTDIR)              + NotADirectoryError
    ├── IsADirError (EISDIR)                + IsADirectoryError
    ├── NoDataError (ENODATA)               missing xattr
    ├── RangeError (ERANGE)                 buffer too small (xattrs)
    ├── ReadOnlyError (EROFS)               write access asked
    ├── PermissionError_ (EPERM)            operation not permitted
    └── SourceError (EIO)                   reading the bytes failed
        ├── ShortReadError (EIO)            read past the end of a source
        ├── NetworkError (EIO)              registry unreachable / retries exhausted
        ├── AuthError (EACCES)              credentials refused
        ├── RegistryError (EIO)             unexpected registry answer (manifest, media type)
        ├── ObjectStoreError (EIO)          unexpected S3 answer
        │   └── ObjectChangedError (EIO)    the pinned S3 object (ETag/version) was replaced
        └── IntegrityError (EIO)            bytes that do not match the dm-verity hash tree
"""

from __future__ import annotations

import errno as _errno


class ErofsMountError(Exception):
    """Base of every error erofs-mount raises on purpose."""

    errno: int = _errno.EIO
    exit_status: int = 1

    def __init__(self, message: str = "", *, errno: int | None = None) -> None:
        Exception.__init__(self, message)
        self.message = message or self.__class__.__name__
        if errno is not None:
            self.errno = errno

    def __str__(self) -> str:
        return self.message

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


def _os_init(self: ErofsMountError, message: str = "", *, errno: int | None = None) -> None:
    # OSError subclasses: keep the errno attribute meaningful, str() = message.
    OSError.__init__(self, message)
    self.message = message or self.__class__.__name__
    self.errno = errno if errno is not None else type(self).errno_default  # type: ignore[attr-defined]
    self.strerror = self.message


class UsageError(ErofsMountError):
    errno = _errno.EINVAL
    exit_status = 2


class ImageError(ErofsMountError):
    errno = _errno.EINVAL


class NotErofsError(ImageError):
    errno = _errno.EINVAL


class ChecksumError(ImageError):
    errno = _errno.EBADMSG


class UnsupportedError(ImageError):
    errno = _errno.EOPNOTSUPP


class CorruptedError(ErofsMountError):
    """On-disk corruption; the kernel's EFSCORRUPTED is EUCLEAN."""

    errno = _errno.EUCLEAN


class LoopError(ErofsMountError):
    errno = _errno.ELOOP


class NotFoundError(ErofsMountError, FileNotFoundError):
    errno_default = _errno.ENOENT
    __init__ = _os_init  # type: ignore[assignment]


class NotADirError(ErofsMountError, NotADirectoryError):
    errno_default = _errno.ENOTDIR
    __init__ = _os_init  # type: ignore[assignment]


class IsADirError(ErofsMountError, IsADirectoryError):
    errno_default = _errno.EISDIR
    __init__ = _os_init  # type: ignore[assignment]


class NoDataError(ErofsMountError):
    errno = _errno.ENODATA


class RangeError(ErofsMountError):
    errno = _errno.ERANGE


class ReadOnlyError(ErofsMountError):
    errno = _errno.EROFS


class StaleError(ErofsMountError):
    """A handle that names no inode (FUSE: an inode number no nid maps to)."""
    errno = _errno.ESTALE


class NotPermittedError(ErofsMountError):
    errno = _errno.EPERM


class SourceError(ErofsMountError):
    errno = _errno.EIO


class ShortReadError(SourceError):
    errno = _errno.EIO


class NetworkError(SourceError):
    errno = _errno.EIO


class AuthError(SourceError):
    errno = _errno.EACCES


class RegistryError(SourceError):
    errno = _errno.EIO


class ObjectStoreError(SourceError):
    errno = _errno.EIO


class ObjectChangedError(ObjectStoreError):
    """The S3 object a mount pinned (its ETag, its version) is no longer what the store serves."""
    errno = _errno.EIO


class IntegrityError(SourceError):
    """A block (or the tree itself) does not match the pinned dm-verity root hash (verity/)."""
    errno = _errno.EIO


def errno_of(exc: BaseException) -> int:
    """The errno to report for any exception (EIO for the unexpected)."""
    if isinstance(exc, ErofsMountError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO


def leaf_error(exc: BaseException) -> BaseException:
    """The most telling leaf of an exception group (a trio nursery's): an ErofsMountError if there is
    one, else the first leaf; ``exc`` itself when it is no group."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [leaf_error(e) for e in exc.exceptions]
        exc = next((e for e in leaves if isinstance(e, ErofsMountError)), leaves[0])
    return exc
