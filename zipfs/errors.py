"""Error types. Every error a user can cause is a ZipfsError with a one-line message."""


class ZipfsError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class FormatError(ZipfsError):
    """A file is not a valid instance of the format it claims to be."""


class CorruptChunkError(ZipfsError):
    """A stored chunk failed to decode or its checksum did not match."""


class StoreError(ZipfsError):
    """The store is missing, locked, of an unknown schema, or inconsistent."""


class NotFoundError(ZipfsError):
    """A name does not exist in the store's namespace."""


class NamespaceError(ZipfsError):
    """A namespace change that POSIX refuses (exists, not empty, ...); carries the errno."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
