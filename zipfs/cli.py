"""The `zipfs` command line. Errors are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from tqdm import tqdm

from zipfs.codec.chunk import DEFAULT_LEVEL
from zipfs.errors import ZipfsError
from zipfs.ingest.ingester import FileReport, Ingester
from zipfs.read import export as export_mod
from zipfs.read.reader import Reader
from zipfs.remote.commands import add_parsers as add_remote_parsers
from zipfs.remote.commands import push_line
from zipfs.store import hub, names
from zipfs.store import stats as stats_mod
from zipfs.store.lmdb_store import Store, default_store_path


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _open(args: argparse.Namespace, create: bool = False) -> Store:
    """The store, with its remote attached when it has one (payloads it lacks come from there)."""
    from zipfs.remote.attach import open_remote

    store = Store(args.store or default_store_path(), create=create)
    try:
        open_remote(store)
    except BaseException:
        store.close()
        raise
    return store


def _progress_bar(total: int) -> tqdm | None:
    """A byte progress bar on a terminal; None when stderr is not one."""
    if not sys.stderr.isatty():
        return None

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _file_line(r: FileReport) -> str:
    msg = (f"{r.name}: {human(r.size)} -> {human(r.new_bytes)} new "
           f"({r.new_bytes / max(r.size, 1):.3f}), {r.kind}, {r.reused_chunks}/{r.chunks} chunks reused, "
           f"{r.delta_chunks} deltas, {r.size / max(r.seconds, 1e-9) / 1e6:.0f} MB/s")
    return msg + (f"\n  note: {r.note}" if r.note else "")


def cmd_ingest(args: argparse.Namespace) -> int:
    from zipfs.ingest.hubcache import units
    from zipfs.ingest.model import ingest_entries, ingest_model, plan_sources

    if args.name and len(args.paths) > 1:
        raise ZipfsError("--name takes one PATH")
    todo = [u for p in args.paths for u in units(Path(p), args.name)]
    total = sum(s.st.st_size for u in todo for s in plan_sources(u.path, u.name, follow=u.is_model)[1]
                if s.kind == "file")
    bar = _progress_bar(total)
    say = bar.write if bar else print
    with _open(args, create=True) as store, store.ingest_lock(), Ingester(
        store, workers=args.workers, level=args.level, progress=bar.update if bar else None
    ) as ing:
        if store.remote is not None:  # the bucket's models, as bases for these
            from zipfs.remote.config import RemoteError
            from zipfs.remote.pull import sync

            try:
                sync(store, store.remote)
            except RemoteError as e:
                say(f"note: cannot look at the bucket, so its models are not candidate bases: {e}")

        def on_file(r: FileReport) -> None:
            say(_file_line(r))

        def note(n: str) -> None:
            say(f"note: {n}")

        for u in todo:
            if not u.is_model:
                ingest_entries(ing, u.path, u.name, on_file=on_file, note=note)
                continue
            m = ingest_model(ing, u.path, u.name, base=args.base, no_delta=args.no_delta,
                             log=say if args.verbose else lambda _: None, on_file=on_file, note=note)
            base = hub.display(m.base.name) if m.base.name else "(none)"
            say(f"{hub.display(m.name)}: {human(m.size)} stored in {human(m.new_bytes)} new bytes "
                f"({m.new_bytes / max(m.size, 1):.3f}); base: {base} ({m.base.reason})")
            if store.remote is not None:
                push_line(store, m.name, say, ingested=True)
    if bar:
        bar.close()
    return 0


def _located(store: Store, paths: list[str]) -> list[str]:
    """Each path as stored: hub ids ('org/name/...') name their repo folders, as `ls` shows them;
    a path that is in the store as typed, or nowhere, is left as it is (the command says)."""
    from zipfs.store import models

    out = []
    with store.read() as txn:
        for p in paths:
            try:
                out.append(models.locate(store, txn, names.normalize(p)))
            except ZipfsError:
                out.append(p)
    return out


def cmd_ls(args: argparse.Namespace) -> int:
    from zipfs.store import inodes, journal

    store = _open(args)
    damaged: list[str] = []
    with store, store.read() as txn:
        rows = []
        staged = journal.records(store, txn)
        top = _located(store, [args.path])[0]
        for path, node in inodes.walk(store, txn, top, on_damage=lambda p, e: damaged.append(f"{p}: {e}")):
            mode = stat.filemode(node.mode)
            if node.is_dir:
                shown = hub.display(path)
                rows.append((path + "/", "", "", mode if shown == path else f"{mode} hub repo {shown}"))
            elif node.is_link:
                rows.append((f"{path} -> {os.fsdecode(node.target)}", "", "", mode))
            elif not node.is_reg:
                rows.append((path, "", "", mode))
            elif node.content == inodes.STAGED:
                size = staged[node.content_id].size if node.content_id in staged else node.size
                rows.append((path, human(size), "", f"{mode} staged (not yet ingested)"))
            elif node.content == inodes.NONE:
                rows.append((path, human(0), human(0), f"{mode} empty"))
            else:
                try:
                    rec = store.file(txn, node.content_id)
                except ZipfsError as e:
                    damaged.append(f"{path}: {e}")
                    continue
                rows.append((path, human(rec.size), human(rec.new_bytes), f"{mode} {rec.kind}"))
    width = max((len(r[0]) for r in rows), default=0)
    for path, size, stored, kind in rows:
        print(f"{path:<{width}}  {size:>10}  {stored:>10}  {kind}".rstrip())
    for d in damaged:
        print(f"zipfs: damaged: {d}", file=sys.stderr)
    return 1 if damaged else 0


def cmd_cat(args: argparse.Namespace) -> int:
    if args.offset < 0 or (args.length is not None and args.length < 0):
        raise ZipfsError("--offset and --length must not be negative")
    with _open(args) as store:
        reader = Reader(store)
        try:
            layout = reader.layout(_located(store, [args.path])[0])
            end = layout.size if args.length is None else min(layout.size, args.offset + args.length)
            out = sys.stdout.buffer
            for off in range(args.offset, end, 8 << 20):
                out.write(reader.read(layout, off, min(8 << 20, end - off)))
        except ZipfsError as e:
            name = names.normalize(args.path)
            raise ZipfsError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
        out.flush()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _open(args) as store:
        res = export_mod.export(Reader(store), _located(store, [args.name])[0], Path(args.dir),
                                on_entry=print)
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    for p in res.problems:
        print(f"zipfs: {p}", file=sys.stderr)
    return 1 if res.problems else 0


def cmd_verify(args: argparse.Namespace) -> int:
    bad = good = 0
    with _open(args) as store:
        for r in export_mod.verify(Reader(store), _located(store, args.names)):
            if r.ok:
                good += 1
                if args.verbose:
                    print(f"ok      {r.name}")
            else:
                bad += 1
                print(f"FAILED  {r.name}: {r.message}")
    print(f"{good} ok, {bad} failed")
    return 1 if bad else 0


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise ZipfsError(f"invalid size {text!r} (use e.g. 512M or 2G)") from None


def cmd_mount(args: argparse.Namespace) -> int:
    from zipfs.fs.mount import MountOptions, mount

    opts = MountOptions(
        store=Path(args.store or default_store_path()), mountpoint=Path(args.mountpoint),
        foreground=args.foreground, cache_size=parse_size(args.cache_size),
        workers=args.workers or os.cpu_count() or 1, allow_other=args.allow_other,
        log_level=args.log_level, log_file=args.log_file, readahead_kb=args.readahead_kb,
        staging_limit=parse_size(args.staging_limit),
        ingest_workers=args.ingest_workers or MountOptions.ingest_workers, read_only=args.read_only,
        nonempty=args.nonempty)
    return mount(opts)


def cmd_umount(args: argparse.Namespace) -> int:
    import subprocess

    cmd = ["fusermount3", "-u", *(["-z"] if args.lazy else []), args.mountpoint]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise ZipfsError(r.stderr.strip() or f"fusermount3 failed with status {r.returncode}")
    return 0


def mount_stats(mountpoint: str) -> dict:
    try:
        return json.loads(os.getxattr(mountpoint, "user.zipfs.stats"))
    except OSError as e:
        raise ZipfsError(f"{mountpoint}: not a zipfs mount ({e.strerror})") from None


def cmd_sync(args: argparse.Namespace) -> int:
    """Report the mount's ingest backlog; with --wait, wait until it is drained."""
    import time

    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        m = mount_stats(args.mountpoint)
        backlog = m.get("queued", 0) + m.get("ingesting", 0)
        if not args.wait or backlog == 0:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise ZipfsError(f"timed out with {backlog} files still to ingest")
        time.sleep(0.2)
    print(f"{backlog} files to ingest, {m.get('open_for_write', 0)} open for writing, "
          f"{m.get('failed', 0)} failed, {human(m.get('staged_bytes', 0))} staged; "
          f"{m.get('ingested_files', 0)} ingested since mount")
    if m.get("failed"):
        print("zipfs: some staged files failed to ingest: they stay staged and readable; "
              "see the mount's log", file=sys.stderr)
        return 1
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    if args.mount:
        m = mount_stats(args.mount)
        if args.json:
            print(json.dumps(m, indent=2))
        else:
            for k, v in m.items():
                print(f"{k:<18} {v}")
        return 0
    with _open(args) as store:
        s = stats_mod.compute(store)
    if args.json:
        print(json.dumps(s.as_dict(), indent=2))
        return 0
    print(f"files          {s.files}")
    print(f"logical        {human(s.logical_bytes)} ({s.logical_bytes} bytes)")
    print(f"stored         {human(s.stored_bytes)} ({s.stored_bytes} bytes), ratio {s.ratio:.4f}")
    print(f"on disk        {human(s.disk_bytes)} (LMDB file)")
    print(f"garbage        {human(s.garbage_bytes)} (unreferenced; freed by gc)")
    print(f"staged         {s.staged_files} files, {human(s.staged_bytes)} written through a mount, "
          "not yet ingested")
    print(f"orphans        {s.orphans} removed or replaced file versions (open somewhere, or until gc)")
    print(f"chunks         {s.chunks}, {s.reused_chunks} dedup hits at ingest")
    for kind, d in s.by_kind.items():
        print(f"  {kind:<12} {d['chunks']:>8} chunks  {human(d['raw_bytes']):>10} -> "
              f"{human(d['stored_bytes']):>10}")
    if s.models:
        print(f"models (as ingested)\n  {'model':<36} {'base':<28} {'size':>10} {'added':>10} ratio")
        for m in sorted(s.models.values(), key=lambda m: m["display_name"]):
            size, new = m["size"] or 0, m["new_bytes"] or 0
            base = s.models[m["base"]]["display_name"] if m["base"] in s.models else m["base"] or "-"
            print(f"  {m['display_name']:<36} {base:<28} {human(size):>10} {human(new):>10} "
                  f"{new / max(size, 1):.3f}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from zipfs.store.lifecycle import remove

    with _open(args) as store:
        targets = _located(store, args.names)
        r = remove(store, targets)
        if store.remote is not None:
            from zipfs.remote.commands import publish_removals

            publish_removals(store, targets, print)
    print(f"removed {r.files} files, {r.dirs} directories ({human(r.logical_bytes)})"
          + (f"; models: {', '.join(r.models)}" if r.models else ""))
    for base, deps in r.still_needed.items():
        print(f"note: {base} is the base of {', '.join(deps)}: the chunks they need stay stored "
              f"until they are removed too")
    print("run 'zipfs gc' to free unreferenced chunks")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from zipfs.store.lifecycle import gc

    if args.remote:
        from zipfs.remote.commands import gc_remote_command

        return gc_remote_command(args)
    with _open(args) as store:
        r = gc(store)
    print(f"freed {r.files} removed file versions and {r.chunks} chunks, {human(r.bytes)} "
          "(run 'zipfs compact' to shrink the file)"
          + (f"; {r.pinned} removed files are still open and kept" if r.pinned else ""))
    for d in r.damaged:
        print(f"zipfs: damaged: {d}", file=sys.stderr)
    return 1 if r.damaged else 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from zipfs.store.fsck import fsck

    if args.remote:
        from zipfs.remote.commands import fsck_remote_command

        return fsck_remote_command(args)
    with _open(args) as store:
        r = fsck(store, scrub=args.scrub, repair=args.repair)
    for p in r.problems:
        print(f"PROBLEM  {p}")
    for p in r.repaired:
        print(f"repaired {p}")
    print(f"{r.inodes} inodes, {r.files} file versions, {r.chunks} chunks ({r.garbage} unreferenced), "
          f"{r.scrubbed} scrubbed, {len(r.problems)} problems")
    return 0 if r.clean or (args.repair and r.repaired) else 1


def cmd_compact(args: argparse.Namespace) -> int:
    from zipfs.store.compact import compact

    r = compact(Path(args.store or default_store_path()))
    print(f"store file {human(r.before)} -> {human(r.after)}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    from zipfs.store.usage import usage

    with _open(args) as store:
        rows = usage(store)
    if args.json:
        print(json.dumps([vars(u) for u in rows], indent=2))
        return 0
    print(f"{'model':<40} {'files':>5} {'logical':>10} {'stored':>10} {'rm frees':>10}")
    for u in rows:
        print(f"{u.display_name:<40} {u.files:>5} {human(u.logical):>10} {human(u.shared_stored):>10} "
              f"{human(u.freed_by_rm):>10}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"zipfs: error: {message} (see '{self.prog} --help')\n")


def _whole(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from lo to hi, or a one-line usage error naming what."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = lo - 1
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return n
    return parse


_count = _whole(1, 4096, "a number of threads (1 to 4096)")
_level = _whole(1, 22, "a zstd level (1 to 22)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zipfs", description=__doc__)
    p.add_argument("--store", help="store directory (default $ZIPFS_STORE or ~/.local/share/zipfs)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("ingest", cmd_ingest, "store files or model directories")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--name", help="name in the store (default: the basename of PATH)")
    sp.add_argument("--workers", type=_count, default=None, help="encoding threads (default: cores)")
    sp.add_argument("--level", type=_level, default=DEFAULT_LEVEL,
                    help=f"zstd level (default {DEFAULT_LEVEL}, as the mount)")
    sp.add_argument("--base", help="store deltas against this stored model (skip detection)")
    sp.add_argument("--no-delta", action="store_true", help="store standalone, no base model")
    sp.add_argument("-v", "--verbose", action="store_true", help="show base candidates and scores")

    sp = add("ls", cmd_ls, "list names with logical and stored size")
    sp.add_argument("path", nargs="?", default="")

    sp = add("cat", cmd_cat, "write a stored file (or a byte range of it) to stdout")
    sp.add_argument("path")
    sp.add_argument("--offset", type=int, default=0)
    sp.add_argument("--length", type=int, default=None)

    sp = add("export", cmd_export, "write stored files under NAME to DIR, byte-exact")
    sp.add_argument("name")
    sp.add_argument("dir")

    sp = add("verify", cmd_verify, "re-hash stored files against their recorded sha256")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("-v", "--verbose", action="store_true")

    sp = add("stats", cmd_stats, "logical and stored bytes, dedup and codec breakdown")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--mount", metavar="MNT", help="live statistics of a mounted store instead")

    sp = add("rm", cmd_rm, "remove files, directories or models (chunks are freed by gc)")
    sp.add_argument("names", nargs="+", metavar="NAME")

    sp = add("gc", cmd_gc, "free chunks nothing references (safe while mounted or ingesting)")
    sp.add_argument("--remote", action="store_true",
                    help="collect the bucket instead: what no machine's newest manifest reads")
    sp.add_argument("--grace", type=float, default=3600.0,
                    help="with --remote: seconds an object must be old to go (default 3600)")
    sp.add_argument("--force", action="store_true",
                    help="with --remote: take a grace period under 600 s (no other machine writes now)")

    sp = add("fsck", cmd_fsck, "check reference counts and records; --scrub decodes every chunk")
    sp.add_argument("--scrub", action="store_true", help="decode every chunk and check its checksum")
    sp.add_argument("--repair", action="store_true", help="fix reference counts and orphans")
    sp.add_argument("--remote", action="store_true", help="check the bucket's manifests and packs instead")

    add("compact", cmd_compact, "shrink the store file to its live data (not while mounted)")

    sp = add("du", cmd_du, "per model: logical size, stored size (sharing split), what rm would free")
    sp.add_argument("--json", action="store_true")

    sp = add("mount", cmd_mount, "serve the store as plain files at MOUNTPOINT (FUSE)")
    sp.add_argument("mountpoint")
    sp.add_argument("-f", "--foreground", action="store_true", help="do not go to the background")
    sp.add_argument("--cache-size", default="1G", help="decoded-chunk cache, e.g. 512M (default 1G)")
    sp.add_argument("--workers", type=_count, default=None, help="decode threads (default: cores)")
    sp.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    sp.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sp.add_argument("--log-file", help="log here (a background mount logs nowhere otherwise)")
    sp.add_argument("--readahead-kb", type=int, default=1024 if os.geteuid() == 0 else None,
                    help="set the mount's bdi read_ahead_kb, as root (default 1024: 1 MiB reads)")
    sp.add_argument("--staging-limit", default="16G",
                    help="staged bytes above which writes wait for background ingest (default 16G)")
    sp.add_argument("--read-only", action="store_true",
                    help="refuse writes (also what a second mount of a store gets)")
    sp.add_argument("--ingest-workers", type=_count, default=None,
                    help="encoding threads of background ingest (default: half the cores)")
    sp.add_argument("--nonempty", action="store_true",
                    help="mount over a directory that has entries (hidden while mounted)")

    sp = add("sync", cmd_sync, "show a mount's ingest backlog; --wait until it is drained")
    sp.add_argument("mountpoint")
    sp.add_argument("--wait", action="store_true", help="wait until every closed file is ingested")
    sp.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")

    add_remote_parsers(add)

    sp = add("umount", cmd_umount, "unmount a zipfs mount")
    sp.add_argument("mountpoint")
    sp.add_argument("-z", "--lazy", action="store_true", help="detach now, clean up when not busy")
    return p


def fstab_argv(argv: list[str]) -> list[str]:
    """mount.fuse3 runs `zipfs STORE MOUNTPOINT -o opts` (fstab: `zipfs#STORE MNT fuse ...` or
    type fuse.zipfs): turn that into a mount command line; other argv pass through."""
    pos = [a for a in argv if not a.startswith("-")]
    if len(pos) < 2 or argv[0] in COMMANDS or argv[0].startswith("-") or "-o" not in argv:
        return argv
    opts = argv[argv.index("-o") + 1].split(",") if argv.index("-o") + 1 < len(argv) else []
    out = ["--store", pos[0], "mount", pos[1]]
    keyed = {"cache_size": "--cache-size", "workers": "--workers", "log_file": "--log-file",
             "log_level": "--log-level", "readahead_kb": "--readahead-kb",
             "staging_limit": "--staging-limit", "ingest_workers": "--ingest-workers"}
    for o in opts:
        key, _, value = o.partition("=")
        if key in keyed and value:
            out += [keyed[key], value]
        elif key == "allow_other":
            out.append("--allow-other")
        elif key == "foreground":
            out.append("--foreground")
        elif key == "ro":
            out.append("--read-only")
        elif key == "nonempty":
            out.append("--nonempty")
    return out


COMMANDS = {"ingest", "ls", "cat", "export", "verify", "stats", "rm", "gc", "fsck", "compact", "du",
            "mount", "umount", "sync", "remote", "push", "pull"}


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # names are bytes: print undecodable ones as they are
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    argv = fstab_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ZipfsError as e:
        print(f"zipfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("zipfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"zipfs: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, the traceback with ZIPFS_DEBUG=1
        if os.environ.get("ZIPFS_DEBUG"):
            raise
        print(f"zipfs: internal error: {type(e).__name__}: {e} (ZIPFS_DEBUG=1 shows where)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
