"""The detection server on a real loopback port: answers, concurrency, limits, token (fuzzing and
hostile clients: tests/faults/test_serve_fuzz.py, test_serve_faults.py)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from deploy_setup import live_server, one_thread
from PIL import Image

from deepfake_dist.options import ExportOptions, ServeOptions

TOKEN = "s3cret-token"
MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(deploy_run):
    from deepfake_dist.serve.app import create_app

    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, max_bytes=MAX_BYTES,
                                                           max_pixels=MAX_PIXELS))) as url:
        yield url


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _test_images(folder, label: str, n: int) -> list[tuple[str, bytes]]:
    """The last files of a label: the ones the 0.5/0.1/0.4 split most likely put in test."""
    files = sorted((folder / label).glob("*.png"))[-n:]
    return [(f.name, f.read_bytes()) for f in files]


def _detect(url: str, name: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/detect", files={"file": (name, data, "image/png")}, params=params, timeout=60)


def test_real_and_fake_images_get_ordered_answers(server, deploy_shards):
    folder = deploy_shards[1]
    reals, fakes = _test_images(folder, "real", 5), _test_images(folder, "fake", 5)
    answers = {}
    for label, images in (("real", reals), ("fake", fakes)):
        for name, data in images:
            r = _detect(server, name, data)
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) >= {"fake_probability", "is_fake", "threshold", "model", "latency_ms"}
            assert body["model"] == "cnn" and body["threshold"] == 0.5 and body["latency_ms"] > 0
            answers[(label, name)] = body
    real_p = [a["fake_probability"] for (label, _), a in answers.items() if label == "real"]
    fake_p = [a["fake_probability"] for (label, _), a in answers.items() if label == "fake"]
    assert min(fake_p) > max(real_p)  # every fake scores above every real face
    correct = sum(a["is_fake"] == (label == "fake") for (label, _), a in answers.items())
    assert correct >= 9

    # the batch endpoint gives the same numbers
    r = httpx.post(f"{server}/v1/detect/batch", files=[("files", (n, d, "image/png")) for n, d in reals + fakes],
                   timeout=60)
    assert r.status_code == 200, r.text
    batch = r.json()["results"]
    assert [b["filename"] for b in batch] == [n for n, _ in reals + fakes]
    singles = [answers[("real", n)] for n, _ in reals] + [answers[("fake", n)] for n, _ in fakes]
    np.testing.assert_allclose([b["fake_probability"] for b in batch], [s["fake_probability"] for s in singles],
                               atol=1e-5)


def test_explain_returns_a_gradcam_overlay_png(server, deploy_shards):
    name, data = _test_images(deploy_shards[1], "fake", 1)[0]
    r = _detect(server, name, data, explain="true")
    assert r.status_code == 200, r.text
    overlay = Image.open(io.BytesIO(base64.b64decode(r.json()["gradcam_png"])))
    assert overlay.format == "PNG" and overlay.size == (256, 256) and overlay.mode == "RGB"
    pixels = np.asarray(overlay).astype(int)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 30).any()  # coloured heat on a grey face


def test_twenty_concurrent_clients_all_get_the_same_answer(server, deploy_shards):
    name, data = _test_images(deploy_shards[1], "real", 1)[0]
    expected = _detect(server, name, data).json()["fake_probability"]
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: _detect(server, name, data), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert all(abs(r.json()["fake_probability"] - expected) < 1e-6 for r in responses)


def _bomb() -> bytes:
    """A PNG that is tiny on the wire but 2000 x 2000 = 4 million pixels when decoded."""
    return _png(Image.new("L", (2000, 2000)))


@pytest.mark.parametrize("case, status, code", [
    ("not an image", 415, "unsupported_format"),
    ("truncated png", 400, "bad_image"),
    ("truncated jpeg header", 415, "unsupported_format"),
    ("gif", 415, "unsupported_format"),
    ("empty file", 400, "bad_image"),
    ("too many pixels", 413, "too_large"),
    ("too many bytes", 413, "too_large"),
    ("missing field", 422, "invalid_request"),
    ("not multipart", 422, "invalid_request"),
    ("broken multipart", 400, "bad_request"),
])
def test_bad_uploads_get_a_4xx_json_error(server, deploy_shards, case, status, code):
    good = _test_images(deploy_shards[1], "real", 1)[0][1]
    jpeg = _png(Image.open(io.BytesIO(good)), "JPEG")
    uploads = {
        "not an image": b"hello, this is text",
        "truncated png": good[: len(good) // 2],
        "truncated jpeg header": jpeg[:8],
        "gif": _png(Image.new("L", (8, 8)), "GIF"),
        "empty file": b"",
        "too many pixels": _bomb(),
        "too many bytes": np.random.default_rng(0).integers(0, 256, MAX_BYTES + 10, dtype=np.uint8).tobytes(),
    }
    if case in uploads:
        r = _detect(server, "x.png", uploads[case])
    elif case == "missing field":
        r = httpx.post(f"{server}/v1/detect", files={"image": ("x.png", good, "image/png")})
    elif case == "not multipart":
        r = httpx.post(f"{server}/v1/detect", json={"file": "x"})
    else:
        r = httpx.post(f"{server}/v1/detect", content=b"--zz\r\ngarbage",
                       headers={"content-type": "multipart/form-data; boundary=yy"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["code"] == code and r.json()["detail"]


def test_batch_limits(server, deploy_shards):
    name, data = _test_images(deploy_shards[1], "real", 1)[0]
    r = httpx.post(f"{server}/v1/detect/batch", files=[("files", (name, data, "image/png"))] * 33)
    assert r.status_code == 413 and "at most 32" in r.json()["detail"]
    r = httpx.post(f"{server}/v1/detect/batch",
                   files=[("files", (name, data, "image/png")), ("files", ("bad.png", b"nope", "image/png"))])
    assert r.status_code == 415 and "bad.png" in r.json()["detail"]


def test_model_card_health_and_docs(server, deploy_run):
    import json

    card = httpx.get(f"{server}/v1/model").json()
    info = json.loads((deploy_run / "model.json").read_text())
    assert card["name"] == "cnn" and card["backend"] == "pytorch" and card["threshold"] == 0.5
    assert card["manifests"] == info["manifests"] and card["parameters"] > 1000 and len(card["version"]) == 12
    assert card["limits"]["max_bytes"] == MAX_BYTES and card["explain"] is True
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    assert "/v1/detect" in httpx.get(f"{server}/openapi.json").json()["paths"]
    assert httpx.get(f"{server}/docs").status_code == 200
    assert "Drop" in httpx.get(f"{server}/").text


def test_bearer_token_is_enforced(deploy_run, deploy_shards):
    from deepfake_dist.serve.app import create_app

    name, data = _test_images(deploy_shards[1], "real", 1)[0]
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, token=TOKEN))) as url:
        files = {"file": (name, data, "image/png")}
        assert httpx.post(f"{url}/v1/detect", files=files).status_code == 401
        wrong = httpx.post(f"{url}/v1/detect", files=files, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/model").status_code == 401
        ok = httpx.post(f"{url}/v1/detect", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and 0 <= ok.json()["fake_probability"] <= 1
        assert httpx.get(f"{url}/healthz").status_code == 200  # liveness stays open


def test_face_crop_is_reported(deploy_run):
    from skimage.data import astronaut

    from deepfake_dist.serve.app import create_app

    portrait = _png(Image.fromarray(astronaut()))
    blank = _png(Image.new("RGB", (64, 64), (120, 120, 120)))
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run, face_crop=True))) as url:
        face = _detect(url, "astronaut.png", portrait).json()["face"]
        assert face["detected"] and face["faces"] >= 1
        x, y, w, h = face["box"]
        assert 100 < x + w / 2 < 300 and 40 < y + h / 2 < 200  # Eileen Collins' face, upper middle
        assert _detect(url, "blank.png", blank).json()["face"] == {"detected": False, "faces": 0, "box": None}


def test_onnx_backend_gives_the_pytorch_answers(deploy_run, deploy_shards, tmp_path):
    from deepfake_dist.deploy.onnx_export import export_onnx
    from deepfake_dist.serve.app import create_app

    export_onnx(ExportOptions(checkpoint=deploy_run, onnx=tmp_path / "model.onnx"))
    images = _test_images(deploy_shards[1], "fake", 2) + _test_images(deploy_shards[1], "real", 2)
    files = [("files", (n, d, "image/png")) for n, d in images]
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run))) as torch_url, \
            live_server(create_app(ServeOptions(checkpoint=tmp_path / "model.onnx", onnx=True))) as onnx_url:
        expected = [r["fake_probability"] for r in httpx.post(f"{torch_url}/v1/detect/batch", files=files).json()["results"]]
        got = [r["fake_probability"] for r in httpx.post(f"{onnx_url}/v1/detect/batch", files=files).json()["results"]]
        assert httpx.get(f"{onnx_url}/v1/model").json()["backend"] == "onnxruntime"
        r = _detect(onnx_url, *images[0], explain="true")  # no safetensors next to the .onnx file
        assert r.status_code == 400 and "safetensors" in r.json()["detail"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_serve_cli_refuses_what_it_cannot_serve(tmp_path, deploy_run, capsys):
    from deepfake_dist.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--checkpoint", str(deploy_run), "--onnx"]) == 2  # no model.onnx exported there
    assert "deepfake-dist export" in capsys.readouterr().err
