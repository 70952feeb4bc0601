"""The detection HTTP API and its web page (FastAPI + uvicorn).

``create_app(ServeOptions(checkpoint=...))`` builds the app; ``serve`` runs it (``deepfake-dist serve``).

- ``POST /v1/detect`` (multipart field ``file``) -> fake_probability, is_fake, threshold, model,
  latency_ms (+ ``face`` with face cropping; + ``gradcam_png``, a base64 PNG overlay, with
  ``?explain=true``); ``POST /v1/detect/batch`` (fields ``files``) -> one result per image;
  ``GET /v1/model``; ``GET /healthz``; OpenAPI at ``/docs``; the page at ``/``.
- Uploads are untrusted. Before any byte of the body is read, a request to ``/v1/`` without the
  token gets a 401, one whose Content-Length is over the cap a 413, and a detection request
  while ``max_concurrent`` are being scored and ``max_queue`` wait a 503 with ``Retry-After``.
  Then the images' headers are checked (format, pixels per image and per request) before any
  is decoded; each image is then decoded alone (a large JPEG at a reduced scale, see
  ``data.uploads.open_upload``) and made the model's input at once, so memory is bounded by
  ``max_concurrent`` decoded images. Every problem is a JSON ``{"detail": ..., "code": ...}``,
  never a traceback or a path.
- The model is ``deploy.scorer.Scorer``, the one ``predict`` scores with: the exact training
  preprocessing, the same probabilities, and fake when ``p > threshold``.
- A model that scores clips or their sound (``temporal``, ``audio``, ``av``) takes a video on
  ``/v1/detect`` instead (one a request): its bytes are capped (``max_video_bytes``, 413) and its
  length is read from the container before any frame is decoded (over ``max_video_seconds``: 413;
  not a video: 415); it is then scored as ``predict`` scores a video (clips, faces, sound), with
  each head's probability for a model with several, and a video with no usable face or sound is a 422.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfake_dist import __version__
from deepfake_dist.atomic import finite
from deepfake_dist.data.faces import STILL_MARGIN, VideoError, largest_face
from deepfake_dist.data.imageio import center_crop_resize, to_mode
from deepfake_dist.data.uploads import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    REDUCE_GAP,
    BadImage,
    image_size,
    open_upload,
    pillow_pixel_limit,
    video_seconds,
)
from deepfake_dist.deploy.scorer import Scorer, load_scorer
from deepfake_dist.errors import UserError
from deepfake_dist.models.exported import in_channels
from deepfake_dist.options import ServeOptions

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_BATCH = 32  # images per /v1/detect/batch request
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the images' bytes
OVERLAY_SIZE = 256  # pixels of the square Grad-CAM overlay
FACE_SEARCH_SIDE = 1024  # with face cropping, a JPEG is decoded no smaller than this (the face detector's view)
RETRY_AFTER_S = 1  # what a client refused for a full queue is told to wait
TOKEN_ENV = "DEEPFAKE_DIST_TOKEN"
Explain = Annotated[bool, Query(description="add a Grad-CAM overlay of what drove the verdict (base64 PNG)")]


def _error(status: int, detail: str, code: str, headers: dict | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


class Gate:
    """ASGI middleware: what is refused before the body is read. In order: a ``/v1/`` request
    without the bearer ``token`` (401); a body over ``limit(path)`` bytes (413, from its
    Content-Length, or as soon as a streamed body passes it); a detection request when
    ``capacity`` of them are in progress already (503 + Retry-After)."""

    def __init__(self, app, limit, token: str | None, capacity: int):
        self.app, self.limit, self.token, self.capacity = app, limit, token, capacity
        self.in_progress = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        limit, seen = self.limit(scope["path"]), 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
            return message

        if not scope["path"].startswith("/v1/detect"):
            return await self.app(scope, counted, send)
        self.in_progress += 1
        try:
            return await self.app(scope, counted, send)
        finally:
            self.in_progress -= 1

    def _refusal(self, scope) -> JSONResponse | None:
        headers, path = dict(scope["headers"]), scope["path"]
        if self.token is not None and path.startswith("/v1/"):
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return _error(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'", "unauthorized")
        length, limit = headers.get(b"content-length"), self.limit(path)
        if length is not None and not length.isdigit():
            return _error(400, "bad Content-Length header", "bad_request")
        if length is not None and int(length) > limit:
            return _error(413, f"request body over {limit} bytes", "too_large")
        if path.startswith("/v1/detect") and self.in_progress >= self.capacity:
            return _error(503, f"busy: {self.capacity} detection requests in progress; retry in {RETRY_AFTER_S} s",
                          "busy", {"Retry-After": str(RETRY_AFTER_S)})
        return None


@dataclass
class Detection:
    """A request's images checked, decoded one at a time, scored (and explained): CPU work, run
    in the thread pool. ``min_side``: how small a JPEG may be decoded (``data.uploads.open_upload``)."""

    served: Scorer
    max_bytes: int
    max_pixels: int
    request_pixels: int
    min_side: int
    face_crop: bool
    margin: float

    def __call__(self, uploads: list[UploadFile], names: list[str], explain: bool) -> list[dict]:
        start = time.perf_counter()
        self.check(uploads, names)
        inputs, faces, pictures = zip(*(self.model_input(u, label, explain) for u, label in zip(uploads, names)))
        inputs = torch.stack(inputs)
        probabilities = self.served.probabilities(inputs).tolist()
        nan = [label for label, p in zip(names, probabilities) if p != p]  # NaN is the one value unequal to itself
        if nan:
            raise HTTPException(500, f"the model scored NaN for {', '.join(nan[:5])}: it is broken; serve another")
        heat = self.served.explain(inputs) if explain else None
        latency = (time.perf_counter() - start) * 1000
        results = []
        for i, (face, p) in enumerate(zip(faces, probabilities)):
            row = {"filename": names[i], "fake_probability": p, "is_fake": p > self.served.threshold,
                   "threshold": self.served.threshold, "model": self.served.info["model"], "latency_ms": latency}
            if face is not None:
                row["face"] = face
            if heat is not None:
                row["gradcam_png"] = _overlay_png(pictures[i], heat[i])
            results.append(row)
        return results

    def read(self, upload: UploadFile, label: str) -> bytes:
        upload.file.seek(0)
        data = upload.file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise BadImage(f"{label}: over the {self.max_bytes}-byte limit per image", 413)
        return data

    def check(self, uploads: list[UploadFile], names: list[str]) -> None:
        """Every image's size, format and pixels from its header, before any is decoded."""
        total = 0
        for upload, label in zip(uploads, names):
            width, height = image_size(self.read(upload, label), self.max_pixels, label)
            total += width * height
        if total > self.request_pixels:
            raise BadImage(f"the images of this request hold {total} pixels, over the limit of {self.request_pixels} "
                           "per request; send fewer or smaller images", 413)

    def model_input(self, upload: UploadFile, label: str, explain: bool) -> tuple[torch.Tensor, dict | None, Image.Image | None]:
        """One image decoded and made the model's input, its face (with face cropping) and, with
        ``explain``, the small picture its overlay is drawn on; the decoded image is let go on return."""
        img = open_upload(self.read(upload, label), self.max_pixels, label, self.min_side)
        crop, face = largest_face(img, self.margin) if self.face_crop else (img, None)
        picture = center_crop_resize(to_mode(crop, "RGB"), OVERLAY_SIZE) if explain else None
        return self.served.input(crop), face, picture


