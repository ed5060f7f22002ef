"""The one thread that owns LMDB write transactions.

LMDB allows one writer at a time and binds a write transaction to its thread, so every write
goes through here. Queued operations are batched into one transaction (one fsync for many
small writes); each runs in a nested transaction, so one failing operation does not abort the
others in its batch. Whatever an operation raises reaches its caller as a ZipfsError (an LMDB
error is a StoreError), never as something a request handler does not expect.

On a full disk a commit fails; an operation that frees space (rm, gc, the cleanup of a failed
ingest) then gets the store's reserve released and runs once more, alone, so space can always
be reclaimed.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import lmdb

from zipfs.errors import StoreError, ZipfsError

log = logging.getLogger("zipfs.store")
T = TypeVar("T")
#: below this much free space a failed commit is reported as a full disk
LOW_SPACE = 64 << 20
_STOP = object()


class Writer:
    """Runs `op(txn)` callables on a dedicated thread, batched into shared transactions."""

    def __init__(self, env: lmdb.Environment, path: str, on_full: Callable[[], bool] = lambda: False,
                 max_batch_ops: int = 512, max_batch_bytes: int = 256 << 20) -> None:
        self._env = env
        self._path = path
        self._on_full = on_full
        self._q: queue.Queue[Any] = queue.Queue()
        self._max_ops = max_batch_ops
        self._max_bytes = max_batch_bytes
        self._thread = threading.Thread(target=self._run, name="zipfs-lmdb-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[lmdb.Transaction], T], size: int = 0) -> Future[T]:
        """Queue op; `size` (bytes it writes) bounds how much one transaction carries."""
        fut: Future[T] = Future()
        self._q.put((op, fut, size))
        return fut

    def call(self, op: Callable[[lmdb.Transaction], T], frees_space: bool = False) -> T:
        """Run op in a write transaction and wait for its commit. With frees_space, a commit that
        fails on a full disk is retried once with the store's reserve given back."""
        try:
            return self.submit(op).result()
        except StoreError as e:
            if not (frees_space and "no space left" in str(e) and self._on_full()):
                raise
        return self.submit(op).result()

    def close(self) -> None:
        """Finish queued operations, then stop the thread."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()

    def _next_batch(self, first: Any) -> tuple[list[Any], bool]:
        batch, size, stop = [first], first[2], False
        while len(batch) < self._max_ops and size < self._max_bytes:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
            size += item[2]
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            batch, stop = self._next_batch(first)
            self._commit(batch)
            if stop:
                return

    def _explain(self, e: Exception) -> str:
        """LMDB reports a full disk as EIO at commit; say what actually happened."""
        msg = f"store write failed: {e}"
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            return msg + " (no space left on the store's filesystem)"
        try:
            st = os.statvfs(self._path)
        except OSError:
            return msg
        free = st.f_bavail * st.f_frsize
        if free < LOW_SPACE:
            msg += f" (no space left on the store's filesystem: {free >> 20} MiB free)"
        return msg

    def _commit(self, batch: list[Any]) -> None:
        results: list[tuple[Future[Any], bool, Any]] = []
        try:
            with self._env.begin(write=True, buffers=True) as txn:
                for op, fut, _ in batch:
                    try:
                        with self._env.begin(write=True, parent=txn, buffers=True) as child:
                            results.append((fut, True, op(child)))
                    except ZipfsError as e:
                        results.append((fut, False, e))
                    except Exception as e:  # noqa: BLE001 - handed to the caller's future
                        log.debug("store operation failed", exc_info=True)
                        results.append((fut, False, StoreError(self._explain(e))))
        except Exception as e:  # noqa: BLE001 - a failed commit fails every op in it
            err = e if isinstance(e, StoreError) else StoreError(self._explain(e))
            for _, fut, _ in batch:
                fut.set_exception(err)
            return
        for fut, ok, value in results:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
