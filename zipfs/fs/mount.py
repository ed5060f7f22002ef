"""Run a mount: the process around the FUSE operations.

Backgrounding: the parent forks before anything opens the store or starts a thread (LMDB and
trio are not fork-safe); the child mounts, then reports "ok" (or the error) through a pipe, and
the parent exits 0 only once the mount is live. Signals (as s3ql does): SIGINT/SIGTERM end the
FUSE loop and unmount cleanly; an inherited SIG_IGN for SIGINT is reset; SIGUSR1 dumps every
thread's stack. Under systemd (Type=notify) READY=1 is sent once mounted.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from zipfs.errors import ZipfsError
from zipfs.fs.guard import forever
from zipfs.fs.namespace import Namespace
from zipfs.fs.operations import Operations
from zipfs.fs.remote_sync import refresh_loop
from zipfs.fs.writes import WritableOperations
from zipfs.ingest.ingester import Ingester
from zipfs.read.cache import ChunkCache
from zipfs.read.chunks import ChunkSource
from zipfs.remote.attach import open_remote
from zipfs.remote.pull import sync
from zipfs.store import staging
from zipfs.store.lmdb_store import Store
from zipfs.store.pins import Pins

log = logging.getLogger("zipfs.mount")


@dataclass
class MountOptions:
    store: Path
    mountpoint: Path
    foreground: bool = False
    cache_size: int = 1 << 30
    workers: int = os.cpu_count() or 1
    allow_other: bool = False
    log_level: str = "INFO"
    log_file: str | None = None
    readahead_kb: int | None = None
    #: staged bytes above which writes wait for background ingest to catch up
    staging_limit: int = 16 << 30
    ingest_workers: int = max(1, (os.cpu_count() or 1) // 2)
    read_only: bool = False
    #: mount over a directory that has entries (they are hidden while mounted)
    nonempty: bool = False


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def check_mountpoint(mnt: Path, nonempty: bool = False, store: Path | None = None) -> None:
    """Refuse a mount point that is not a directory, is mounted already, holds the store (the
    mount would hide it from itself), or (unless nonempty) has entries: a mount over them would
    hide them without a word."""
    if not mnt.is_dir():
        raise ZipfsError(f"mount point {mnt} is not a directory")
    mnt = mnt.resolve()  # a link to a live mount is a live mount (ismount does not follow it)
    if os.path.ismount(mnt):
        raise ZipfsError(f"{mnt} is already a mount point (zipfs umount {mnt})")
    if store is not None and store.resolve().is_relative_to(mnt):
        raise ZipfsError(f"store {store} is inside mount point {mnt}: the mount would hide it")
    if not nonempty:
        try:
            with os.scandir(mnt) as entries:
                has_entries = next(entries, None) is not None
        except OSError as e:
            raise ZipfsError(f"cannot read mount point {mnt}: {e.strerror}") from None
        if has_entries:
            raise ZipfsError(f"mount point {mnt} is not empty: the mount would hide what is in it "
                             "(--nonempty mounts over it anyway)")


def _device_of(mnt: Path) -> str:
    """'major:minor' of the filesystem mounted at mnt, from /proc/self/mountinfo. Never stat the
    mount point from the mount process: that is a request to ourselves, and a thread waiting for
    its answer when the process is killed keeps the process (and its mount point) from ever ending."""
    target = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == target:
                return fields[2]
    raise OSError(f"{mnt} is not in /proc/self/mountinfo")


def set_readahead(mnt: Path, kb: int) -> None:
    """Raise the mount's bdi read_ahead_kb (as root) so the kernel sends 1 MiB reads, not 128 KiB."""
    try:
        path = Path(f"/sys/class/bdi/{_device_of(mnt)}/read_ahead_kb")
        path.write_text(str(kb))
        log.info("read_ahead_kb=%d for %s", kb, path.parent.name)
    except OSError as e:
        log.warning("cannot set read_ahead_kb of %s: %s", mnt, e.strerror)


def _setup_logging(opts: MountOptions) -> None:
    # names are bytes: one that is not UTF-8 is logged with escapes, never an encoding error
    handler: logging.Handler = (logging.FileHandler(opts.log_file, errors="backslashreplace") if opts.log_file
                                else logging.StreamHandler(sys.stderr))
    if not opts.log_file and hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(errors="backslashreplace")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("zipfs")
    root.handlers[:] = [handler]
    root.setLevel(opts.log_level.upper())


