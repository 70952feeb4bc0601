"""The detection server against a hostile client, on a real loopback port: a token checked only
after the upload was read, an empty token, small uploads that decode to gigabytes, more
requests than the machine can score, a PNG cut short, a verdict at ``p == threshold``, NaN in
the model's JSON, a decompression bomb over Pillow's own limit."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from deploy_setup import live_server, one_thread
from PIL import Image
from scale_setup import free_port

from deepfake_dist.cli import main
from deepfake_dist.data.uploads import BadImage, open_upload, pillow_pixel_limit
from deepfake_dist.errors import UserError
from deepfake_dist.options import ServeOptions
from deepfake_dist.serve.app import TOKEN_ENV, create_app, resolve_token

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _face(deploy_shards) -> tuple[str, bytes]:
    path = sorted((deploy_shards[1] / "real").glob("*.png"))[-1]
    return path.name, path.read_bytes()


def _raw_png(width: int, height: int, rows: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG declaring ``width`` x ``height`` whose data holds ``rows`` rows of zeros, compressed
    a row at a time (a 6300 x 6300 16-bit RGBA one is 300 KB on the wire)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + width * depth // 8 * {0: 1, 2: 3, 6: 4}[colour])
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(rows)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _headers_only(url: str, path: str, length: int, authorization: str | None = None) -> socket.socket:
    """A connection that has sent a request's headers and none of its ``length``-byte body."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                 f"{auth}Content-Length: {length}\r\n\r\n".encode())
    return sock


def _answer(sock: socket.socket) -> str:
    """The whole response on ``sock`` (its headers and a Content-Length body)."""
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"content-length: (\d+)", answer, re.I)[1]):
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    return answer.decode("latin-1")


def test_a_wrong_token_is_answered_before_the_body_is_read(deploy_run):
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, token=TOKEN))) as url:
        for path in ("/v1/detect", "/v1/detect/batch"):
            with _headers_only(url, path, 10_000_000) as sock:  # 10 MB announced, not one byte sent
                answer = _answer(sock)
            assert answer.startswith("HTTP/1.1 401"), answer[:200]
            assert answer.endswith('"code":"unauthorized"}')


def test_an_empty_token_is_refused_and_one_is_read_from_a_file_or_the_environment(
        deploy_run, deploy_shards, tmp_path, monkeypatch, capsys):
    for empty in ("", "  "):
        with pytest.raises(UserError, match="the token is empty"):
            create_app(ServeOptions(checkpoint=deploy_run, token=empty))
    assert main(["serve", "--checkpoint", str(deploy_run), "--token", ""]) == 2
    assert "the token is empty" in capsys.readouterr().err

    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(None, token_file) == TOKEN and resolve_token(None, None) is None
    (tmp_path / "empty").write_text("\n")
    for token, file, problem in ((None, tmp_path / "empty", "the file is empty"), (None, tmp_path / "gone", "cannot read"),
                                 ("x", token_file, "not both")):
        with pytest.raises(UserError, match=problem):
            resolve_token(token, file)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert resolve_token(None, None) == TOKEN and resolve_token("other", None) == "other"

    name, data = _face(deploy_shards)
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, token=resolve_token(None, None)))) as url:
        files = {"file": (name, data, "image/png")}
        assert httpx.post(f"{url}/v1/detect", files=files, headers={"Authorization": "Bearer x"}).status_code == 401
        ok = httpx.post(f"{url}/v1/detect", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text


def test_a_full_server_answers_503_with_retry_after(deploy_run, deploy_shards):
    name, data = _face(deploy_shards)
    files = {"file": (name, data, "image/png")}
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, max_concurrent=1, max_queue=1))) as url:
        waiting = [_headers_only(url, "/v1/detect", 1000) for _ in range(2)]  # admitted, their bodies never come
        try:
            deadline = time.monotonic() + 10
            while (busy := httpx.post(f"{url}/v1/detect", files=files)).status_code != 503:
                assert time.monotonic() < deadline, busy.text  # until the server has taken both in
            assert busy.headers["retry-after"] == "1" and busy.json()["code"] == "busy"
            assert httpx.get(f"{url}/healthz").status_code == 200  # only detection is queued
        finally:
            for sock in waiting:
                sock.close()
        deadline = time.monotonic() + 10
        while (r := httpx.post(f"{url}/v1/detect", files=files)).status_code == 503:
            assert time.monotonic() < deadline
        assert r.status_code == 200, r.text


def test_a_request_over_its_pixel_budget_is_refused_before_decoding(deploy_run, deploy_shards):
    name, data = _face(deploy_shards)
    big = _png(Image.new("L", (700, 700), 128))  # 490 000 pixels: under max_pixels alone, not twice
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, max_pixels=600_000))) as url:
        one = httpx.post(f"{url}/v1/detect/batch", files=[("files", ("big.png", big, "image/png"))])
        assert one.status_code == 200, one.text
        two = httpx.post(f"{url}/v1/detect/batch", files=[("files", (f"big{i}.png", big, "image/png")) for i in range(2)]
                         + [("files", ("broken.png", b"not an image", "image/png"))])
        assert two.status_code == 415 and "broken.png" in two.json()["detail"]  # every header checked first
        two = httpx.post(f"{url}/v1/detect/batch", files=[("files", (f"big{i}.png", big, "image/png")) for i in range(2)])
        assert two.status_code == 413 and "980000 pixels, over the limit of 600000 per request" in two.json()["detail"]


