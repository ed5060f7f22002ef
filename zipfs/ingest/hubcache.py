"""The Hugging Face hub cache as users have it (`~/.cache/huggingface/hub`): what to store, and
where its models keep their metadata.

A cache directory holds one repo folder per repo (`models--org--name/` with `blobs/<hash>`,
`snapshots/<rev>/<file>` relative links to `../../blobs/<hash>`, `refs/main`), and beside them
lock files, a CACHEDIR.TAG and perhaps a shared blob store. All of it is stored as it is, at the
store root (or under --name), so the mount can be HF_HUB_CACHE; each repo folder is a model of
its own, named by its hub id. Links are stored as links, as everywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zipfs.ingest.plan import read_text_inside
from zipfs.store import hub


@dataclass(frozen=True)
class Unit:
    """One thing `zipfs ingest PATH` stores: a model, or (is_model False) entries beside models."""

    path: Path
    name: str | None
    is_model: bool = True


def _repo_folders(path: Path) -> list[Path]:
    top = path.resolve()
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it
                          if hub.repo_of(f"{top}/{e.name}") is not None and e.is_dir(follow_symlinks=False))
    except OSError:
        return []


#: regular files a hub cache directory holds beside its repo folders (hidden ones such as a
#: .lock too)
_CACHE_FILES = {"CACHEDIR.TAG", "version.txt"}


def is_cache(path: Path) -> bool:
    """Whether path is a hub cache directory: one holding repo folders (not one itself) and no
    regular file a cache does not hold. A model directory (a config, weights) that happens to
    hold a folder named like a repo is a model: its files must not land at the store root."""
    repos = _repo_folders(path)
    if hub.repo_of(str(path.resolve())) is not None or not repos:
        return False
    try:
        with os.scandir(path) as it:
            files = [e.name for e in it if e.is_file(follow_symlinks=False)]
    except OSError:
        return False
    return all(n in _CACHE_FILES or n.startswith(".") for n in files)


def units(src: Path, name: str | None) -> list[Unit]:
    """What to store for src: a hub cache entry by entry (its repo folders as models, the rest
    plain) under name or the store root; anything else one model."""
    if not (src.is_dir() and is_cache(src)):
        return [Unit(src, name)]
    repos = set(_repo_folders(src))
    with os.scandir(src) as it:
        entries = sorted(Path(e.path) for e in it)
    return [Unit(p, f"{name.strip('/')}/{p.name}" if name else p.name, p in repos) for p in entries]


def snapshot_dirs(repo: Path) -> list[Path]:
    """The snapshot directories of a repo folder, the one refs/main names first: where its
    config.json and model card are."""
    try:
        revs = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    main = read_text_inside(repo, repo / "refs" / "main", 256).strip()
    return sorted(revs, key=lambda p: p.name != main)
