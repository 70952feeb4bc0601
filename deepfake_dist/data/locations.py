"""Where a shard set lives: a local folder, an ``http(s)://`` URL or ``s3://bucket/prefix``.

Everything that reads or writes a set goes through here: the loaders stream shards
(``open_stream``), the manifest is read and written (``read_bytes``, ``write_bytes``), ``shards
verify`` and ``shards index`` list a set (``list_names``), and ``prepare`` / ``generate`` upload
each shard as it closes (``upload``, ``move``).

Streaming, not downloading: a shard is read front to back from one response. A connection that
drops (reset, cut short, timed out, a 5xx answer) is reopened at the byte reached, with an HTTP
``Range`` request or an S3 ranged GET, up to ``RETRIES`` times in a row with a growing pause;
then the read fails with an ``OSError`` naming the URL (the loader counts the shard as unreadable
under ``data.on_error: skip``). A 404 is a ``FileNotFoundError`` and a 401/403 a
``PermissionError``, both naming the URL, and neither is retried.

S3 goes through boto3 and is configured the way the AWS CLI is: credentials from the environment
(``AWS_ACCESS_KEY_ID`` ...), a profile (``AWS_PROFILE``) or an instance role; the endpoint of an
S3-compatible store (MinIO, Ceph) from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, or
``endpoint_url`` in the profile. An HTTP(S) location is read-only and cannot be listed.
"""

from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from deepfake_dist.errors import UserError

SCHEMES = ("http://", "https://", "s3://")
RETRIES = 5  # reconnections in a row without a byte read, before a read fails
TIMEOUT_S = 60  # a connection that sends nothing for this long counts as dropped
_CHUNK = 1 << 20


class _Dropped(Exception):
    """A connection that failed in a way a new one may not: retried by ``Stream``."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEMES)


def join(location: str | Path, *names: str) -> str:
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(location, *names))


def split(url: str | Path) -> tuple[str, str]:
    """``(parent location, file name)`` of a file in a set."""
    if is_remote(url):
        parent, _, name = str(url).rstrip("/").rpartition("/")
        return parent, name
    path = Path(url)
    return str(path.parent), path.name


def set_name(location: str | Path) -> str:
    """A set's own name: its folder, or the last part of its URL or prefix."""
    return split(location)[1]


# ------------------------------------------------------------------------------------ streams


