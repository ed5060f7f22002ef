"""The bucket: the few S3 operations zipfs needs, through obstore, with one-line errors.

obstore (Rust's object_store) was measured against boto3 and minio-py for 1 MiB ranged GETs from
SeaweedFS here (DESIGN.md): 0.5-1.0 GB/s at 8-16 in flight vs 0.73 and 0.22-0.32, and its sync
calls release the GIL, so worker threads under trio cost nothing extra. It retries 5xx answers,
dropped connections and timeouts itself, with exponential backoff; what still fails after that
becomes a RemoteError naming the operation and the key.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError
from obstore.store import S3Store

from zipfs.remote.config import RemoteConfig, RemoteError

#: how long one request may take, and how long obstore keeps retrying a failing one
TIMEOUT = timedelta(seconds=30)
RETRY_FOR = timedelta(seconds=8)


@dataclass
class Listed:
    key: str
    size: int
    modified: datetime


class MissingError(RemoteError):
    """An object the caller expected is not in the bucket (deleted by gc, or never written)."""


def shared_credentials() -> dict[str, str]:
    """Keys from the AWS shared files (~/.aws/credentials and ~/.aws/config, or the files and
    profile AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE, AWS_PROFILE name), for when the
    environment has none; obstore reads the environment, instance roles and web identity itself."""
    import configparser

    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path(os.path.expanduser("~/.aws"))
    out: dict[str, str] = {}
    for path, section in ((os.environ.get("AWS_CONFIG_FILE") or home / "config",
                           profile if profile == "default" else f"profile {profile}"),
                          (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials", profile)):
        ini = configparser.ConfigParser(interpolation=None)
        try:
            ini.read(path)
        except (configparser.Error, UnicodeDecodeError) as e:
            raise RemoteError(f"cannot read AWS settings {path}: {str(e).splitlines()[0]}") from None
        if ini.has_section(section):
            for ours, theirs in (("access_key_id", "aws_access_key_id"),
                                 ("secret_access_key", "aws_secret_access_key"),
                                 ("session_token", "aws_session_token"), ("region", "region")):
                if ini.get(section, theirs, fallback=None):
                    out[ours] = ini.get(section, theirs)
    return out


def _reason(e: BaseException) -> str:
    """The first line of obstore's message (the rest is a debug dump)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


class Bucket:
    """One bucket (and prefix). Thread-safe: obstore's client is shared by all threads."""

    def __init__(self, cfg: RemoteConfig) -> None:
        self.cfg = cfg
        options: dict = {"timeout": TIMEOUT, "connect_timeout": timedelta(seconds=5)}
        if cfg.endpoint.startswith("http://"):
            options["allow_http"] = True
        shared = shared_credentials()
        region = cfg.region or os.environ.get("AWS_REGION") or shared.pop("region", "") or "us-east-1"
        shared.pop("region", None)
        kwargs: dict = {**shared, "region": region, "client_options": options,
                        "retry_config": {"max_retries": 4, "retry_timeout": RETRY_FOR,
                                         "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                     "max_backoff": timedelta(seconds=2), "base": 2}}}
        if cfg.endpoint:
            kwargs.update(endpoint=cfg.endpoint, virtual_hosted_style_request=False)
        try:
            self._s3 = S3Store(cfg.bucket, prefix=cfg.prefix or None, **kwargs)
        except (BaseError, ValueError) as e:
            raise RemoteError(f"remote {cfg.url}: {_reason(e)}") from None
        self._lock = threading.Lock()
        #: requests made and bytes moved, by operation (benchmarks and tests count them)
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def _count(self, op: str, n: int = 0) -> None:
        with self._lock:
            self.requests[op] += 1
            self.bytes[op] += n

    @contextmanager
    def _calling(self, op: str, key: str, what: str = "", reads: bool = False) -> Iterator[None]:
        """One request's failures as one-line errors naming the operation and what it was for
        (key, or what is given); for a read of the object at key, its absence as MissingError
        (callers to whom absence is an answer catch FileNotFoundError inside the block)."""
        try:
            yield
        except (BaseError, OSError) as e:
            if reads and isinstance(e, FileNotFoundError):
                raise MissingError(f"remote {self.cfg.url}: {key} is missing from the bucket") from None
            raise RemoteError(f"remote {self.cfg.url}: {op} {what or key} failed: {_reason(e)}") from None

    def put(self, key: str, data: bytes | memoryview, create: bool = False) -> bool:
        """Store an object; with create, only if the key is new (If-None-Match: *): False when
        it exists already (content-addressed keys: someone else stored the same bytes)."""
        self._count("put", len(data))
        with self._calling("PUT", key):
            try:
                obstore.put(self._s3, key, data, mode="create" if create else "overwrite",
                            use_multipart=False)
            except AlreadyExistsError:
                return False
        return True

    def get(self, key: str) -> bytes:
        self._count("get")
        with self._calling("GET", key, reads=True):
            data = bytes(obstore.get(self._s3, key).bytes())
        self.bytes["get"] += len(data)
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._count("get_range", length)
        with self._calling("GET", key, f"{key} [{start}, +{length})", reads=True):
            return bytes(obstore.get_range(self._s3, key, start=start, length=length))

    def modified(self, key: str) -> datetime | None:
        """When the object was last written, or None when it does not exist."""
        self._count("head")
        with self._calling("HEAD", key):
            try:
                return obstore.head(self._s3, key)["last_modified"]
            except FileNotFoundError:
                return None

    def exists(self, key: str) -> bool:
        return self.modified(key) is not None

    def refresh(self, key: str, data: bytes) -> None:
        """Store a content-addressed object, or rewrite it with the same bytes when it exists:
        its age restarts, so gc's grace period covers this writer's use of it."""
        if not self.put(key, data, create=True):
            self.put(key, data)

    def list(self, prefix: str) -> Iterator[Listed]:
        """Every object under prefix (keys relative to the bucket prefix)."""
        self._count("list")
        with self._calling("LIST", prefix):
            for batch in obstore.list(self._s3, prefix=prefix):
                for o in batch:
                    yield Listed(o["path"], o["size"], o["last_modified"])

    def delete(self, key: str) -> None:
        self._count("delete")
        with self._calling("DELETE", key):
            try:
                obstore.delete(self._s3, key)
            except FileNotFoundError:
                pass
