"""Name rules: one component (what a directory entry holds) and whole paths (what the CLI takes).

Names are bytes, as Linux has them; paths given as text are encoded with surrogateescape, so a
name read from disk with undecodable bytes round-trips. The limits are Linux's: 255 bytes a
component (ENAMETOOLONG above), 4096 a path.
"""

from __future__ import annotations

import errno

from zipfs.errors import NamespaceError, ZipfsError

MAX_COMPONENT = 255
MAX_PATH = 4096


def check_component(name: bytes) -> bytes:
    """name, when it can be a directory entry; NamespaceError (EINVAL, ENAMETOOLONG) otherwise."""
    if len(name) > MAX_COMPONENT:
        raise NamespaceError(errno.ENAMETOOLONG, f"name {show(name[:64])}... is over {MAX_COMPONENT} bytes")
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise NamespaceError(errno.EINVAL, f"invalid name {show(name)}")
    return name


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def show(name: bytes) -> str:
    """A name as text (undecodable bytes kept as surrogates, as os.fsdecode does)."""
    return name.decode("utf-8", "surrogateescape")


def split(path: str) -> list[bytes]:
    """The components of a store path 'a/b/c' (leading and trailing slashes dropped; '' is the
    root); ZipfsError for '.', '..', empty components, NUL bytes and over-long names."""
    raw = encode(path).strip(b"/")
    if len(raw) > MAX_PATH:
        raise ZipfsError(f"invalid name: path is over {MAX_PATH} bytes")
    if b"\0" in raw:
        raise ZipfsError(f"invalid name {path!r}: contains a NUL byte")
    parts = raw.split(b"/") if raw else []
    for p in parts:
        try:
            check_component(p)
        except NamespaceError as e:
            raise ZipfsError(f"invalid name {path!r}: {e}") from None
    return parts


def normalize(path: str) -> str:
    """The canonical form 'a/b/c' of a store path; refuse anything unsafe (see split)."""
    return "/".join(show(p) for p in split(path))


def join(parent: str, name: bytes) -> str:
    return f"{parent}/{show(name)}" if parent else show(name)
