"""The Hugging Face hub cache as users have it: `zipfs ingest` of a cache (or one repo folder)
keeps its layout and names each model by its hub id; the mount is a valid HF_HUB_CACHE for
offline loads by repo id; a download written through the mount leaves the same layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hfcache import download
from huggingface_hub import scan_cache_dir, snapshot_download

from zipfs.fs.process import mounted, zipfs_cmd

RID = "sentence-transformers/all-MiniLM-L6-v2"
FOLDER = "models--sentence-transformers--all-MiniLM-L6-v2"

#: run with the mount as HF_HUB_CACHE, offline: load by repo id and from the original directory
LOAD = """
import json, sys
import huggingface_hub, torch, transformers
rid, original = sys.argv[1:]
text = ["a zipfs mount as HF_HUB_CACHE", "the same bytes as the original"]
tok, ref_tok = (transformers.AutoTokenizer.from_pretrained(p) for p in (rid, original))
model, ref = (transformers.AutoModel.from_pretrained(p) for p in (rid, original))
ids, ref_ids = (t(text, padding=True, return_tensors="pt") for t in (tok, ref_tok))
with torch.no_grad():
    equal = torch.equal(model(**ids).last_hidden_state, ref(**ref_ids).last_hidden_state)
print(json.dumps({"snapshot": huggingface_hub.snapshot_download(rid, local_files_only=True),
                  "weights": transformers.utils.cached_file(rid, "model.safetensors"),
                  "same_ids": torch.equal(ids["input_ids"], ref_ids["input_ids"]), "equal": equal}))
"""


def tree(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry under root, links not followed: ('dir', ''), ('link', target) or ('file', sha256)."""
    out = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(here) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def nb_files(src: Path) -> int:
    return sum(1 for f in src.rglob("*") if f.is_file())


def valid_cache(root: Path, nb_files: int) -> None:
    """huggingface_hub's own check: one repo, RID, at one revision named by refs/main, no warnings."""
    info = scan_cache_dir(root)
    assert info.warnings == [], info.warnings
    (repo,) = info.repos
    assert repo.repo_id == RID and repo.nb_files == nb_files
    (rev,) = repo.revisions
    assert rev.refs == {"main"}


@pytest.fixture
def hub(models, tmp_path) -> Path:
    """A hub cache holding the real MiniLM as RID, written by huggingface_hub's layout rules."""
    cache = tmp_path / "hub"
    download(cache, RID, models["minilm"])
    valid_cache(cache, nb_files(models["minilm"]))
    return cache


def test_a_hub_cache_keeps_its_layout_and_loads_by_repo_id_offline(hub, models, zipfs, store_path, tmp_path):
    r = zipfs("ingest", str(hub))
    assert r.code == 0, r.err
    assert f"{RID}: 87.1 MiB stored in" in r.out
    ls = zipfs("ls").out
    assert f"{FOLDER}/" in ls and f"hub repo {RID}" in ls and "CACHEDIR.TAG" in ls
    lfs = next(p for p, (kind, _) in tree(hub).items() if kind == "link" and p.endswith("/model.safetensors"))
    blob = os.readlink(hub / lfs).removeprefix("../../")
    assert f"{lfs} -> ../../{blob}" in ls  # stored as a link, relative, not followed
    lines = ls.splitlines()
    assert next(x for x in lines if x.startswith(f"{FOLDER}/{blob} ")).endswith("safetensors")  # by content
    assert zipfs("ls", RID).out.splitlines() == [x for x in lines if x.startswith(FOLDER)]
    stats = json.loads(zipfs("stats", "--json").out)["models"]
    assert list(stats) == [FOLDER] and stats[FOLDER]["display_name"] == RID  # no other entry is a model
    assert RID in zipfs("stats").out
    du = {u["name"]: u for u in json.loads(zipfs("du", "--json").out)}
    assert du[FOLDER]["display_name"] == RID and du[FOLDER]["logical"] == stats[FOLDER]["size"]
    assert f"{RID} " in zipfs("du").out
    assert zipfs("verify").code == 0
    m = tmp_path / "m"
    with mounted(store_path, m, "--read-only"):
        assert tree(m) == tree(hub)
        valid_cache(m, nb_files(models["minilm"]))
        env = {**os.environ, "HF_HUB_CACHE": str(m), "HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-c", LOAD, RID, str(models["minilm"])], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["snapshot"] == str(m / FOLDER / "snapshots" / os.listdir(hub / FOLDER / "snapshots")[0])
    assert got["weights"].startswith(f"{m}/") and got["same_ids"] and got["equal"]


def test_a_fine_tune_in_the_cache_names_its_hub_base_by_repo_id(hub, models, zipfs, tmp_path):
    """Base detection reads a cached repo's hints from its snapshot and matches them to a stored
    repo folder by its hub id; --base takes a hub id too."""
    r = zipfs("ingest", str(hub / FOLDER))  # one repo folder: at the root, under its own name
    assert r.code == 0 and f"{RID}: " in r.out, r.err
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.safetensors").symlink_to(models["sre"] / "model.safetensors")
    (ft / "README.md").write_text(f"---\nbase_model: {RID}\n---\n# a fine-tune\n")
    ft_hub = tmp_path / "ft-hub"
    download(ft_hub, "me/sre-ft", ft)
    (ft_hub / "elsewhere").symlink_to(ft)  # an entry beside the repos: a link, stored as one
    r = zipfs("ingest", str(ft_hub))
    assert r.code == 0, r.err
    assert f"elsewhere -> {ft}" in zipfs("ls").out and "elsewhere/" not in zipfs("ls").out
    assert "me/sre-ft: 86.7 MiB stored in" in r.out and f"base: {RID} (metadata hint" in r.out
    stats = json.loads(zipfs("stats", "--json").out)["models"]
    assert stats["models--me--sre-ft"]["base"] == FOLDER
    assert stats["models--me--sre-ft"]["new_bytes"] < 0.5 * stats["models--me--sre-ft"]["size"]
    r = zipfs("ingest", str(models["sre"]), "--name", "sre", "--base", RID)
    assert r.code == 0 and f"base: {RID} (--base" in r.out, r.err