@dataclass
class VideoDetection:
    """One uploaded video: its size and length checked before any frame is decoded, written to a
    temporary file (the decoders read files), scored with ``Scorer.score_video`` and deleted."""

    served: Scorer
    max_bytes: int
    max_seconds: float

    def __call__(self, uploads: list[UploadFile], names: list[str], explain: bool) -> list[dict]:
        if len(uploads) != 1 or explain:
            raise HTTPException(400, "this model scores one video a request, without explain: POST it to /v1/detect")
        start, upload, name = time.perf_counter(), uploads[0], names[0]
        upload.file.seek(0)
        data = upload.file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise BadImage(f"{name}: over the {self.max_bytes}-byte limit per video", 413)
        with tempfile.TemporaryDirectory(prefix="deepfake-dist-upload-") as folder:
            path = Path(folder) / "upload"
            path.write_bytes(data)
            seconds = video_seconds(path, name)
            if seconds > self.max_seconds:
                raise BadImage(f"{name}: {seconds:.1f} s long, over the limit of {self.max_seconds:g} s per video", 413)
            try:
                found = self.served.score_video(path)
            except (VideoError, ValueError) as err:  # no face, too short, no sound for a model of the sound
                raise BadImage(f"{name}: cannot be scored: {err}", 422) from None
        p = found.pop("probability")
        if p != p:  # NaN is the one value unequal to itself
            raise HTTPException(500, f"the model scored NaN for {name}: it is broken; serve another")
        return [{"filename": name, "fake_probability": p, "is_fake": p > self.served.threshold,
                 "threshold": self.served.threshold, "model": self.served.info["model"], "seconds": round(seconds, 3),
                 "latency_ms": (time.perf_counter() - start) * 1000, **found}]


