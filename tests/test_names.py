"""A name fuzz through the mount: whatever Linux accepts as a name works and round-trips.

Random trees with components of 1..255 bytes (unicode, newlines, tabs, quotes, backslashes, globs,
leading dashes and dots, bytes that are not UTF-8) and paths up to PATH_MAX are created through a
writable mount; names over 255 bytes must fail with ENAMETOOLONG and nothing else may fail. The
mount must never die, and every accepted name must come back byte for byte from `zipfs ls`,
`zipfs export` and a fresh mount.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess

import pytest

from zipfs.fs.process import mounted, zipfs_cmd

SEED = int(os.environ.get("ZIPFS_NAME_SEED", "20261201"))
ENTRIES = int(os.environ.get("ZIPFS_NAME_ENTRIES", "300"))
PATH_MAX = 4096
ALPHABET = ["a", "Z", "0", "-", "_", " ", ".", "\n", "\t", "'", '"', "\\", "*", "?", "[", "é", "ß", "中",
            "𝔘", "🙂", "\u200b", ":", "=", "%", "~"]


def component(rng: random.Random, limit: int) -> bytes:
    """A random name of at most limit bytes (never '.' or '..', never '/' or NUL)."""
    while True:
        want = rng.choice([1, 2, 8, 40, 120, 254, 255, rng.randint(1, 255)])
        out = bytearray()
        while len(out) < min(want, limit):
            if rng.random() < 0.08:
                piece = bytes([rng.choice([0x80, 0xC3, 0xFF, 0xFE, 0x01, 0x7F])])  # not UTF-8 at all
            else:
                piece = rng.choice(ALPHABET).encode()
            if len(out) + len(piece) > min(want, limit):
                break
            out += piece
        if bytes(out) not in (b"", b".", b".."):
            return bytes(out)


def content(path: bytes) -> bytes:
    return hashlib.sha256(path).digest() * 3


def walk(root: bytes) -> dict[bytes, bytes | None]:
    """Relative path -> file bytes (None for a directory) of everything under root."""
    out: dict[bytes, bytes | None] = {}
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        for d in dirs:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            with open(os.path.join(top, f), "rb") as fh:
                out[os.path.normpath(os.path.join(rel, f))] = fh.read()
    return out


def test_random_names_round_trip_through_the_mount_ls_export_and_remount(tmp_path):
    rng = random.Random(SEED)
    store, m = tmp_path / "store", tmp_path / "m"
    made: dict[bytes, bytes | None] = {}
    with mounted(store, m, log=tmp_path / "mount.log") as proc:
        root = os.fsencode(m)
        for _ in range(ENTRIES):
            parts: list[bytes] = []
            budget = PATH_MAX - len(root) - 2 - 300  # room for the file name
            for _ in range(rng.randint(1, 14)):
                if budget < 2:
                    break
                c = component(rng, min(255, budget - 1))
                parts.append(c)
                budget -= len(c) + 1
            d = os.path.join(root, *parts)
            os.makedirs(d, exist_ok=True)
            for i in range(1, len(parts) + 1):
                made[os.path.join(*parts[:i])] = None
            name = component(rng, 255)
            path = os.path.join(d, name)
            if len(path) >= PATH_MAX:
                continue
            with open(path, "wb") as f:
                f.write(content(path[len(root) + 1:]))
            made[path[len(root) + 1:]] = content(path[len(root) + 1:])
            if rng.random() < 0.1:
                with pytest.raises(OSError) as e:
                    os.mkdir(os.path.join(d, b"x" * 256))
                assert e.value.errno == errno.ENAMETOOLONG
        assert walk(root) == made
        assert proc.poll() is None
        r = subprocess.run(zipfs_cmd(store, "sync", "--wait", "--timeout", "120", str(m)),
                           capture_output=True)
        assert r.returncode == 0, r.stderr
    ls = subprocess.run(zipfs_cmd(store, "ls"), capture_output=True)
    assert ls.returncode == 0, ls.stderr
    for p in made:
        assert p in ls.stdout, p
    out = tmp_path / "out"
    r = subprocess.run(zipfs_cmd(store, "export", "", str(out)), capture_output=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert walk(os.fsencode(out)) == made
    with mounted(store, m):
        assert walk(os.fsencode(m)) == made
    assert subprocess.run(zipfs_cmd(store, "fsck"), capture_output=True).returncode == 0


def test_names_no_directory_entry_may_hold_are_refused_with_the_right_errno(tmp_path):
    m = tmp_path / "m"
    with mounted(tmp_path / "store", m) as proc:
        for bad, code in ((b"n" * 256, errno.ENAMETOOLONG), (b"n" * 1000, errno.ENAMETOOLONG)):
            for op in (lambda p: os.mkdir(p), lambda p: open(p, "wb").close(), lambda p: os.symlink(b"t", p)):
                with pytest.raises(OSError) as e:
                    op(os.path.join(os.fsencode(m), bad))
                assert e.value.errno == code
        long_target = b"t" * 4095
        os.symlink(long_target, os.path.join(os.fsencode(m), b"l"))
        assert os.readlink(os.path.join(os.fsencode(m), b"l")) == long_target
        assert proc.poll() is None
