"""The remote's commands: `zipfs remote set|show`, `push`, `pull`, and the push after ingest."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from zipfs.errors import ZipfsError
from zipfs.remote import config
from zipfs.remote.attach import Remote
from zipfs.store.lmdb_store import Store, default_store_path

Say = Callable[[str], None]
#: the shortest grace period gc takes without --force: longer than a push takes to publish
SAFE_GRACE = 600.0


def _human(n: float) -> str:
    from zipfs.cli import human

    return human(n)


def need_remote(store: Store) -> Remote:
    if store.remote is None:
        raise ZipfsError(f"store {store.path} has no remote (set one with 'zipfs remote set s3://BUCKET')")
    return store.remote


def push_line(store: Store, name: str, say: Say, ingested: bool = False) -> None:
    """Push one model and say what it cost (after an ingest, or for `zipfs push`). A model just
    ingested is the store's own until its push lands: a sync meanwhile does not replace it."""
    from zipfs.remote import tables
    from zipfs.remote.config import RemoteError
    from zipfs.remote.push import push

    remote = need_remote(store)
    if ingested:
        store.writer.call(lambda txn: tables.forget_model_version(store, txn, name))
    try:
        r = push(store, remote, name)
    except RemoteError as e:
        if not ingested:
            raise
        raise ZipfsError(f"{name} is stored here, but its push failed ({e}); run 'zipfs push {name}' "
                         "when the bucket answers") from None
    say(f"{name}: pushed version {r.version}: {r.files} files, {r.uploaded_chunks}/{r.chunks} chunks "
        f"uploaded in {r.packs} packs ({_human(r.uploaded_bytes)}), {r.seconds:.1f} s")
    for n in r.notes:
        say(f"note: {n}")


def publish_removals(store: Store, targets: list[str], say: Say) -> None:
    """After `zipfs rm`: a removed model is removed in the bucket too (a version saying so); a
    model that lost some of its files is pushed again without them."""
    from zipfs.remote.push import push_removal
    from zipfs.store import names

    remote = need_remote(store)
    with store.read() as txn:
        shown = {k.decode("utf-8", "surrogateescape") for k, _ in store.scan(txn, "rmodels")}
    for t in (names.normalize(t) for t in targets):
        for name in sorted(shown):
            if name == t or name.startswith(t + "/"):
                say(f"{name}: removed from {remote.cfg.url} (version {push_removal(store, remote, name)})")
            elif t.startswith(name + "/"):
                push_line(store, name, say)


def cmd_remote(args: argparse.Namespace) -> int:
    from zipfs.cli import parse_size

    path = Path(args.store or default_store_path())
    if args.action == "show":
        cfg = config.load(path)
        if cfg is None:
            print("no remote")
            return 0
        print(f"{cfg.url}  endpoint {cfg.endpoint or '(AWS)'}  region {cfg.region or 'us-east-1'}  "
              f"cache {_human(cfg.cache_bytes)}  writer {cfg.writer}")
        return 0
    if not args.url:
        raise ZipfsError("zipfs remote set takes s3://BUCKET[/PREFIX]")
    with Store(path, create=True):  # the store exists (and is ours) before it gets a remote
        old = config.load(path)
        cfg = config.parse_url(args.url, args.endpoint or "", args.region or "",
                               parse_size(args.cache_size), old.writer if old else "")
        from zipfs.remote.client import Bucket

        next(iter(Bucket(cfg).list("models/")), None)  # reachable, with these credentials
        config.save(path, cfg)
    print(f"remote {cfg.url} set")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from zipfs.cli import _located, _open

    with _open(args) as store, store.ingest_lock():
        for name in _located(store, args.names):
            push_line(store, name, print)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from zipfs.cli import _open
    from zipfs.remote.pull import fetch_all, sync

    with _open(args, create=True) as store, store.ingest_lock():
        remote = need_remote(store)
        todo = args.names or [None]
        for name in todo:
            r = sync(store, remote, only=name)
            for n in r.imported:
                print(f"{n}: imported from {remote.cfg.url}")
            for n in r.skipped:
                print(f"{n}: kept the store's own copy (see the log)")
        if not args.metadata_only:
            for name in args.names:
                print(f"{name}: fetched {_human(fetch_all(store, remote, name))}")
    return 0


def gc_remote_command(args: argparse.Namespace) -> int:
    from zipfs.cli import _open
    from zipfs.remote.gc import gc_remote

    if args.grace < 0:
        raise ZipfsError("--grace is a number of seconds, 0 or more")
    if args.grace < SAFE_GRACE and not args.force:
        raise ZipfsError(f"a grace period under {SAFE_GRACE:.0f} s can delete what a push on another machine "
                         "is uploading now; give --force if no other machine writes to the bucket")
    with _open(args) as store:
        r = gc_remote(need_remote(store).bucket, grace=args.grace)
    print(f"bucket: deleted {r.versions} old manifest versions, {r.files} file manifests, {r.packs} packs "
          f"({_human(r.freed_bytes)}); condemned {r.condemned}, repacked {r.repacked}, "
          f"restored {r.restored}; "
          f"{r.young} objects younger than {args.grace:.0f} s kept")
    return 0


def fsck_remote_command(args: argparse.Namespace) -> int:
    from zipfs.cli import _open
    from zipfs.remote.gc import fsck_remote

    with _open(args) as store:
        r = fsck_remote(need_remote(store).bucket, scrub=args.scrub)
    for p in r.problems:
        print(f"PROBLEM  {p}")
    print(f"bucket: {r.models} models, {r.files} file manifests, {r.chunks} chunks, {r.packs} packs, "
          f"{r.scrubbed} scrubbed, {len(r.problems)} problems")
    return 1 if r.problems else 0


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("remote", cmd_remote, "give the store an S3-compatible remote (set URL), or show it")
    sp.add_argument("action", choices=["set", "show"])
    sp.add_argument("url", nargs="?", help="s3://BUCKET[/PREFIX]")
    sp.add_argument("--endpoint", help="S3 endpoint URL (default AWS); http:// only when given so")
    sp.add_argument("--region", help="region (default us-east-1)")
    sp.add_argument("--cache-size", default="10G", help="local cache of fetched payloads (default 10G)")

    sp = add("push", cmd_push, "upload models to the store's remote and publish them")
    sp.add_argument("names", nargs="+", metavar="NAME")

    sp = add("pull", cmd_pull, "show the remote's models here; NAME also fetches its payloads")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("--metadata-only", action="store_true", help="import the models, fetch nothing")