def create_app(opts: ServeOptions) -> FastAPI:
    """The app for one detector (loaded now, so a bad checkpoint fails at start-up). At most
    ``max_concurrent`` requests decode and score at once, ``max_queue`` more wait; the images of
    one request hold at most ``max_request_pixels`` pixels (default: ``max_pixels``). The token
    comes from ``resolve_token``."""
    token, max_pixels = resolve_token(opts.token, opts.token_file), opts.max_pixels or DEFAULT_MAX_PIXELS
    _check_limits(token, max_pixels, opts.max_concurrent, opts.max_queue)
    served = load_scorer(opts.checkpoint, onnx=opts.onnx)
    videos = bool(served.info.get("frames")) or served.io[0] != ("image",)  # it scores clips or their sound
    limits = {"max_concurrent": opts.max_concurrent, "max_queue": opts.max_queue}
    if videos:
        detection = VideoDetection(served, opts.max_video_bytes, opts.max_video_seconds)
        limits.update(max_video_bytes=opts.max_video_bytes, max_video_seconds=opts.max_video_seconds)
        upload_limit, what = opts.max_video_bytes, "a video (mp4, mov, mkv, webm, ...)"
    else:
        min_side = REDUCE_GAP * int(served.info["resolution"])
        detection = Detection(served, opts.max_bytes, max_pixels, opts.max_request_pixels or max_pixels,
                              max(min_side, FACE_SEARCH_SIDE) if opts.face_crop else min_side, opts.face_crop,
                              (served.info.get("video") or {}).get("margin", STILL_MARGIN))  # crop faces as its sets were
        limits.update(max_bytes=opts.max_bytes, max_pixels=max_pixels, max_request_pixels=detection.request_pixels,
                      max_batch=MAX_BATCH, formats=list(ACCEPTED_FORMATS))
        upload_limit, what = opts.max_bytes, "a JPEG, PNG, WebP or BMP image"
    app = FastAPI(title="deepfake_dist detector", version=__version__,
                  description=f"Real-vs-fake face detection with '{served.info['model']}' ({served.backend}). "
                              f"Send {what} as multipart field 'file'.")
    app.add_middleware(Gate, limit=lambda path: (upload_limit * (MAX_BATCH if path.endswith("/batch") and not videos
                                                                 else 1) + MULTIPART_OVERHEAD),
                       token=token, capacity=opts.max_concurrent + opts.max_queue)
    _add_error_handlers(app)
    _add_detection(app, detection, opts.max_concurrent)
    _add_description(app, served, {"face_crop": opts.face_crop, "accepts": "video" if videos else "image",
                                   "limits": limits})
    app.state.served = served
    return app


