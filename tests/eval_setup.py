"""Data and detectors for the evaluation tests (built once per session by conftest fixtures).

Two shard sets, small shards so that two ranks each get several: ``faces`` (LFW real + toy
fakes, 5 per shard) and ``gen`` (fakes of a named generator, ``gen_x``, 4 per shard). Two small
CNNs are trained on ``faces`` for a few steps, so their scores mean something."""

from __future__ import annotations

from pathlib import Path

from datasets import lfw_faces, toy_fake, write_face_folder
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = "gen_x"


def make_eval_sets(root: Path) -> dict:
    from deepfake_dist.data.prepare import prepare
    from deepfake_dist.options import PrepareOptions

    faces = write_face_folder(root / "faces", 60, 60)
    prepare(PrepareOptions(source=f"folder:{faces}", out=root / "shards" / "faces", resolution=32, format="png", shard_size=5))
    gen = root / "gen" / "fake" / GENERATOR
    gen.mkdir(parents=True)
    lfw = lfw_faces()
    for i in range(30):
        Image.fromarray(toy_fake(lfw[(i + 20) % len(lfw)], 100 + i)).save(gen / f"g_{i:03d}.png")
    prepare(PrepareOptions(source=f"folder:{root / 'gen'}", out=root / "shards" / "gen", resolution=32, format="png",
                           shard_size=4))
    return {"faces_folder": faces, "data": [str(root / "shards" / "faces"), str(root / "shards" / "gen")]}


def train_detectors(data: list[str], runs: Path) -> list[str]:
    """Two CNNs (width 8 and 4) trained on the first set: run folders with model.safetensors."""
    from deepfake_dist.config import load_config
    from deepfake_dist.train.loop import train

    out = []
    for name, width, steps in (("cnn8", 8, 16), ("cnn4", 4, 12)):
        cfg = load_config(ROOT / "configs" / "smoke.yaml", [
            f"data.train=[{data[0]}]", f"output_dir={runs}", "wandb.mode=disabled", f"name={name}",
            f"model.width={width}", f"train.max_steps={steps}", "train.epochs=2", "checkpoint.every_steps=null",
            "data.num_workers=0", "data.persistent_workers=false"])
        train(cfg)
        out.append(str(runs / name))
    return out
