"""The bucket format's encode/parse, without a server: round trips, and every damaged or
hostile object refused with a RemoteError (never another exception, never a path outside)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zipfs.remote import layout
from zipfs.remote.config import RemoteError
from zipfs.remote.layout import Entry, FileManifest, ModelManifest
from zipfs.store.records import DELTA_XOR, STANDALONE

H1, H2, P = "1" * 64, "2" * 64, "a" * 64


def _file() -> FileManifest:
    base = Entry(H1, P, 0, 100, 7, STANDALONE, 9, 4096)
    delta = Entry(H2, P, 100, 50, 8, DELTA_XOR, 10, 4096, H1)
    return FileManifest(8192, "f" * 64, "safetensors", "", [["w", "BF16", [2048, 2], 0, 8192, ""]],
                        [0, 4096], [1, 0], [base, delta])


def _model() -> ModelManifest:
    return ModelManifest("org/m", "0" * 16, 1, "", "", [
        {"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 5},
        {"path": "sub/model.safetensors", "type": "file", "file": "b" * 64, "size": 8192, "mode": 0o644,
         "uid": 0, "gid": 0, "mtime_ns": 5},
        {"path": "latest", "type": "link", "target": "sub/model.safetensors", "mode": 0o777, "uid": 0,
         "gid": 0, "mtime_ns": 5}])


def test_round_trips():
    fm = _file()
    assert FileManifest.parse(fm.encode(), "files/x") == fm
    m = _model()
    key = layout.model_prefix(m.name) + "1" * 19 + "-" + "0" * 16
    assert ModelManifest.parse(m.encode(), key) == m
    entries = fm.chunks
    assert layout.parse_index(layout.index_object(P, 150, entries), layout.INDEX + P) == entries


@pytest.mark.parametrize("name", ["org/m", "a b/ç%2F", "x", "models--a--b"])
def test_model_keys_round_trip(name):
    key = layout.model_prefix(name) + "1" * 19 + "-" + "0" * 16
    assert layout.model_of(key) == (name, "1" * 19 + "-" + "0" * 16)


@pytest.mark.parametrize("key", ["models/x", "models/x/1", "models/..%2Fx/" + "1" * 19 + "-" + "0" * 16,
                                 "models/%ff/" + "1" * 19 + "-" + "0" * 16, "packs/x",
                                 "models//" + "1" * 19 + "-" + "0" * 16])
def test_foreign_keys_are_not_models(key):
    assert layout.model_of(key) is None


def test_hostile_manifests_are_refused():
    key = layout.model_prefix("org/m") + "1" * 19 + "-" + "0" * 16
    for path in ("../x", "/etc", "a//b", "a/./b", "a\0b"):
        m = _model()
        m.entries[1]["path"] = path
        with pytest.raises(RemoteError):
            ModelManifest.parse(m.encode(), key)
    m = _model()
    m.name = "other"
    with pytest.raises(RemoteError, match="not the one its key does"):
        ModelManifest.parse(m.encode(), key)
    fm = _file()
    fm.chunks[1] = Entry(H2, P, 100, 50, 8, DELTA_XOR, 10, 4096, "3" * 64)  # base not in the manifest
    with pytest.raises(RemoteError, match="base"):
        FileManifest.parse(fm.encode(), "files/x")
    fm = _file()
    fm.refs = [5, 0]
    with pytest.raises(RemoteError):
        FileManifest.parse(fm.encode(), "files/x")
    with pytest.raises(RemoteError, match="outside its pack"):
        layout.parse_index(layout.index_object(P, 120, _file().chunks), layout.INDEX + P)
    with pytest.raises(RemoteError, match="format"):
        FileManifest.parse(layout.encode({"format": 99}), "files/x")
    for row in ([True, P, 0, 1, 0, 0, 0, 1, "", 0, 0], [H1, P, -1, 1, 0, 0, 0, 1, "", 0, 0],
                [H1, P, 0, 1, 0, 0, 0, 1, "", 0], [H1, P, 0, 1, 0, 9, 0, 1, "", 0, 0],
                [H1, P, 0, 1, 0, 2, 0, 1, "", 0, 0], "x"):
        with pytest.raises(RemoteError):
            Entry.from_row(row, "t")


def test_a_decompression_bomb_is_refused():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b" " * (layout.MAX_OBJECT + 1))
    with pytest.raises(RemoteError, match="damaged"):
        layout.decode(bomb, "files/x")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_flipped_or_cut_objects_parse_the_same_or_fail_cleanly(data):
    key = layout.model_prefix("org/m") + "1" * 19 + "-" + "0" * 16
    for raw, parse in ((_file().encode(), lambda b: FileManifest.parse(b, "files/x")),
                       (_model().encode(), lambda b: ModelManifest.parse(b, key)),
                       (layout.index_object(P, 150, _file().chunks),
                        lambda b: layout.parse_index(b, "index/" + P))):
        b = bytearray(raw)
        if data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        else:
            b = b[:data.draw(st.integers(0, len(b) - 1))]
        try:
            parse(bytes(b))
        except RemoteError:
            pass


def test_deep_nesting_non_canonical_keys_link_targets_and_field_bounds_are_refused():
    import zstandard

    deep = zstandard.ZstdCompressor().compress(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RemoteError, match="damaged"):
        layout.decode(deep, "files/x")
    v = "1" * 19 + "-" + "0" * 16
    assert layout.model_of(f"models/org%2Fm/{v}") == ("org/m", v)
    for key in (f"models/org%2fm/{v}", f"models/%61bc/{v}"):
        assert layout.model_of(key) is None
    key = layout.model_prefix("org/m") + v
    for target in ("/etc/passwd", "../../x", "", "a\0b", "../" * 3 + "y"):
        m = _model()
        m.entries[2]["target"] = target
        with pytest.raises(RemoteError, match="outside the model"):
            ModelManifest.parse(m.encode(), key)
    m = _model()
    m.entries[1]["path"] = "snapshots/r/model.safetensors"
    m.entries[2].update(path="snapshots/r/latest", target="../../blobs/abc")  # a hub snapshot's link
    assert ModelManifest.parse(m.encode(), key) == m
    for field, value in (("uid", 1 << 32), ("mode", 1 << 40), ("mtime_ns", 1 << 63)):
        m = _model()
        m.entries[1][field] = value
        with pytest.raises(RemoteError, match="out of range"):
            ModelManifest.parse(m.encode(), key)
