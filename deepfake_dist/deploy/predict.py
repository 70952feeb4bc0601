"""The ``predict`` and ``explain`` commands: score your own files with an exported detector
(images, folders of them, and videos with their sound), or draw what drove its verdict on images.

Images go through ``Scorer.input`` (``deploy.scorer``: the training preprocessing), as the HTTP
server's do; a video through ``Scorer.score_video`` (its clips or face crops, with their sound
for a model that hears, cut as ``prepare`` cut the model's training sets).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from deepfake_dist.atomic import atomic_path
from deepfake_dist.data import imageio
from deepfake_dist.data.faces import VIDEO_EXTENSIONS, is_video_file
from deepfake_dist.deploy.scorer import Scorer, load_scorer
from deepfake_dist.errors import OUTPUTS_WHOLE, UserError, out_of_space_is_one_line
from deepfake_dist.models.exported import in_channels
from deepfake_dist.options import ExplainOptions, PredictOptions


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


def _row(scorer: Scorer, path: Path, kind: str, probability: float | None, **extra) -> dict:
    verdict = None if probability is None else scorer.verdict(probability)
    return {"path": str(path), "kind": kind, "probability": probability, "verdict": verdict,
            "threshold": scorer.threshold, **extra}


def score_files(opts: PredictOptions) -> list[dict]:
    """One row per file of ``opts.paths``, in order: path, kind (image/video), probability of fake
    and verdict; a file that cannot be read gets an ``error`` (and no probability) and the others
    go on. Images are scored in batches of ``batch_size`` as they are read."""
    scorer, batch_size = load_scorer(opts.checkpoint), opts.batch_size
    rows: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        probs = scorer.probabilities(torch.stack([t for _, t in pending]), batch_size)
        for (slot, _), p in zip(pending, probs.tolist()):
            rows[slot] = _row(scorer, Path(rows[slot]["path"]), "image", p)
        pending.clear()

    for path in collect_files(opts.paths):
        kind = "video" if is_video_file(path) else "image"
        try:
            if kind == "image" and scorer.info.get("frames"):
                rows.append(_row(scorer, path, kind, None, error="this model scores video clips; give it videos"))
                continue
            if kind == "image":
                pending.append((len(rows), scorer.input(imageio.open_image(path))))
                rows.append(_row(scorer, path, kind, None))
                if len(pending) == batch_size:
                    flush()
                continue
            found = scorer.score_video(path, opts.frames, batch_size)
            rows.append(_row(scorer, path, kind, found.pop("probability"), **found))
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
        note = r.get("error") or ""
        if r["kind"] == "video" and not note:
            clips = f" in {r['clips']} clips" if "clips" in r else ""
            note = f"{r['frames']} face frames{clips}, {r['frames_without_face']} without a face"
            if "clips_without_sound" in r:
                note += f", {r['clips_without_sound']} clip(s) without sound"
            if "heads" in r:
                note += "; " + ", ".join(f"{head} {p:.4f}" for head, p in r["heads"].items())
        p = "" if r["probability"] is None else f"{r['probability']:.4f}"
        table.add_row(r["path"], r["kind"], p, r["verdict"] or "error", note)
    return table


def explain_files(opts: ExplainOptions, size: int = 256) -> list[dict]:
    """Grad-CAM overlays for the image files of ``opts.images``: ``out/<name>-gradcam.png``
    (``size`` px) per image; returns one row per image (path, probability, verdict, overlay)."""
    from deepfake_dist.evaluation.gradcam import find_layer, overlay

    scorer = load_scorer(opts.checkpoint)
    if scorer.io[0] != ("image",):
        raise UserError(f"{opts.checkpoint}: a {scorer.info['model']} model takes a clip's sound; explain draws maps "
                        "over images. deepfake-dist evaluate draws its maps over frames and spectrograms")
    name, _ = find_layer(scorer.model, opts.layer)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [p for p in collect_files(opts.images) if not is_video_file(p)]
    if not files:
        raise UserError(f"explain takes images; none among {', '.join(map(str, opts.images))}")
    stems = [p.stem for p in files]
    rows = []
    for i, path in enumerate(files):
        image = imageio.open_image(path)
        x = scorer.input(image)[None]
        heat = scorer.explain(x, name)[0]
        face = imageio.preprocess(image, "L" if in_channels(scorer.info) == 1 else "RGB", x.shape[-1])
        target = out / (f"{path.stem}-gradcam.png" if stems.count(path.stem) == 1 else f"{i:03d}-{path.stem}-gradcam.png")
        with out_of_space_is_one_line(f"the overlay {target}", out, OUTPUTS_WHOLE), atomic_path(target) as tmp:
            overlay(face, heat).resize((size, size), Image.Resampling.BICUBIC).save(tmp)
        p = float(scorer.probabilities(x)[0])
        rows.append({**_row(scorer, path, "image", p), "overlay": str(target), "layer": name})
    return rows
