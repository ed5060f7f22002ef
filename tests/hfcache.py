"""Put a model directory into a Hugging Face hub cache the way `hf_hub_download` does, with no hub.

huggingface_hub's own layout code does the work (repo folder name, refs/main written through a
temporary file, the lock file, the per-download `<etag>.<id>.incomplete` file renamed into
`blobs/<etag>`, the relative snapshot link, CACHEDIR.TAG, the tree listing snapshot_download
checks); only the HTTP transfer is replaced by writing the file's bytes in pieces. The etag is
what the hub sends: the sha256 of an LFS file, the git blob sha1 of any other.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from huggingface_hub._local_folder import _create_cachedir_tag
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _chmod_and_move,
    _create_symlink,
    _get_pointer_path,
    repo_folder_name,
)
from huggingface_hub.utils import WeakFileLock
from huggingface_hub.utils.sha import git_hash

#: files the hub's default .gitattributes keeps in LFS (the rest are plain git blobs)
LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".onnx", ".msgpack", ".ot", ".pt", ".pth", ".ckpt", ".gguf")
#: the commit the fixture repos are at (any 40 hex digits)
COMMIT = hashlib.sha1(b"zipfs hub cache fixture").hexdigest()


def _entry(data: bytes, lfs: bool) -> TreeCacheEntry:
    if lfs:
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
        return TreeCacheEntry(len(data), git_hash(pointer.encode()), sha, len(data))
    return TreeCacheEntry(len(data), git_hash(data))


def download(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, piece: int = 1 << 20) -> Path:
    """Download every file of directory src as file of repo_id at commit into cache (refs/main
    names the commit); returns the repo folder."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    entries: dict[str, TreeCacheEntry] = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        data = f.read_bytes()
        entry = entries[rel] = _entry(data, f.name.endswith(LFS_SUFFIXES))
        etag = entry.lfs_sha256 or entry.blob_id
        blob = storage / "blobs" / etag
        pointer = _get_pointer_path(str(storage), commit, rel)
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_cachedir_tag(cache)
        _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
        lock = cache / ".locks" / storage.name / f"{etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if not blob.exists():
                tmp = blob.with_name(f"{etag}.{os.urandom(4).hex()}.incomplete")
                with tmp.open("wb") as out:
                    for i in range(0, len(data), piece):
                        out.write(data[i:i + piece])
                _chmod_and_move(tmp, blob)
            if not os.path.exists(pointer):
                _create_symlink(str(blob), pointer, new_blob=True)
    write_tree_cache(str(storage), commit, entries)
    return storage
