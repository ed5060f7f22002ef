"""A staged version of a file's content, as a mount holds it: a staging file and its state.

The descriptor is shared by everything that uses the version: the LiveFile that shows it (its
handles read and write through it), an ingest reading it, each thread call in flight. `users`
counts them, and the descriptor is closed when the last one lets go, never while one uses it
(closing a descriptor another thread is reading could hand that read a different file that
reused the number). A LiveFile opens the descriptor when it takes the version, so the bytes stay
readable through it even once the staging file is deleted (ingested, superseded, removed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

#: states: "working" (written to, in place), "queued" / "ingesting" / "failed" (closed and
#: acknowledged, waiting for or in ingest), "stored" (ingested, or a read-only mount's view),
#: "gone" (superseded or removed; read by open handles until they close)


@dataclass(eq=False)
class Version:
    sid: int
    ino: int
    path: Path
    #: bytes written so far (unacknowledged ones included)
    size: int
    #: at most this much of it takes disk space (bytes copied or written): a file made large by a
    #: truncate is sparse, and counts little against the staging limit
    written: int = -1
    fd: int = -1
    #: what the journal acknowledged of this version (-1: nothing yet; the inode does not show it)
    acked_size: int = -1
    state: str = "working"
    #: writes since the last acknowledgement, counted so a flush racing a write stays dirty
    writes: int = 0
    acked_writes: int = 0
    #: errno of a failed write or fsync: the version is poisoned
    error: int = 0
    failure: str = ""
    users: int = 0
    #: how a read-only mount opens it
    flags: int = os.O_RDWR
    ingest_ended: trio.Event | None = None

    @property
    def disk(self) -> int:
        """An upper bound of the staging space it takes."""
        return self.size if self.written < 0 else min(self.size, self.written)

    @property
    def acked(self) -> bool:
        return self.acked_size >= 0

    @property
    def dirty(self) -> bool:
        return self.writes != self.acked_writes or not self.acked

    def open(self) -> int:
        """The descriptor, opened on demand (blocking: call from a worker thread, inside use()
        or while held, so it stays open)."""
        if self.fd < 0:
            self.fd = os.open(self.path, self.flags | os.O_CLOEXEC)
        return self.fd

    def hold(self) -> None:
        self.users += 1

    def let_go(self) -> None:
        """One user is done; the last one closes the descriptor."""
        self.users -= 1
        if self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextmanager
    def use(self) -> Iterator[None]:
        """Around a thread call on fd: the descriptor stays open until it returns."""
        self.hold()
        try:
            yield
        finally:
            self.let_go()