def test_a_png_cut_short_in_its_data_is_refused():
    whole, cut = _raw_png(40, 60, 60), _raw_png(40, 60, 1)
    assert open_upload(whole).size == (40, 60)
    with Image.open(io.BytesIO(cut)) as img:
        img.load()  # Pillow itself takes the 1 row for the whole image
    with pytest.raises(BadImage, match="PNG image is damaged or truncated .*ends before its last row"):
        open_upload(cut)
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):  # whole PNGs of every layout still pass
        assert open_upload(_png(Image.new(mode, (33, 17)))).size == (33, 17)


def test_a_decompression_bomb_names_the_limit_that_fired(deploy_run):
    limit = pillow_pixel_limit()
    bomb = _raw_png(limit // 1000 + 1, 1000, 1)  # over Pillow's own limit: refused when its header is read
    with pytest.raises(BadImage, match=f"decompression bomb.*limit of {limit}") as refused:
        open_upload(bomb, max_pixels=limit + 5000)
    assert refused.value.status == 413 and str(limit + 5000) not in str(refused.value)
    with pytest.raises(UserError, match=f"over Pillow's decompression-bomb limit of {limit}"):
        create_app(ServeOptions(checkpoint=deploy_run, max_pixels=limit + 1))


def test_the_verdict_at_the_threshold_is_real_as_everywhere_else(deploy_run, deploy_shards, tmp_path):
    name, data = _face(deploy_shards)
    files = {"file": (name, data, "image/png")}
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run))) as url:
        p = httpx.post(f"{url}/v1/detect", files=files).json()["fake_probability"]
    run = Path(shutil.copytree(deploy_run, tmp_path / "run"))
    info = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**info, "threshold": p}))
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=run))) as url:
        answer = httpx.post(f"{url}/v1/detect", files=files).json()
    assert answer["fake_probability"] == answer["threshold"] == p and answer["is_fake"] is False  # p > p is false


def test_nan_in_the_models_json_is_null_in_the_model_card(deploy_run, tmp_path):
    run = Path(shutil.copytree(deploy_run, tmp_path / "run"))
    info = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**info, "val_metrics": {"loss": float("nan"), "auroc": 0.9}}))
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=run))) as url:
        card = httpx.get(f"{url}/v1/model")
    assert card.status_code == 200 and card.headers["content-type"] == "application/json"
    assert card.json()["val_metrics"] == {"loss": None, "auroc": 0.9}


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


@pytest.fixture
def served_process(deploy_run):
    """Starts ``deepfake-dist serve ARGS`` in its own process, to measure its memory: returns
    (url, pid) once it answers."""
    procs = []

    def start(*args: str) -> tuple[str, int]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "deepfake_dist", "serve", "--checkpoint", str(deploy_run),
                                 "--port", str(port), *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/healthz").raise_for_status()
                return url, proc.pid
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_a_batch_holds_one_decoded_image_at_a_time(served_process, deploy_shards):
    url, pid = served_process("--max-request-pixels", "400000000")
    name, data = _face(deploy_shards)
    httpx.post(f"{url}/v1/detect", files={"file": (name, data, "image/png")}, timeout=60)
    base = _peak_rss_mb(pid)
    big = _png(Image.new("RGBA", (4000, 4000), (120, 80, 40, 255)))  # 64 MB decoded, a few KB on the wire
    r = httpx.post(f"{url}/v1/detect", files={"file": ("big.png", big, "image/png")}, timeout=120)
    assert r.status_code == 200, r.text
    one = _peak_rss_mb(pid) - base
    r = httpx.post(f"{url}/v1/detect/batch", files=[("files", (f"big{i}.png", big, "image/png")) for i in range(6)],
                   timeout=300)
    assert r.status_code == 200, r.text
    six = _peak_rss_mb(pid) - base
    assert six < one + 64, f"one image raised the peak by {one:.0f} MB, six in a batch by {six:.0f} MB"


def _hostile_client(url: str, uploads: list, stop: float, seen: list) -> None:
    with httpx.Client(timeout=120) as client:
        i = 0
        while time.monotonic() < stop:
            kind, files = uploads[i % len(uploads)]
            path = "/v1/detect/batch" if kind == "batch" else "/v1/detect"
            seen.append(client.post(f"{url}{path}", files=files).status_code)
            i += 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_memory_stays_bounded_under_a_hostile_load(served_process):
    """Sixteen clients for ten seconds against a server with its default limits but a queue of
    8, each sending in turn: 6300 x 6300 16-bit RGBA PNGs (300 KB each, 40 million pixels) alone
    and eight to a batch, a PNG cut to one row of sixty, and garbage. The peak memory of the
    server process stays under the ceiling in docs/reliability.md."""
    url, pid = served_process("--max-queue", "8")
    bomb = _raw_png(6300, 6300, 6300, depth=16, colour=6)
    uploads = [("one", {"file": ("bomb.png", bomb, "image/png")}),
               ("batch", [("files", (f"bomb{i}.png", bomb, "image/png")) for i in range(8)]),
               ("one", {"file": ("cut.png", _raw_png(40, 60, 1), "image/png")}),
               ("one", {"file": ("junk.png", os.urandom(5000), "image/png")})]
    base, seen = _peak_rss_mb(pid), []
    stop = time.monotonic() + 10
    clients = [threading.Thread(target=_hostile_client, args=(url, uploads[i % 4:] + uploads[:i % 4], stop, seen))
               for i in range(16)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    peak = _peak_rss_mb(pid)
    print(f"\nhostile load: {len(seen)} requests {sorted(set(seen))}, peak memory {base:.0f} MB before, "
          f"{peak:.0f} MB under load")
    assert 200 in seen and 503 in seen and all(code < 500 or code == 503 for code in seen)
    assert peak < base + 1024, f"peak memory {peak:.0f} MB, {base:.0f} MB before the load"
