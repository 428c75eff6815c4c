"""The one place where the FUSE operations' errors become ``pyfuse3.FUSEError`` (by errno)."""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

from ...errors import ErofsMountError, errno_of

log = logging.getLogger(__name__)


def fuse_errors(fn):
    """Convert every exception of a handler into ``pyfuse3.FUSEError`` (once, by errno)."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (ErofsMountError, OSError) as exc:
            log.debug("%s%r: %s (%s)", fn.__name__, args[:2], exc, errno.errorcode.get(errno_of(exc)))
            raise pyfuse3.FUSEError(errno_of(exc)) from None
        except Exception:
            log.exception("%s%r failed unexpectedly", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper
