"""Whole-file operations on top of the reader: verify against sha256, export to a directory."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zipfs.errors import ZipfsError
from zipfs.read.reader import FileLayout, Reader, layout_of
from zipfs.store import inodes, names


@dataclass
class VerifyResult:
    name: str
    ok: bool
    message: str


def files_under(reader: Reader, prefix: str, on_damage: inodes.OnDamage) -> list[tuple[str, FileLayout, str]]:
    """(path, layout, recorded sha256) of every stored file under prefix ('' = whole store).
    Damaged entries and file records are reported to on_damage and left out."""
    store = reader.store
    out = []
    with store.read() as txn:
        for path, node in inodes.walk(store, txn, prefix, on_damage=on_damage):
            if not node.is_reg or node.content == inodes.STAGED:
                continue
            try:
                layout = layout_of(store, txn, node, path)
                sha = (store.file(txn, node.content_id).sha256 if node.content
                       else hashlib.sha256().hexdigest())
            except ZipfsError as e:
                on_damage(path, e)
                continue
            out.append((path, layout, sha))
    return out


def verify(reader: Reader, prefixes: list[str]) -> Iterator[VerifyResult]:
    """Re-hash each file from its stored chunks and compare with the sha256 recorded at ingest;
    a damaged entry is a failed result and the rest go on."""
    for prefix in prefixes or [""]:
        damaged: list[VerifyResult] = []

        def report(path: str, e: Exception, out: list[VerifyResult] = damaged) -> None:
            out.append(VerifyResult(path, False, str(e)))

        found = files_under(reader, prefix, report)
        yield from damaged
        for path, layout, sha in found:
            h = hashlib.sha256()
            try:
                for block in reader.iter_file(layout):
                    h.update(block)
            except ZipfsError as e:
                yield VerifyResult(path, False, str(e))
                continue
            if h.hexdigest() != sha:
                yield VerifyResult(path, False, f"sha256 {h.hexdigest()} != recorded {sha}")
            else:
                yield VerifyResult(path, True, sha)


@dataclass
class ExportResult:
    written: list[str] = field(default_factory=list)
    #: entries not exported, with why (a damaged record, a name no filesystem may hold, ...)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _tmp_name() -> bytes:
    return f".zipfs-tmp-{secrets.token_hex(8)}".encode()


def _set_attrs(fd: int, node: inodes.Inode) -> None:
    if os.geteuid() == 0:
        os.fchown(fd, node.uid, node.gid)
    os.fchmod(fd, stat.S_IMODE(node.mode))
    os.utime(fd, ns=(node.atime_ns, node.mtime_ns))


class _Exporter:
    """Writes entries below one directory descriptor, never following a symlink inside DIR:
    every directory is opened relative to its parent with O_NOFOLLOW, every file is written
    under a fresh temporary name and renamed into place (which replaces a link, not its target)."""

    def __init__(self, reader: Reader, dest: Path, res: ExportResult) -> None:
        self.reader, self.res = reader, res
        dest.mkdir(parents=True, exist_ok=True)
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        #: the directories being filled, outermost first: (inode, descriptor, its record)
        self.stack: list[tuple[int, int, inodes.Inode | None]] = []

    def enter(self, parent: int) -> int:
        """The descriptor of directory inode parent, closing the ones the walk has left (a
        directory gets its mode and times once everything in it is written)."""
        while len(self.stack) > 1 and self.stack[-1][0] != parent:
            _, fd, node = self.stack.pop()
            try:
                _set_attrs(fd, node)
            except OSError as e:
                self.res.problems.append(f"cannot set the mode of a directory: {e.strerror}")
            os.close(fd)
        if self.stack[-1][0] != parent:
            raise ZipfsError("its directory was not exported")
        return self.stack[-1][1]

    def subdir(self, parent: int, name: bytes, node: inodes.Inode) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        self.stack.append((node.ino, fd, node))

    def file(self, parent: int, name: bytes, path: str, node: inodes.Inode) -> None:
        with self.reader.store.read() as txn:
            layout = layout_of(self.reader.store, txn, node, path)
            sha = self.reader.store.file(txn, node.content_id).sha256 if node.content else \
                hashlib.sha256().hexdigest()
        tmp = _tmp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb", closefd=False) as f:
                for block in self.reader.iter_file(layout):
                    h.update(block)
                    f.write(block)
            if h.hexdigest() != sha:
                raise ZipfsError(f"{path}: rebuilt bytes do not match the recorded sha256")
            _set_attrs(fd, node)
            os.close(fd)
            fd = -1
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp, dir_fd=parent)
            raise

    def special(self, parent: int, name: bytes, path: str, node: inodes.Inode) -> None:
        tmp = _tmp_name()
        if node.is_link:
            os.symlink(node.target, tmp, dir_fd=parent)
            os.utime(tmp, ns=(node.atime_ns, node.mtime_ns), dir_fd=parent, follow_symlinks=False)
        else:
            try:
                os.mknod(tmp, node.mode, node.rdev, dir_fd=parent)
            except PermissionError:
                self.res.notes.append(f"{path}: a device node, not exported (only root may create one)")
                return
            os.chmod(tmp, stat.S_IMODE(node.mode), dir_fd=parent)
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)

    def close(self) -> None:
        self.enter(self.stack[0][0])
        os.close(self.root)


def export(reader: Reader, prefix: str, dest: Path,
           on_entry: Callable[[str], None] = lambda _: None) -> ExportResult:
    """Write what is under prefix (a file or a directory, paths relative to it) to dest, each file
    checked by sha256, with modes, times, links and empty directories. Names are checked with the
    rules ingest applies, and nothing is ever written outside dest."""
    prefix = names.normalize(prefix)
    store = reader.store
    res = ExportResult()
    with store.read() as txn:
        top = inodes.resolve(store, txn, prefix)
        entries = list(inodes.walk_entries(store, txn, prefix,
                                           on_damage=lambda p, e: res.problems.append(f"{p}: {e}")))
    ex = _Exporter(reader, dest, res)
    try:
        if not top.is_dir:  # one file: it lands in dest under its own name
            entries = [(prefix, 0, names.split(prefix)[-1], top)]
        ex.stack.append((top.ino if top.is_dir else 0, ex.root, None))
        for path, parent, name, node in entries:
            try:
                names.check_component(name)
                fd = ex.enter(parent)
                if node.is_dir:
                    ex.subdir(fd, name, node)
                elif node.is_reg and node.content != inodes.STAGED:
                    ex.file(fd, name, path, node)
                elif node.is_reg:
                    raise ZipfsError("still being ingested (staged); export it through the mount")
                else:
                    ex.special(fd, name, path, node)
            except (ZipfsError, OSError) as e:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                res.problems.append(f"{path!r}: not exported: {msg}")
                continue
            if not node.is_dir:
                res.written.append(str(dest / (path[len(prefix):].lstrip("/") or names.show(name))))
                on_entry(res.written[-1])
    finally:
        ex.close()
    return res