def _add_detection(app: FastAPI, detection: Detection, max_concurrent: int) -> None:
    """The two detection endpoints; ``max_concurrent`` requests at a time decode and score."""
    slots = asyncio.Semaphore(max_concurrent)

    async def scored(uploads: list[UploadFile], names: list[str], explain: bool) -> list[dict]:
        if explain and detection.served.model is None:
            raise HTTPException(400, "explain=true needs the PyTorch weights: put model.safetensors next to the "
                                     "ONNX file, or serve without --onnx")
        async with slots:
            return await run_in_threadpool(detection, uploads, names, explain)

    @app.post("/v1/detect", summary="Score one image")
    async def detect_one(file: Annotated[UploadFile, File(description="JPEG, PNG, WebP or BMP image")],
                         explain: Explain = False):
        return (await scored([file], [file.filename or "upload"], explain))[0]

    @app.post("/v1/detect/batch", summary=f"Score up to {MAX_BATCH} images")
    async def detect_batch(files: Annotated[list[UploadFile], File(description="images, repeated field 'files'")],
                           explain: Explain = False):
        if len(files) > MAX_BATCH:
            raise HTTPException(413, f"{len(files)} images in one request; send at most {MAX_BATCH}")
        return {"results": await scored(files, [f.filename or f"upload-{i}" for i, f in enumerate(files)], explain)}


def _add_description(app: FastAPI, served: Scorer, serving: dict) -> None:
    """What is served (``/v1/model``, with ``serving``: face cropping and the limits), liveness
    and the web page."""
    name = served.info["model"]

    @app.get("/v1/model", summary="What is being served")
    def model_card():
        info = served.info
        return finite({
            "name": name, "version": served.version, "package_version": info.get("package_version"),
            "backend": served.backend, "parameters": served.parameters, "threshold": served.threshold,
            "temperature": served.temperature, "resolution": info.get("resolution"),
            "in_channels": in_channels(info), "normalize": info.get("normalize"),
            "manifests": info.get("manifests", {}), "step": info.get("step"),
            "val_metrics": info.get("val_metrics", {}), "explain": served.model is not None, **serving})

    @app.get("/healthz", summary="Liveness")
    def healthz():
        return {"status": "ok", "model": name, "backend": served.backend}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return PAGE.read_text()


def _check_limits(token: str | None, max_pixels: int, max_concurrent: int, max_queue: int) -> None:
    if token is not None and not token.strip():
        raise UserError("the token is empty: any 'Bearer' header would pass; give a non-empty token, or none to "
                        "serve without one")
    limit = pillow_pixel_limit()
    if limit is not None and max_pixels > limit:
        raise UserError(f"--max-pixels {max_pixels} is over Pillow's decompression-bomb limit of {limit} pixels, "
                        "which refuses such images anyway; give at most that")
    if max_concurrent < 1 or max_queue < 0:
        raise UserError(f"--max-concurrent must be at least 1 and --max-queue at least 0 "
                        f"(got {max_concurrent} and {max_queue})")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"detail", "code"}``; an unexpected one without its traceback."""

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage):
        codes = {413: "too_large", 415: "unsupported_format", 422: "unscorable"}
        return _error(exc.status, str(exc), codes.get(exc.status, "bad_image"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
                 500: "model_error"}
        return _error(exc.status_code, str(exc.detail), codes.get(exc.status_code, "bad_request"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, f"invalid request ({problems}); send multipart/form-data with the image in "
                           f"field 'file' (or 'files' for /v1/detect/batch)", "invalid_request")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # logged by uvicorn; the client learns nothing of it
        return _error(500, "internal error; the server log says more", "internal_error")


def _overlay_png(picture: Image.Image, heat) -> str:
    """The Grad-CAM heat map over ``picture`` (the square the model saw, at ``OVERLAY_SIZE``), as base64 PNG."""
    from deepfake_dist.evaluation.gradcam import overlay

    buf = io.BytesIO()
    overlay(picture, heat).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def resolve_token(token: str | None, token_file: str | Path | None) -> str | None:
    """The bearer token from ``--token``, else the file ``--token-file`` (its first line), else
    the environment variable ``DEEPFAKE_DIST_TOKEN``; None when none is given. A file or the
    variable keeps the token out of ``ps``, which shows a command line to every user."""
    if token is not None and token_file is not None:
        raise UserError("give the token once: --token or --token-file, not both")
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--token-file {token_file}: cannot read it ({e})") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise UserError(f"--token-file {token_file}: the file is empty; write the token on its first line")
    return token if token is not None else os.environ.get(TOKEN_ENV)


def serve(opts: ServeOptions) -> None:
    """``deepfake-dist serve``: the app on ``host:port`` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(opts), host=opts.host, port=opts.port, log_level="info")
