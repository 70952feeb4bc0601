"""The detection HTTP API and its web page (FastAPI + uvicorn).

``create_app(checkpoint, ...)`` builds the app; ``serve(...)`` runs it (``deepfake-dist serve``).

- ``POST /v1/detect`` (multipart field ``file``) -> fake_probability, is_fake, threshold, model,
  latency_ms (+ ``face`` with face cropping; + ``gradcam_png``, a base64 PNG overlay, with
  ``?explain=true``); ``POST /v1/detect/batch`` (fields ``files``) -> one result per image;
  ``GET /v1/model``; ``GET /healthz``; OpenAPI at ``/docs``; the page at ``/``.
- Uploads are untrusted: the body size is capped before it is read, each image's bytes and
  pixel count are checked before it is decoded, only JPEG/PNG/WebP/BMP are decoded, and every
  problem is a 4xx JSON ``{"detail": ..., "code": ...}``, never a 500.
- Preprocessing is ``inference.model_input``: the exact training preprocessing.
"""

from __future__ import annotations

import base64
import hmac
import io
import time
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfake_dist import __version__
from deepfake_dist.data.imageio import center_crop_resize, to_mode
from deepfake_dist.inference import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    FACE_MARGIN,
    BadImage,
    in_channels,
    largest_face,
    model_input,
    open_upload,
)
from deepfake_dist.serve.detector import load_served

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_BATCH = 32  # images per /v1/detect/batch request
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the images' bytes
OVERLAY_SIZE = 256  # pixels of the square Grad-CAM overlay
Explain = Annotated[bool, Query(description="add a Grad-CAM overlay of what drove the verdict (base64 PNG)")]


def _error(status: int, detail: str, code: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit(path)`` bytes gets a 413 JSON answer, from
    its Content-Length before anything is read, or as soon as a streamed body passes the limit."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = _error(413, f"request body over {limit} bytes", "too_large") if length.isdigit() else \
                _error(400, "bad Content-Length header", "bad_request")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
            return message

        return await self.app(scope, counted, send)


def create_app(checkpoint: str | Path, onnx: bool = False, token: str | None = None, max_bytes: int = 10_000_000,
               max_pixels: int = DEFAULT_MAX_PIXELS, face_crop: bool = False) -> FastAPI:
    """The app for one detector (loaded now, so a bad checkpoint fails at start-up)."""
    served = load_served(checkpoint, onnx=onnx)
    name = served.info["model"]
    margin = (served.info.get("video") or {}).get("margin", FACE_MARGIN)  # crop faces as its training sets were
    app = FastAPI(title="deepfake_dist detector", version=__version__,
                  description=f"Real-vs-fake face detection with '{name}' ({served.backend}). "
                              f"Send a JPEG, PNG, WebP or BMP image as multipart field 'file'.")
    app.add_middleware(BodyLimit, limit=lambda path: (max_bytes * (MAX_BATCH if path.endswith("/batch") else 1)
                                                      + MULTIPART_OVERHEAD))

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage):
        return _error(exc.status, str(exc), {413: "too_large", 415: "unsupported_format"}.get(exc.status, "bad_image"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return _error(exc.status_code, str(exc.detail), codes.get(exc.status_code, "bad_request"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, f"invalid request ({problems}); send multipart/form-data with the image in "
                           f"field 'file' (or 'files' for /v1/detect/batch)", "invalid_request")

    def authorized(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'")

    async def read_upload(upload: UploadFile, label: str) -> bytes:
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise BadImage(f"{label}: over the {max_bytes}-byte limit per image", 413)
        return data

    def detect(uploads: list[bytes], names: list[str], explain: bool) -> list[dict]:
        """Decode, crop, score (and explain): CPU work, run in the thread pool."""
        start = time.perf_counter()
        images = [open_upload(data, max_pixels, label) for data, label in zip(uploads, names)]
        faces = [largest_face(img, margin) if face_crop else (img, None) for img in images]
        inputs = torch.stack([model_input(crop, served.info) for crop, _ in faces])
        probabilities = served.probabilities(inputs)
        heat = served.explain(inputs) if explain else None
        latency = (time.perf_counter() - start) * 1000
        results = []
        for i, ((crop, face), p) in enumerate(zip(faces, probabilities)):
            row = {"filename": names[i], "fake_probability": p, "is_fake": p >= served.threshold,
                   "threshold": served.threshold, "model": name, "latency_ms": latency}
            if face is not None:
                row["face"] = face
            if heat is not None:
                row["gradcam_png"] = _overlay_png(crop, heat[i])
            results.append(row)
        return results

    def explainable(explain: bool) -> bool:
        if explain and served.torch_model is None:
            raise HTTPException(400, "explain=true needs the PyTorch weights: put model.safetensors next to the "
                                     "ONNX file, or serve without --onnx")
        return explain

    @app.post("/v1/detect", dependencies=[Depends(authorized)], summary="Score one image")
    async def detect_one(file: Annotated[UploadFile, File(description="JPEG, PNG, WebP or BMP image")],
                         explain: Explain = False):
        explain = explainable(explain)
        label = file.filename or "upload"
        return (await run_in_threadpool(detect, [await read_upload(file, label)], [label], explain))[0]

    @app.post("/v1/detect/batch", dependencies=[Depends(authorized)], summary=f"Score up to {MAX_BATCH} images")
    async def detect_batch(files: Annotated[list[UploadFile], File(description="images, repeated field 'files'")],
                           explain: Explain = False):
        explain = explainable(explain)
        if len(files) > MAX_BATCH:
            raise HTTPException(413, f"{len(files)} images in one request; send at most {MAX_BATCH}")
        names = [f.filename or f"upload-{i}" for i, f in enumerate(files)]
        uploads = [await read_upload(f, label) for f, label in zip(files, names)]
        return {"results": await run_in_threadpool(detect, uploads, names, explain)}

    @app.get("/v1/model", dependencies=[Depends(authorized)], summary="What is being served")
    def model_card():
        info = served.info
        return {"name": name, "version": served.version, "package_version": info.get("package_version"),
                "backend": served.backend, "parameters": served.parameters, "threshold": served.threshold,
                "temperature": served.temperature, "resolution": info.get("resolution"),
                "in_channels": in_channels(info), "normalize": info.get("normalize"),
                "manifests": info.get("manifests", {}), "step": info.get("step"),
                "val_metrics": info.get("val_metrics", {}), "explain": served.torch_model is not None,
                "face_crop": face_crop, "limits": {"max_bytes": max_bytes, "max_pixels": max_pixels,
                                                   "max_batch": MAX_BATCH, "formats": list(ACCEPTED_FORMATS)}}

    @app.get("/healthz", summary="Liveness")
    def healthz():
        return {"status": "ok", "model": name, "backend": served.backend}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return PAGE.read_text()

    app.state.served = served
    return app


def _overlay_png(face: Image.Image, heat) -> str:
    from deepfake_dist.evaluation.gradcam import overlay

    picture = center_crop_resize(to_mode(face, "RGB"), OVERLAY_SIZE)  # the square the model saw, larger
    buf = io.BytesIO()
    overlay(picture, heat).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def serve(checkpoint: str | Path, onnx: bool = False, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, max_bytes: int = 10_000_000, max_pixels: int | None = None,
          face_crop: bool = False) -> None:
    import uvicorn

    app = create_app(checkpoint, onnx=onnx, token=token, max_bytes=max_bytes,
                     max_pixels=max_pixels or DEFAULT_MAX_PIXELS, face_crop=face_crop)
    uvicorn.run(app, host=host, port=port, log_level="info")
