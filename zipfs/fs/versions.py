"""A staged version of a file's content, as a mount holds it: a staging file and its state.

The descriptor is shared by every handle reading or writing the version; `use()` counts the
thread calls in flight on it, so it is closed only when none is (closing a descriptor another
thread is reading could hand that read a different file that reused the number).
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
FROZEN = ("ingesting", "stored", "gone")


@dataclass(eq=False)
class Version:
    sid: int
    ino: int
    path: Path
    #: bytes written so far (unacknowledged ones included)
    size: int
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
    closing: bool = False
    ingest_ended: trio.Event | None = None

    @property
    def acked(self) -> bool:
        return self.acked_size >= 0

    @property
    def dirty(self) -> bool:
        return self.writes != self.acked_writes or not self.acked

    def open(self) -> int:
        """The descriptor, (re)opened on demand (blocking: call from a worker thread)."""
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self.closing = False
        return self.fd

    @contextmanager
    def use(self) -> Iterator[None]:
        """Around a thread call on fd: the descriptor stays open until it returns."""
        self.users += 1
        try:
            yield
        finally:
            self.users -= 1
            if self.closing and not self.users:
                self.close()

    def close(self) -> None:
        """Close the descriptor now, or once the calls in flight on it have returned."""
        if self.users:
            self.closing = True
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.closing = False