def test_a_download_through_the_writable_mount_leaves_the_hub_layout(hub, models, zipfs, store_path,
                                                                     tmp_path):
    """hf_hub_download's writes (lock file, refs/main by rename, `<etag>.<id>.incomplete` renamed
    to blobs/<etag>, relative snapshot links, the tree listing) end up as the same cache."""
    m = tmp_path / "m"
    with mounted(store_path, m):
        download(m, RID, models["minilm"])
        r = subprocess.run(zipfs_cmd(store_path, "sync", "--wait", "--timeout", "120", str(m)),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert tree(m) == tree(hub)  # nothing .incomplete or temporary is left
        valid_cache(m, nb_files(models["minilm"]))
        snapshot = snapshot_download(RID, cache_dir=m, local_files_only=True)
        assert snapshot.startswith(f"{m}/{FOLDER}/snapshots/")
        assert {os.getxattr(p, "user.zipfs.state") for p in (m / FOLDER / "blobs").iterdir()} == {b"stored"}
    stats = json.loads(zipfs("stats", "--json").out)["models"]
    assert list(stats) == [FOLDER] and stats[FOLDER]["display_name"] == RID
    du = {u["name"]: u for u in json.loads(zipfs("du", "--json").out)}
    assert du[FOLDER]["files"] == len(os.listdir(hub / FOLDER / "blobs")) + 2  # refs/main, the tree listing
    assert zipfs("verify").code == 0


@pytest.mark.timeout(120)
def test_hints_never_read_a_fifo_or_outside_the_tree(hub, models, zipfs, tmp_path):
    """refs/main and the snapshot's config are read for base hints: a link to a FIFO outside the
    tree, or a config that is a FIFO, is stored as what it is and never opened (ingest waited
    forever on it)."""
    repo = hub / FOLDER
    outside = tmp_path / "outside-fifo"
    os.mkfifo(outside)
    (repo / "refs" / "main").unlink()
    (repo / "refs" / "main").symlink_to(outside)
    r = zipfs("ingest", str(hub))
    assert r.code == 0 and "not followed" in r.out, r.err
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").symlink_to(models["sre"] / "model.safetensors")
    os.mkfifo(plain / "config.json")
    r = zipfs("ingest", str(plain), "--name", "plain")
    assert r.code == 0 and "a FIFO" in r.out, r.err


def test_a_model_dir_holding_a_repo_named_folder_is_a_model_not_a_cache(zipfs, tmp_path):
    """Only a directory of repo folders (and what a cache keeps beside them) is a hub cache; a
    model directory with a models--a--b folder inside stays one model, its files in it."""
    src = tmp_path / "mydir"
    (src / "models--a--b").mkdir(parents=True)
    (src / "models--a--b" / "readme").write_text("not a cache\n")
    (src / "config.json").write_text('{"model_type": "bert"}')
    assert zipfs("ingest", str(src), "--name", "mydir").code == 0
    assert list(json.loads(zipfs("stats", "--json").out)["models"]) == ["mydir"]
    listed = sorted(line.split()[0] for line in zipfs("ls").out.splitlines())
    assert listed == ["mydir/", "mydir/config.json", "mydir/models--a--b/", "mydir/models--a--b/readme"]


def test_hub_ids_name_the_same_thing_everywhere_and_never_collide(hub, models, zipfs, tmp_path):
    assert zipfs("ingest", str(hub)).code == 0
    assert zipfs("ingest", str(models["sre"]), "--name", RID, "--no-delta").code == 0  # a plain org/name too
    stats = json.loads(zipfs("stats", "--json").out)["models"]
    assert {m["display_name"] for m in stats.values()} == {RID, FOLDER}  # the repo folder keeps its path
    du = {u["name"]: u["display_name"] for u in json.loads(zipfs("du", "--json").out) if u["name"] in stats}
    assert sorted(du.values()) == sorted([RID, FOLDER])
    # a path that is in the store is that path; --base too
    r = zipfs("ingest", str(models["sre"]), "--name", "t", "--base", RID)
    assert r.code == 0 and f"base: {RID} (--base" in r.out and "sampled deltas 0.000" in r.out, r.out
    assert zipfs("rm", RID).code == 0
    # with the plain model gone, the hub id names the repo folder in every command
    assert zipfs("verify", RID).out.startswith(f"{nb_files(models['minilm']) + 2} ok")  # refs, tree listing
    assert zipfs("export", RID, str(tmp_path / "out")).code == 0
    assert (tmp_path / "out" / "refs" / "main").read_text() == (hub / FOLDER / "refs" / "main").read_text()
    assert zipfs("ls", f"{RID}/refs/main").out.startswith(f"{FOLDER}/refs/main ")
    assert zipfs("rm", RID).code == 0
    assert not any(line.startswith(FOLDER) for line in zipfs("ls").out.splitlines())  # .locks/ stays


def test_a_file_named_like_a_repo_is_not_a_model(zipfs, store_path, tmp_path):
    m = tmp_path / "m"
    with mounted(store_path, m):
        (m / "models--q--r").write_text("x\n")
        r = subprocess.run(zipfs_cmd(store_path, "sync", "--wait", "--timeout", "60", str(m)),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert json.loads(zipfs("stats", "--json").out)["models"] == {}