class Stream:
    """A file read front to back (from ``start``): ``read(n)`` returns ``n`` bytes, fewer only at
    the end; ``skip(n)`` moves on without keeping them; ``size``: the file's length in bytes.
    A dropped connection is reopened where the read had got to (see the module docstring)."""

    def __init__(self, url: str, connect, start: int = 0):
        self.url, self._connect, self.pos = url, connect, start
        self._body = None
        self.size = 0
        self._retry(None)  # connects

    def _retry(self, read) -> bytes:
        """``read()`` on an open connection (``None``: only connect); a dropped one is reopened at
        ``pos`` and read again."""
        for failures in range(RETRIES + 1):
            try:
                if self._body is None:
                    self._body, self.size = self._connect(self.pos)
                if read is None:
                    return b""
                data = read()
                if not data and self.pos < self.size:
                    raise _Dropped(f"the connection closed {self.size - self.pos} bytes before the end")
                return data
            except _Dropped as err:
                if self._body is not None:
                    self._body.close()
                    self._body = None
                if failures == RETRIES:
                    raise OSError(f"{self.url}: the connection failed {RETRIES + 1} times in a row at byte "
                                  f"{self.pos} ({err})") from None
                time.sleep(min(0.1 * 2**failures, 5.0))
        raise AssertionError("unreachable")

    def read(self, n: int) -> bytes:
        parts, want = [], min(n, self.size - self.pos)
        while want > 0:
            data = self._retry(lambda: self._body.read(want))
            parts.append(data)
            self.pos += len(data)
            want -= len(data)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n > 0 and self.pos < self.size:
            n -= len(self.read(min(n, _CHUNK)))

    def close(self) -> None:
        if self._body is not None:
            self._body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _FileStream:
    """A local file as a ``Stream`` (a skip is a seek)."""

    def __init__(self, path: str, start: int = 0):
        self.url, self._file = path, open(path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        if start:
            self._file.seek(start)

    def read(self, n: int) -> bytes:
        return self._file.read(n)

    def skip(self, n: int) -> None:
        self._file.seek(n, 1)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_stream(url: str | Path, start: int = 0) -> Stream | _FileStream:
    """``url`` for reading from byte ``start`` (a context manager)."""
    url = str(url)
    if url.startswith("s3://"):
        return Stream(url, lambda at: _s3_get(url, at), start)
    if is_remote(url):
        return Stream(url, lambda at: _http_get(url, at), start)
    return _FileStream(url, start)


def read_bytes(url: str | Path) -> bytes:
    with open_stream(url) as stream:
        return stream.read(stream.size)


def read_range(url: str | Path, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (excluded) of ``url``."""
    with open_stream(url, start) as stream:
        return stream.read(end - start)


def exists(url: str | Path) -> bool:
    try:
        open_stream(url).close()
        return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------- HTTP


def _http_get(url: str, start: int):
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416:  # the range starts at the end: nothing left to read
            return _Empty(), start
        if err.code == 404:
            raise FileNotFoundError(f"{url}: HTTP 404 Not Found") from None
        if err.code in (401, 403):
            raise PermissionError(f"{url}: HTTP {err.code} {err.reason}") from None
        if err.code >= 500 or err.code == 429:
            raise _Dropped(f"HTTP {err.code} {err.reason}") from None
        raise OSError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Dropped(str(getattr(err, "reason", err))) from None
    body = _HttpBody(response)
    if response.status == 206:
        size = int(response.headers["Content-Range"].rsplit("/", 1)[1])
    else:
        size = int(response.headers.get("Content-Length", 0))
        if start:  # a server that ignores Range sends the whole file: pass over what was read
            _discard(body, start)
    return body, size


class _HttpBody:
    def __init__(self, response):
        self.response = response

    def read(self, n: int) -> bytes:
        try:
            return self.response.read(n)
        except (OSError, http.client.HTTPException) as err:  # reset, timed out, cut short
            raise _Dropped(f"{type(err).__name__}: {err}") from None

    def close(self) -> None:
        self.response.close()


class _Empty:
    def read(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _discard(body, n: int) -> None:
    while n > 0:
        data = body.read(min(n, _CHUNK))
        if not data:
            raise _Dropped("the connection closed early")
        n -= len(data)


# ----------------------------------------------------------------------------------------- S3

_clients: dict[int, object] = {}  # one boto3 client per process: a client must not cross a fork


def _s3():
    client = _clients.get(os.getpid())
    if client is None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UserError("s3:// locations need boto3: pip install 'deepfake_dist[cloud]'") from None
        config = Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"mode": "standard"})
        client = _clients[os.getpid()] = boto3.session.Session().client("s3", config=config)
    return client


def _bucket_key(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    if not parsed.netloc:
        raise UserError(f"{url}: expected s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.lstrip("/")


def _s3_call(url: str, call):
    """``call()``, its errors as this module's: 404 / 403 naming ``url``, a dropped connection."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return call()
    except NoCredentialsError:
        raise PermissionError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              "or AWS_PROFILE") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
            raise FileNotFoundError(f"{url}: {code or 404} (S3)") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"{url}: {code} (S3)") from None
        if status >= 500 or code in ("SlowDown", "RequestTimeout"):
            raise _Dropped(f"{code} (S3)") from None
        raise OSError(f"{url}: {code} (S3): {err}") from None
    except BotoCoreError as err:  # no connection, timed out, cut short
        raise _Dropped(f"{type(err).__name__}: {err}") from None