async def _serve(ops: Operations, opts: MountOptions) -> None:
    ops.decoder.start()
    try:
        async with trio.open_nursery() as nursery:
            if isinstance(ops, WritableOperations):
                nursery.start_soon(forever, "background ingest", ops.ingest_worker)

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("%s: unmounting", signal.Signals(signum).name)
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signals)
            if ops.ns.store.remote is not None:
                nursery.start_soon(forever, "remote sync", partial(refresh_loop, ops, ops.ns.store.remote))
            if opts.readahead_kb:
                nursery.start_soon(trio.to_thread.run_sync, set_readahead, opts.mountpoint, opts.readahead_kb)
            await pyfuse3.main()
            if ops.ns.store.remote is not None:
                ops.ns.store.remote.stopping.set()  # a push in progress stops at its next pack
            if isinstance(ops, WritableOperations):
                ops.ingester.cancelled.set()  # an ingest in progress stops; its file stays staged
            nursery.cancel_scope.cancel()
    finally:
        ops.decoder.close()


def serve(opts: MountOptions, ready: Callable[[str], None] = lambda _: None) -> None:
    """Mount and serve until unmounted or signalled. `ready` gets "ok" once mounted, or an error."""
    _setup_logging(opts)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background start inherits SIG_IGN
    faulthandler.register(signal.SIGUSR1, file=sys.stderr if not opts.log_file else
                          open(opts.log_file, "a"), all_threads=True)  # noqa: SIM115 - lives as long as we do
    said: list[str] = []

    def ready_once(msg: str) -> None:
        if not said:
            said.append(msg)
            ready(msg)

    try:
        _serve_store(opts, ready_once)
    except ZipfsError as e:
        ready_once(str(e))
        raise


def _serve_store(opts: MountOptions, ready: Callable[[str], None]) -> None:
    check_mountpoint(opts.mountpoint, opts.nonempty, opts.store)
    store = Store(opts.store, create=not opts.read_only)
    with ExitStack() as stack:
        stack.callback(store.close)
        remote = open_remote(store)
        if remote is not None:  # the bucket's models are there when the mount is
            try:
                sync(store, remote)
            except ZipfsError as e:
                log.warning("cannot look at the bucket now (the mount will retry): %s", e)
        pins = Pins(store.path)
        stack.callback(pins.close)
        source = ChunkSource(store, ChunkCache(opts.cache_size))
        if not opts.read_only:
            try:
                stack.enter_context(store.flock("staging.lock", exclusive=True, wait=False))
            except ZipfsError:
                log.warning("another mount of %s writes its staging area: this one is read-only",
                            opts.store)
                opts.read_only = True
        recovered = None
        if not opts.read_only:
            try:
                recovered = staging.recover(store)
            except ZipfsError as e:
                log.error("staging recovery failed (%s): serving %s read-only; run zipfs fsck", e, opts.store)
        if recovered is None:
            _run(Operations(Namespace(store), source, opts.workers, pins), opts, ready)
            return
        log.info("staging: %d versions to ingest, %d moved to lost+found, %d cut to their acknowledged "
                 "size, %d new files never closed", len(recovered.live), len(recovered.lost),
                 len(recovered.truncated), len(recovered.unnamed))
        ingester = stack.enter_context(Ingester(store, workers=opts.ingest_workers))
        ops = WritableOperations(Namespace(store), source, opts.workers, pins, ingester, opts.staging_limit,
                                 recovered.live)
        _run(ops, opts, ready)


def _run(ops: Operations, opts: MountOptions, ready: Callable[[str], None]) -> None:
    fuse_opts = {"fsname=zipfs", "subtype=zipfs", "default_permissions"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    try:
        pyfuse3.init(ops, str(opts.mountpoint), fuse_opts)
    except RuntimeError as e:
        raise ZipfsError(f"cannot mount {opts.mountpoint}: {e}") from None
    log.info("mounted %s on %s (cache %d MiB, %d workers)", opts.store, opts.mountpoint,
             opts.cache_size >> 20, opts.workers)
    ready("ok")
    sd_notify("READY=1")
    try:
        trio.run(_serve, ops, opts)
    except KeyboardInterrupt:
        pass
    finally:
        sd_notify("STOPPING=1")
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", opts.mountpoint)


def mount(opts: MountOptions) -> int:
    """Mount in the foreground, or fork a daemon and return once its mount is live."""
    check_mountpoint(opts.mountpoint, opts.nonempty, opts.store)
    if opts.foreground:
        serve(opts)
        return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid:  # parent: wait for the child's word
        os.close(w)
        with os.fdopen(r) as f:
            msg = f.read().strip()
        if msg == "ok":
            return 0
        raise ZipfsError(msg or "the mount process exited before mounting (see --log-file)")
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def ready(msg: str) -> None:
        os.write(w, msg.encode() + b"\n")
        os.close(w)

    code = 0
    try:
        serve(opts, ready)
    except BaseException:  # noqa: BLE001 - the daemon's last word goes to its log
        log.exception("mount process failed")
        code = 1
    os._exit(code)
