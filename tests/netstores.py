"""Real object stores on 127.0.0.1 for the tests, each in a thread of the test process: an HTTP
file server (``http.server`` with byte ranges, and faults: connections cut mid-body, a 404 for
chosen files) and an S3 API server (moto's ``ThreadedMotoServer``). Clients are the real ones
(urllib, boto3); nothing leaves the machine."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from scale_setup import free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class HttpStore:
    """What the server serves (files under ``root``) and how it misbehaves: ``missing`` paths
    answer 404; ``cut`` "fresh": every response that starts at byte 0 stops halfway through its
    body and the connection closes (a range request, the client's resume, is answered whole);
    "all": every response closes before its body; ``log``: (path, first byte) of each request."""

    root: Path
    url: str = ""
    missing: set[str] = field(default_factory=set)
    cut: str = ""
    log: list[tuple[str, int]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        store: HttpStore = self.server.store
        rel = unquote(urlparse(self.path).path).lstrip("/")
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match[1]) if match else 0
        store.log.append((rel, start))
        path = store.root / rel
        if rel in store.missing or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if store.cut == "all" or store.cut == "fresh" and not start:
            self.wfile.write(body[:len(body) // 2 if store.cut == "fresh" else 0])
            self.wfile.flush()
            with suppress(OSError):  # the client may have gone already
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def http_store(root: Path) -> Iterator[HttpStore]:
    store = HttpStore(Path(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.store = store
    store.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield store
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def s3_store(bucket: str) -> Iterator[str]:
    """An S3 API server with ``bucket`` made, its endpoint and test credentials in this
    process's environment (launched processes inherit them); yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    from deepfake_dist.data import locations

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in (*S3_ENV, "AWS_ENDPOINT_URL_S3")}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint})
    locations._clients.clear()  # a client made before holds another endpoint
    try:
        locations._s3().create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        locations._clients.clear()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def upload_folder(folder: Path, url: str) -> None:
    """Every file of ``folder`` (not its subfolders) to ``url``, as ``aws s3 cp --recursive`` would."""
    from deepfake_dist.data import locations

    for path in sorted(folder.iterdir()):
        if path.is_file():
            locations.upload(path, locations.join(url, path.name))
