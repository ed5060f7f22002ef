"""Nothing a request handler or a background task raises may end the mount.

pyfuse3 ends its main loop (and so the mount) when a handler raises anything but FUSEError. Every
handler of an Operations class is wrapped here: a ZipfsError becomes its errno (ENOENT for a
missing name, the NamespaceError's own errno, EIO for a damaged or unreadable store), anything
else is logged with its traceback and answered with EIO. Background tasks use `forever`, which
logs a failure and carries on.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from zipfs.errors import NamespaceError, NotFoundError, ZipfsError

log = logging.getLogger("zipfs.mount")
C = TypeVar("C", bound=type)

#: the pyfuse3.Operations methods the kernel's requests call
HANDLERS = ("lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink",
            "rename", "link", "open", "read", "write", "flush", "release", "fsync", "opendir", "readdir",
            "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr", "listxattr", "removexattr",
            "access", "create", "forget")


def errno_of(e: ZipfsError) -> int:
    """The errno a store error means for a request."""
    if isinstance(e, NamespaceError):
        return e.errno
    if isinstance(e, NotFoundError):
        return errno.ENOENT
    return errno.ENOSPC if "no space left" in str(e) else errno.EIO


def _wrap(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ZipfsError as e:
            code = errno_of(e)
            if code in (errno.EIO, errno.ENOSPC):
                log.error("%s: %s", name, e)
            raise pyfuse3.FUSEError(code) from None
        except OSError as e:
            log.error("%s: %s", name, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:  # noqa: BLE001 - a bug must cost one request, not the mount
            log.exception("%s failed", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


def guarded(cls: C) -> C:
    """Wrap every request handler the class defines (subclasses are wrapped by their own use)."""
    for name in HANDLERS:
        fn = cls.__dict__.get(name)
        if fn is not None and not getattr(fn, "__guarded__", False):
            wrapped = _wrap(name, fn)
            wrapped.__guarded__ = True  # type: ignore[attr-defined]
            setattr(cls, name, wrapped)
    return cls


async def forever(name: str, task: Callable[[], Awaitable[None]]) -> None:
    """Run a background loop for the mount's lifetime; a failure is logged and the loop restarts."""
    while True:
        try:
            await task()
            return
        except Exception:  # noqa: BLE001 - a background failure must not end the mount
            log.exception("%s failed; restarting it", name)
            await trio.sleep(0.5)
