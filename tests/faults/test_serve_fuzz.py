"""Fuzzed requests to the detection server on a real loopback port: images with mutated headers
(PNG, JPEG, WebP, GIF, BMP: bytes overwritten, declared sizes changed, cut, junk appended),
multipart bodies with broken framing (boundaries, part headers, missing fields, a cut body),
sizes around the limits, right and wrong tokens. No answer is a 5xx; every one is JSON and none
holds a traceback or a path of the server's. ``--hypothesis-show-statistics`` counts the answers."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from deploy_setup import live_server, one_thread
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepfake_dist.options import ServeOptions

TOKEN = "fuzz-token"
MAX_BYTES = 20_000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(deploy_run):
    from deepfake_dist.serve.app import create_app

    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, token=TOKEN, max_bytes=MAX_BYTES,
                                                           max_pixels=300_000))) as url:
        yield url, str(deploy_run)


def _encoded(fmt: str) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


VALID = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP")}


def _declared_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """The image with its header's width and height changed (PNG: with a valid CRC)."""
    data = bytearray(data)
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "JPEG" and (sof := data.find(b"\xff\xc0")) > 0:
        data[sof + 5:sof + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    return bytes(data)


@st.composite
def images(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(VALID)))
    data = VALID[fmt]
    if draw(st.booleans()):
        data = _declared_size(data, fmt, draw(st.integers(0, 2 ** 31 - 1)), draw(st.integers(-2 ** 31, 2 ** 31 - 1)))
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):  # mostly in the header
        end = min(len(data), 64) if draw(st.booleans()) else len(data)
        data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    data = bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
    return data + draw(st.binary(max_size=64)) + (b"\0" * MAX_BYTES if draw(st.integers(0, 15)) == 0 else b"")


uploads = st.one_of(images(), images(), st.binary(max_size=2048))
names = st.text(max_size=30).filter(lambda n: "/" not in n)  # a path in a name would be echoed back
tokens = st.sampled_from([f"Bearer {TOKEN}"] * 12 + [f"bearer {TOKEN}", "Bearer wrong", "Basic x", None])


def _check(r: httpx.Response, paths: tuple[str, ...]) -> None:
    event(f"status {r.status_code}")
    assert r.status_code < 500, r.text
    assert r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert r.status_code == 200 or (body["detail"] and body["code"]), body
    assert "Traceback" not in r.text and not any(p in r.text for p in paths), r.text


def _headers(token: str | None) -> dict:
    return {"Authorization": token} if token else {}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(files=st.lists(st.tuples(st.integers(0, 9), names, uploads), min_size=1, max_size=4),
       batch=st.booleans(), explain=st.booleans(), token=tokens)
def test_fuzzed_images_never_get_a_5xx(server, files, batch, explain, token):
    url, run = server
    field = "files" if batch else "file"  # now and then another name
    r = httpx.post(f"{url}/v1/detect{'/batch' if batch else ''}", params={"explain": str(explain).lower()},
                   files=[(field if other else "x", (name or "f", data, "application/octet-stream"))
                          for other, name, data in files], headers=_headers(token), timeout=60)
    _check(r, (run, str(ROOT), "site-packages"))


@st.composite
def multipart(draw) -> tuple[bytes, str]:
    """A multipart body and its Content-Type, framed right or broken in one of many ways."""
    boundary = draw(st.text("abcXYZ0123456789'()+_,-.:=?", min_size=1, max_size=70)).encode()
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"file", b"files", b"x", b""]))
        filename = draw(st.one_of(st.none(), names.map(lambda n: n.encode("utf-8")), st.binary(max_size=20)))
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename is not None else b"")
        headers = draw(st.sampled_from([b"Content-Disposition: " + disposition, b"Content-Disposition: " + disposition
                                        + b"\r\nContent-Type: image/png", b"X-Junk: 1", b"", b"Content-Disposition"]))
        body += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + draw(uploads) + b"\r\n"
    body += draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"--" + boundary, b"", b"--" + boundary + b"\r\n"]))
    if draw(st.booleans()):
        body = body.replace(b"\r\n", b"\n") if draw(st.booleans()) else body[:draw(st.integers(0, len(body)))]
    if draw(st.booleans()) and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + draw(st.binary(min_size=1, max_size=16)) + body[at + 1:]
    content_type = draw(st.sampled_from([b"multipart/form-data; boundary=" + boundary,
                                         b'multipart/form-data; boundary="' + boundary + b'"', b"multipart/form-data",
                                         b"multipart/form-data; boundary=other", b"text/plain", b"application/json"]))
    return body, content_type.decode("latin-1")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(request=multipart(), batch=st.booleans(), token=tokens)
def test_fuzzed_multipart_framing_never_gets_a_5xx(server, request, batch, token):
    url, run = server
    body, content_type = request
    r = httpx.post(f"{url}/v1/detect{'/batch' if batch else ''}", content=body,
                   headers={"Content-Type": content_type, **_headers(token)}, timeout=60)
    _check(r, (run, str(ROOT), "site-packages"))
