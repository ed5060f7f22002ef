"""Names in the Hugging Face hub cache layout: a repo folder `models--org--name` is the model
`org/name`.

huggingface_hub names a repo's cache folder `<type>s--` + the repo id with '/' replaced by '--'
(`repo_folder_name`); hub repo ids may not contain '--', so the folder name maps back to one id.
Pure functions of names: what is shown, not what is stored (the folder keeps its name, so the
mount can be HF_HUB_CACHE).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

#: the cache directory's folder of lock files, one folder per repo named like the repo folder
LOCKS = ".locks"
#: repo types other than models, as the plural that starts their folder names and hub URLs
_OTHER_TYPES = ("datasets", "spaces", "kernels")
#: a repo folder of the cache: repo type (plural) and the id with '/' written as '--'
REPO_FOLDER = re.compile(rf"(models|{'|'.join(_OTHER_TYPES)})--(?!-)(.+)")


def repo_id(folder: str) -> str | None:
    """The hub id of a repo folder name ('models--org--name' -> 'org/name', datasets keep their
    'datasets/' prefix as hub URLs do), or None for any other name."""
    m = REPO_FOLDER.fullmatch(folder)
    if m is None or "" in m.group(2).split("--"):
        return None
    rid = m.group(2).replace("--", "/")
    return rid if m.group(1) == "models" else f"{m.group(1)}/{rid}"


def folder(rid: str) -> str:
    """The repo folder name of a hub id, the inverse of repo_id ('org/name' -> 'models--org--name')."""
    parts = rid.strip("/").split("/")
    kind = parts.pop(0) if len(parts) > 1 and parts[0] in _OTHER_TYPES else "models"
    return "--".join([kind, *parts])


def repo_of(path: str) -> str | None:
    """The hub id of the directory at path when it is a repo folder: named like one, and not the
    per-repo folder of lock files in the cache's .locks ('.locks/models--org--name')."""
    parent, _, last = path.rstrip("/").rpartition("/")
    return None if parent.rpartition("/")[2] == LOCKS else repo_id(last)


def display(path: str) -> str:
    """How a store path is shown as a model name: a repo folder by its hub id (with the cache
    directory it is in, when that is not the store root), anything else as itself."""
    rid = repo_of(path)
    if rid is None:
        return path
    parent = path.rstrip("/").rpartition("/")[0]
    return f"{rid} ({parent}/)" if parent else rid


def displays(paths: Iterable[str]) -> dict[str, str]:
    """Each path's display name, but a repo folder whose hub id another entry also shows (a
    plain model stored as org/name, or datasets--x--y beside models--datasets--x--y) keeps its
    path: two different models never show under one name."""
    shown = {p: display(p) for p in paths}
    seen = Counter(shown.values())
    return {p: d if d == p or seen[d] == 1 else p for p, d in shown.items()}
