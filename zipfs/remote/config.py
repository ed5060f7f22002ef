"""A store's remote: which bucket, which endpoint, how much payload to cache locally.

Kept as `remote.json` in the store directory (0600) so every process that opens the store, the
mount and the CLI alike, sees the same remote. Credentials never go in it: they come from the
standard AWS environment variables or ~/.aws files, as every S3 tool reads them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from zipfs.errors import ZipfsError

FILE = "remote.json"
DEFAULT_CACHE = 10 << 30
#: S3 bucket names: 3-63 lowercase letters, digits, dots and dashes
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


class RemoteError(ZipfsError):
    """The remote is misconfigured, unreachable, or holds something damaged."""


@dataclass
class RemoteConfig:
    bucket: str
    prefix: str = ""
    endpoint: str = ""
    region: str = ""
    cache_bytes: int = DEFAULT_CACHE
    #: names this store's manifest versions, so two machines never write the same key
    writer: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def check(self) -> None:
        if not all(isinstance(v, str) for v in (self.bucket, self.prefix, self.endpoint, self.region,
                                                 self.writer)):
            raise RemoteError("the remote's settings are malformed (set it again with 'zipfs remote set')")
        if not _BUCKET.match(self.bucket):
            raise RemoteError(f"{self.bucket!r} is not an S3 bucket name")
        if self.prefix.startswith("/") or "//" in self.prefix or len(self.prefix) > 256:
            raise RemoteError(f"bucket prefix {self.prefix!r} is malformed")
        if self.endpoint and urlparse(self.endpoint).scheme not in ("http", "https"):
            raise RemoteError(f"endpoint {self.endpoint!r} must start with https:// (or http://)")
        if type(self.cache_bytes) is not int or self.cache_bytes < 0:
            raise RemoteError("the remote's cache size must be a number of bytes")
        if not re.fullmatch(r"[0-9a-f]{16}", self.writer):
            raise RemoteError("the remote's writer id is malformed")


def parse_url(url: str, endpoint: str = "", region: str = "", cache_bytes: int = DEFAULT_CACHE,
              writer: str = "") -> RemoteConfig:
    """s3://bucket[/prefix] and the options of `zipfs remote set` as a checked config."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc or u.query or u.fragment:
        raise RemoteError(f"{url!r}: a remote is given as s3://BUCKET[/PREFIX]")
    cfg = RemoteConfig(u.netloc, u.path.strip("/"), endpoint.rstrip("/"), region, cache_bytes,
                       writer or secrets.token_hex(8))
    cfg.check()
    return cfg


def load(store_path: Path) -> RemoteConfig | None:
    """The store's remote, or None when it has none; RemoteError when the file is damaged."""
    path = store_path / FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RemoteError(f"cannot read {path}: {e.strerror}") from None
    try:
        cfg = RemoteConfig(**json.loads(raw))
    except (ValueError, TypeError):
        raise RemoteError(f"{path} is damaged (set the remote again with 'zipfs remote set')") from None
    cfg.check()
    return cfg


def save(store_path: Path, cfg: RemoteConfig) -> None:
    """Write the config atomically (a crash leaves the old one or the new one)."""
    cfg.check()
    tmp = store_path / (FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(asdict(cfg), indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, store_path / FILE)
