"""Run a zipfs mount in a child process (tests, benchmarks, the demo); never leave a mount behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: the directory holding the zipfs package, so a child process imports this very copy
ROOT = Path(__file__).resolve().parents[2]


def zipfs_cmd(store: Path, *args: str) -> list[str]:
    """The command line of the zipfs CLI on this interpreter, against `store`."""
    return [sys.executable, "-m", "zipfs.cli", "--store", str(store), *args]


def is_mounted(mnt: Path) -> bool:
    """Whether something is mounted at mnt, a dead FUSE mount included (os.path.ismount says no
    to one: stat on it fails with ENOTCONN)."""
    target = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == target for line in f)


def unmount(mnt: Path) -> None:
    """Unmount, lazily if the mount is busy, so nothing is left mounted."""
    for flags in (["-u"], ["-uz"]):
        if not is_mounted(mnt):
            return
        subprocess.run(["fusermount3", *flags, str(mnt)], capture_output=True)
        time.sleep(0.2)


def wait_for(pred: Callable[[], bool], timeout: float, what: str,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll pred until true; fail early if the mount process died (with its log)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mount process exited ({proc.returncode}) before {what}: "
                                 f"{log.read_text() if log and log.exists() else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen, mnt: Path, timeout: float = 15) -> None:
    """Unmount mnt and reap its mount process (killed if it does not exit), leaving nothing
    mounted."""
    unmount(mnt)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    unmount(mnt)


@contextmanager
def mounted(store: Path, mnt: Path, *extra: str, log: Path | None = None,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A foreground mount process serving `store` at `mnt` for the duration of the block."""
    mnt.mkdir(parents=True, exist_ok=True)
    log = log or mnt.parent / f"{mnt.name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log, "ab") as err:  # stderr too: a pipe nobody reads would block the mount once full
        proc = subprocess.Popen(zipfs_cmd(store, "mount", str(mnt), "--foreground", "--log-file", str(log),
                                          *extra), env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: os.path.ismount(mnt), 30, "the mount", proc, log)
        yield proc
    finally:
        stop(proc, mnt)
