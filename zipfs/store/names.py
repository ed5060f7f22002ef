"""Namespace path rules: the names users see in the mount and the CLI."""

from __future__ import annotations

from zipfs.errors import ZipfsError

MAX_COMPONENT = 255
MAX_PATH = 4096


def normalize(path: str) -> str:
    """Return the canonical form 'a/b/c' of a store path; refuse anything unsafe.

    Leading and trailing slashes are dropped ('/a/b/' is 'a/b'); the root is ''. Components
    '.', '..', empty ones, NUL bytes and over-long names are refused, never resolved.
    """
    if "\0" in path:
        raise ZipfsError(f"invalid name {path!r}: contains a NUL byte")
    parts = path.strip("/").split("/") if path.strip("/") else []
    for p in parts:
        if p in ("", ".", ".."):
            raise ZipfsError(f"invalid name {path!r}: empty, '.' or '..' component")
        if len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT:
            raise ZipfsError(f"invalid name {path!r}: a component is over {MAX_COMPONENT} bytes")
    out = "/".join(parts)
    if len(out.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise ZipfsError(f"invalid name: path is over {MAX_PATH} bytes")
    return out


def encode(path: str) -> bytes:
    """LMDB key of a normalized path (names from disk may hold undecodable bytes)."""
    return path.encode("utf-8", "surrogateescape")


def decode(key: bytes | memoryview) -> str:
    return bytes(key).decode("utf-8", "surrogateescape")


def parents(path: str) -> list[str]:
    """'a/b/c' -> ['a', 'a/b']: the directories that must exist for path."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
