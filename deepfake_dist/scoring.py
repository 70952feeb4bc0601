"""Score your own files with an exported detector: images, folders of them, and videos.

Images go through ``inference.model_input`` (the training preprocessing: prepare's crop and
resize, then the eval transform), the same function the HTTP server uses. A video is sampled at
evenly spaced frames; on each, OpenCV's Haar cascade finds the largest face, cropped with a
margin (frames with no face are skipped and counted), and the video's probability is the mean
over its faces. Probabilities are ``sigmoid(logit / temperature)`` with the temperature
``evaluate`` fitted on validation (1 until then); the verdict compares them with the stored
threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepfake_dist.data import imageio
from deepfake_dist.errors import UserError
from deepfake_dist.exported import load_exported
from deepfake_dist.inference import model_input

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
FACE_MARGIN = 0.25  # of the face box, added on every side before the square crop


@dataclass
class Scorer:
    """An exported detector and what is needed to feed it files."""

    model: torch.nn.Module
    info: dict  # the model's JSON, plus ``in_channels``

    @property
    def threshold(self) -> float:
        return float(self.info.get("threshold", 0.5))

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", 1.0))

    def input(self, image: Image.Image) -> torch.Tensor:
        return model_input(image, self.info)

    @torch.no_grad()
    def probabilities(self, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Probability of fake for a stack of model inputs (B, C, H, W)."""
        logits = torch.cat([self.model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
        return torch.sigmoid(logits.float() / self.temperature)


def load_scorer(checkpoint: str | Path) -> Scorer:
    model, info = load_exported(checkpoint)
    if info.get("kind") != "detector":
        raise UserError(f"{checkpoint}: holds a {info.get('kind', 'unknown')} model, not a detector; "
                        "pass a detector's run folder or model.safetensors")
    info = {**info, "in_channels": int(info.get("build_args", {}).get("in_channels", info.get("in_channels", 3)))}
    return Scorer(model, info)


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def collect_files(paths: list[str | Path]) -> list[Path]:
    """The files named, plus the images and videos under each folder named (recursive, sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if imageio.is_image_file(p) or is_video_file(p))
            if not found:
                raise UserError(f"{path}: no images ({', '.join(imageio.IMAGE_EXTENSIONS)}) or videos "
                                f"({', '.join(VIDEO_EXTENSIONS)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def video_faces(path: Path, frames: int = 16) -> tuple[list[Image.Image], int]:
    """Face crops (RGB) from ``frames`` evenly spaced frames, and how many frames had no face."""
    try:
        import cv2
    except ImportError:
        raise UserError(f"{path}: scoring videos needs OpenCV: pip install 'deepfake_dist[video]'") from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError("OpenCV cannot open this video")
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    wanted = sorted(set(np.linspace(0, max(total - 1, 0), frames).round().astype(int).tolist()))
    faces, missed = [], 0
    try:
        for index in wanted:
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)
            ok, frame = capture.read()
            if not ok:
                continue
            grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            boxes = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
            if len(boxes) == 0:
                missed += 1
                continue
            x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
            m = int(FACE_MARGIN * max(w, h))
            crop = frame[max(y - m, 0):y + h + m, max(x - m, 0):x + w + m]
            faces.append(Image.fromarray(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)))
    finally:
        capture.release()
    if not faces and not missed:
        raise ValueError("no frame could be read")
    return faces, missed


def _row(scorer: Scorer, path: Path, kind: str, probability: float | None, **extra) -> dict:
    verdict = None if probability is None else ("fake" if probability > scorer.threshold else "real")
    return {"path": str(path), "kind": kind, "probability": probability, "verdict": verdict,
            "threshold": scorer.threshold, **extra}


def score_files(scorer: Scorer, paths: list[str | Path], frames: int = 16, batch_size: int = 64) -> list[dict]:
    """One row per file, in order: path, kind (image/video), probability of fake and verdict;
    a file that cannot be read gets an ``error`` (and no probability) and the others go on.
    Images are scored in batches of ``batch_size`` as they are read."""
    rows: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        probs = scorer.probabilities(torch.stack([t for _, t in pending]), batch_size)
        for (slot, _), p in zip(pending, probs.tolist()):
            rows[slot] = _row(scorer, Path(rows[slot]["path"]), "image", p)
        pending.clear()

    for path in collect_files(paths):
        kind = "video" if is_video_file(path) else "image"
        try:
            if kind == "image":
                pending.append((len(rows), scorer.input(imageio.open_image(path))))
                rows.append(_row(scorer, path, kind, None))
                if len(pending) == batch_size:
                    flush()
                continue
            faces, missed = video_faces(path, frames)
            if not faces:
                rows.append(_row(scorer, path, kind, None, error=f"no face in any of {missed} sampled frames"))
                continue
            p = scorer.probabilities(torch.stack([scorer.input(f) for f in faces]), batch_size).mean()
            rows.append(_row(scorer, path, kind, float(p), frames=len(faces), frames_without_face=missed))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the others
            rows.append(_row(scorer, path, kind, None, error=f"{type(e).__name__}: {e}"))
    if pending:
        flush()
    return rows


def rows_table(rows: list[dict]):
    """A rich Table of ``score_files`` rows."""
    from rich.table import Table

    table = Table(title=f"fake if probability > {rows[0]['threshold']:.4g}" if rows else None, title_justify="left")
    for name in ("file", "kind", "p(fake)", "verdict", "note"):
        table.add_column(name, justify="right" if name == "p(fake)" else "left", overflow="fold")
    for r in rows:
        note = r.get("error") or (f"{r['frames']} face frames, {r['frames_without_face']} without a face"
                                  if r["kind"] == "video" else "")
        p = "" if r["probability"] is None else f"{r['probability']:.4f}"
        table.add_row(r["path"], r["kind"], p, r["verdict"] or "error", note)
    return table


def explain_files(scorer: Scorer, paths: list[str | Path], out: str | Path, layer: str | None = None,
                  size: int = 256) -> list[dict]:
    """Grad-CAM overlays for image files: ``out/<name>-gradcam.png`` (``size`` px) per image;
    returns one row per image (path, probability, verdict, overlay)."""
    from deepfake_dist.evaluation.gradcam import find_layer, gradcam, overlay

    name, _ = find_layer(scorer.model, layer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [p for p in collect_files(paths) if not is_video_file(p)]
    if not files:
        raise UserError(f"explain takes images; none among {', '.join(map(str, paths))}")
    stems = [p.stem for p in files]
    rows = []
    for i, path in enumerate(files):
        image = imageio.open_image(path)
        x = scorer.input(image)[None]
        heat = gradcam(scorer.model, x, name)[0]
        face = imageio.preprocess(image, "L" if scorer.info["in_channels"] == 1 else "RGB", x.shape[-1])
        target = out / (f"{path.stem}-gradcam.png" if stems.count(path.stem) == 1 else f"{i:03d}-{path.stem}-gradcam.png")
        overlay(face, heat).resize((size, size), Image.Resampling.BICUBIC).save(target)
        p = float(scorer.probabilities(x)[0])
        rows.append({**_row(scorer, path, "image", p), "overlay": str(target), "layer": name})
    return rows