def _s3_get(url: str, start: int):
    bucket, key = _bucket_key(url)
    try:
        answer = _s3_call(url, lambda: _s3().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-"))
    except OSError as err:
        if "InvalidRange" in str(err):  # the range starts at the end: nothing left to read
            return _Empty(), start
        raise
    size = int(answer["ContentRange"].rsplit("/", 1)[1]) if answer.get("ContentRange") else answer["ContentLength"]
    return _S3Body(answer["Body"]), size


class _S3Body:
    def __init__(self, body):
        self.body = body

    def read(self, n: int) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        try:
            return self.body.read(n)
        except (BotoCoreError, HTTPError, OSError) as err:  # reset, timed out, cut short
            raise _Dropped(f"{type(err).__name__}: {err}") from None

    def close(self) -> None:
        self.body.close()


# ------------------------------------------------------------------------------ list and write


def list_names(location: str | Path, folders: bool = False) -> list[str]:
    """File names directly in ``location`` (a folder or an S3 prefix), sorted; with ``folders``,
    the names of the folders in it too."""
    location = str(location)
    if location.startswith("s3://"):
        bucket, prefix = _bucket_key(location.rstrip("/") + "/")
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        found = []
        for page in _s3_call(location, lambda: list(pages)):
            found += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
            if folders:
                found += [sub["Prefix"][len(prefix):].rstrip("/") for sub in page.get("CommonPrefixes", [])]
        return sorted(found)
    if is_remote(location):
        raise UserError(f"{location}: an HTTP location cannot be listed; use a local copy or an s3:// location")
    folder = Path(location)
    return sorted(p.name for p in folder.iterdir() if folders or p.is_file()) if folder.is_dir() else []


def remove_tree(location: str | Path) -> None:
    """Remove a folder (an S3 prefix) and everything in it; one that is not there is no error."""
    location = str(location)
    check_writable(location)
    if not location.startswith("s3://"):
        shutil.rmtree(location, ignore_errors=True)
        return
    bucket, prefix = _bucket_key(location.rstrip("/") + "/")
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in _s3_call(location, lambda: list(pages)):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            _retrying(location, lambda: _s3().delete_objects(Bucket=bucket, Delete={"Objects": keys}))


def check_writable(url: str) -> None:
    """A location that cannot be written to (HTTP) is a UserError."""
    if is_remote(url) and not url.startswith("s3://"):
        raise UserError(f"{url}: an HTTP location is read-only; write to a local folder or an s3:// location")


def write_bytes(url: str | Path, data: bytes) -> None:
    """The whole file at once: a reader sees no file or the complete one."""
    url = str(url)
    check_writable(url)
    if url.startswith("s3://"):
        bucket, key = _bucket_key(url)
        _retrying(url, lambda: _s3().put_object(Bucket=bucket, Key=key, Body=data))
        return
    from deepfake_dist.atomic import atomic_path

    with atomic_path(url) as tmp:
        tmp.write_bytes(data)


def upload(path: str | Path, url: str | Path) -> None:
    """Copy the local file ``path`` to ``url``."""
    url = str(url)
    check_writable(url)
    if url.startswith("s3://"):
        bucket, key = _bucket_key(url)
        with open(path, "rb") as body:
            _retrying(url, lambda: (body.seek(0), _s3().put_object(Bucket=bucket, Key=key, Body=body)))
    else:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, url)


def move(src: str | Path, dst: str | Path) -> None:
    src, dst = str(src), str(dst)
    check_writable(dst)
    if dst.startswith("s3://"):
        (sb, sk), (db, dk) = _bucket_key(src), _bucket_key(dst)
        _retrying(dst, lambda: _s3().copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}))
        remove(src)
    else:
        os.replace(src, dst)


def remove(url: str | Path) -> None:
    """Remove a file; one that is not there is no error."""
    url = str(url)
    check_writable(url)
    if url.startswith("s3://"):
        bucket, key = _bucket_key(url)
        _retrying(url, lambda: _s3().delete_object(Bucket=bucket, Key=key))
    else:
        Path(url).unlink(missing_ok=True)


def _retrying(url: str, call):
    """An S3 write, retried as a read is (``RETRIES`` times, growing pauses)."""
    for failures in range(RETRIES + 1):
        try:
            return _s3_call(url, call)
        except _Dropped as err:
            if failures == RETRIES:
                raise OSError(f"{url}: the write failed {RETRIES + 1} times in a row ({err})") from None
            time.sleep(min(0.1 * 2**failures, 5.0))
    raise AssertionError("unreachable")
