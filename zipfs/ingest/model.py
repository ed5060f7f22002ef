"""Ingest a model (a directory or a single file) as one unit: choose its base, store every file,
record the model and its base (so a base others depend on is known).

What is stored is what is there: regular files as file versions, directories (empty ones too)
and symbolic links as themselves, each with its mode, owner and times. A link is never followed,
so nothing outside the source tree is read (a link pointing out of it is stored as a link, with a
note). FIFOs, sockets and devices are skipped with a note; nothing is ever waited on.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from zipfs.errors import ZipfsError
from zipfs.ingest.base import BaseChoice, choose_base
from zipfs.ingest.ingester import BaseLookup, Commit, FileReport, Ingester
from zipfs.store import inodes, journal, models, names
from zipfs.store.lmdb_store import Store
from zipfs.store.records import FileRecord

_SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device"}


@dataclass
class Source:
    """One thing to store: where it is, its name in the store, and its lstat."""

    path: Path
    dest: str
    st: os.stat_result

    @property
    def kind(self) -> str:
        return "dir" if stat.S_ISDIR(self.st.st_mode) else "link" if stat.S_ISLNK(self.st.st_mode) else "file"


@dataclass
class ModelReport:
    name: str
    base: BaseChoice
    files: list[FileReport] = field(default_factory=list)
    links: int = 0
    dirs: int = 0

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def new_bytes(self) -> int:
        return sum(f.new_bytes for f in self.files)


def _scan(src: Path, model: str, note: Callable[[str], None]) -> list[Source]:
    """What is under directory src, links not followed, in a stable order."""
    out: list[Source] = []

    def fail(e: OSError) -> None:
        raise ZipfsError(f"cannot read {e.filename}: {e.strerror}")

    for root, dirs, files in os.walk(src, followlinks=False, onerror=fail):
        dirs.sort()
        here = Path(root)
        for name in sorted(files) + [d for d in dirs if (here / d).is_symlink()]:
            p = here / name
            st = p.lstat()
            dest = f"{model}/{p.relative_to(src).as_posix()}"
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out.append(Source(p, dest, st))
                if stat.S_ISLNK(st.st_mode) and not _inside(src, p):
                    note(f"{dest}: stored as a symbolic link to {os.readlink(p)} "
                         f"(outside {src}; not followed)")
            else:
                note(f"skipped {p}: {_SPECIAL.get(stat.S_IFMT(st.st_mode), 'not a regular file')}")
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
        out += [Source(here / d, f"{model}/{(here / d).relative_to(src).as_posix()}", (here / d).lstat())
                for d in dirs]
    return sorted(out, key=lambda s: (s.kind != "dir", s.dest))


def _inside(root: Path, link: Path) -> bool:
    target = os.path.normpath(os.path.join(link.parent, os.readlink(link)))
    return os.path.commonpath([os.path.abspath(root), os.path.abspath(target)]) == os.path.abspath(root)


def plan_sources(src: Path, name: str | None, note: Callable[[str], None] = lambda _: None,
                 follow: bool = True) -> tuple[str, list[Source]]:
    """The model name and each thing to store from src (a file, or a directory's tree).

    The path the user named is followed; nothing under it is. With follow False (src is an entry
    of a tree being stored, not a path the user named) a link is stored as a link and a FIFO,
    socket or device skipped with a note, as under a directory.
    """
    try:
        top = src.stat() if follow else src.lstat()
    except OSError as e:
        raise ZipfsError(f"{src}: {e.strerror.lower() if e.strerror else e}") from None
    model = names.normalize(name or src.resolve().name)
    if not model:
        raise ZipfsError("the store root cannot be a model name; pass --name")
    if stat.S_ISLNK(top.st_mode):
        return model, [Source(src, model, top)]
    if stat.S_ISREG(top.st_mode):
        return model, [Source(src.resolve(), model, top)]
    if not stat.S_ISDIR(top.st_mode):
        kind = _SPECIAL.get(stat.S_IFMT(top.st_mode), "not a regular file")
        if follow:
            raise ZipfsError(f"{src}: {kind}; nothing to ingest")
        note(f"skipped {src}: {kind}")
        return model, []
    return model, [Source(src, model, top)] + _scan(src, model, note)


def place(store: Store, src: Source) -> Commit:
    """Commit hook: the file version becomes a new inode at src.dest with src's mode, owner, times."""
    st = src.st

    def commit(txn: lmdb.Transaction, fid: int, frec: FileRecord, rel: inodes.Released) -> None:
        node = inodes.replace(store, txn, src.dest, stat.S_IFREG | stat.S_IMODE(st.st_mode), st.st_uid,
                              st.st_gid, time.time_ns(), rel)
        node.atime_ns, node.mtime_ns = st.st_atime_ns, st.st_mtime_ns
        inodes.set_content(store, txn, node, inodes.STORED, fid, frec.size, rel)

    return commit


def ingest_one(ing: Ingester, src: Path, dest: str, base_lookup: BaseLookup | None = None) -> FileReport:
    """Store one regular file at dest (replacing what is there), with its mode, owner and times."""
    s = Source(src.resolve(), names.normalize(dest), src.stat())
    return ing.ingest_file(s.path, s.dest, place(ing.store, s), base_lookup=base_lookup, expect=s.st)


def _put_entry(ing: Ingester, s: Source) -> None:
    """Store a directory (its mode, owner, times) or a symbolic link at s.dest."""
    store, st = ing.store, s.st
    rel = inodes.Released()

    def op(txn: lmdb.Transaction) -> None:
        now = time.time_ns()
        if s.kind == "dir":
            node = inodes.make_dirs(store, txn, names.split(s.dest), st.st_uid, st.st_gid, now,
                                    stat.S_IMODE(st.st_mode))
            node.mode = stat.S_IFDIR | stat.S_IMODE(st.st_mode)
            node.uid, node.gid = st.st_uid, st.st_gid
        else:
            node = inodes.replace(store, txn, s.dest, stat.S_IFLNK | 0o777, st.st_uid, st.st_gid, now, rel,
                                  target=os.fsencode(os.readlink(s.path)))
        node.atime_ns, node.mtime_ns = st.st_atime_ns, st.st_mtime_ns
        inodes.put(store, txn, node)

    store.writer.call(op)
    journal.purge(store, rel.dead)


def _store_all(ing: Ingester, sources: list[Source], report: ModelReport,
               on_file: Callable[[FileReport], None]) -> ModelReport:
    """Store every source, files coded against report.base; each commits on its own."""
    lookup = report.base.lookup if report.base.name else None
    for s in sources:
        if s.kind == "file":
            r = ing.ingest_file(s.path, s.dest, place(ing.store, s), base_lookup=lookup, expect=s.st)
            report.files.append(r)
            on_file(r)
            continue
        _put_entry(ing, s)
        report.links += s.kind == "link"
        report.dirs += s.kind == "dir"
    return report


def ingest_entries(ing: Ingester, src: Path, name: str,
                   on_file: Callable[[FileReport], None] = lambda _: None,
                   note: Callable[[str], None] = lambda _: None) -> ModelReport:
    """Store src at name as it is, with no base and no model record: what sits beside the models
    (the lock files and shared blobs of a hub cache)."""
    dest, sources = plan_sources(src, name, note, follow=False)
    return _store_all(ing, sources, ModelReport(dest, BaseChoice(None, "not a model")), on_file)


def ingest_model(ing: Ingester, src: Path, name: str | None = None, base: str | None = None,
                 no_delta: bool = False, log: Callable[[str], None] = lambda _: None,
                 on_file: Callable[[FileReport], None] = lambda _: None,
                 note: Callable[[str], None] = lambda _: None) -> ModelReport:
    """Ingest src under `name`; each file commits on its own, the model record last."""
    model, sources = plan_sources(src, name, note)
    files = [(s.path, s.dest) for s in sources if s.kind == "file"]
    choice = choose_base(ing.store, model, files, src if src.is_dir() else None, forced=base,
                         disabled=no_delta, chunk_size=ing.chunk_size, log=log)
    log(f"{model}: base {choice.name or '(none)'}: {choice.reason}")
    report = _store_all(ing, sources, ModelReport(model, choice), on_file)
    store = ing.store

    def op(txn: lmdb.Transaction) -> None:
        node = inodes.resolve(store, txn, model)
        base_ino = inodes.resolve(store, txn, choice.name).ino if choice.name else 0
        models.put(store, txn, models.Model(node.ino, base_ino, choice.reason, choice.ratio, time.time(),
                                            report.size, report.new_bytes,
                                            sum(f.delta_chunks for f in report.files)))

    store.writer.call(op)
    return report
