"""Shared fixtures. Image-folder fixtures build small, distinct face-like images with PIL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    """A smooth random image (blurred noise compresses like a photo, not like static)."""
    w, h = size
    small = rng.integers(0, 256, (max(h // 4, 2), max(w // 4, 2), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    return img.convert(mode)


@pytest.fixture
def make_face_images() -> Callable[..., list[Path]]:
    """``make(folder, n, prefix="img", ext="jpg", size=(40, 32), mode="RGB", seed=0)`` writes
    ``n`` distinct images ``folder/{prefix}_{i:03d}.{ext}`` and returns their paths."""

    def make(folder: Path, n: int, prefix: str = "img", ext: str = "jpg", size=(40, 32), mode: str = "RGB", seed: int = 0):
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, n, len(prefix), sum(map(ord, str(folder) + prefix))])
        paths = []
        for i in range(n):
            path = folder / f"{prefix}_{i:03d}.{ext}"
            _image(rng, size, mode).save(path)
            paths.append(path)
        return paths

    return make


@pytest.fixture
def face_folder(tmp_path, make_face_images) -> Path:
    """``faces/{real,fake}/*``: 12 real (10 jpg 40x32, 2 png 30x50) and 8 fake (5 in fake/ and
    3 in fake/gan_a/, so their generator is known). No fixed split."""
    root = tmp_path / "faces"
    make_face_images(root / "real", 10, "r")
    make_face_images(root / "real", 2, "p", ext="png", size=(30, 50), seed=1)
    make_face_images(root / "fake", 5, "f", seed=2)
    make_face_images(root / "fake" / "gan_a", 3, "g", ext="png", seed=3)
    return root


@pytest.fixture
def split_face_folder(tmp_path, make_face_images) -> Path:
    """``split_faces/{train,val,test}/{real,fake}/*`` with counts in ``SPLIT_FACE_COUNTS``."""
    root = tmp_path / "split_faces"
    for (split, label), n in SPLIT_FACE_COUNTS.items():
        make_face_images(root / split / label, n, f"{split}_{label}", seed=n)
    return root


SPLIT_FACE_COUNTS = {
    ("train", "real"): 5, ("train", "fake"): 4,
    ("val", "real"): 2, ("val", "fake"): 1,
    ("test", "real"): 1, ("test", "fake"): 3,
}


@pytest.fixture
def split_face_counts() -> dict[tuple[str, str], int]:
    return dict(SPLIT_FACE_COUNTS)


@pytest.fixture
def flat_face_folder(tmp_path, make_face_images) -> Path:
    """``flat_faces/*``: 6 jpgs, no label folders (needs ``label=``)."""
    root = tmp_path / "flat_faces"
    make_face_images(root, 6, "x")
    return root


CELEBA_ATTRS = ("Male", "Smiling", "Young")


@pytest.fixture
def celeba_folder(tmp_path, make_face_images) -> Path:
    """A tiny CelebA: ``img_align_celeba/000001.jpg..000009.jpg`` (178x218 like the real one),
    ``list_eval_partition.txt`` (4 train, 3 val, 2 test; also lists a missing 000010.jpg),
    ``list_attr_celeba.txt`` (Male, Smiling, Young as +-1) and ``list_bbox_celeba.txt``."""
    root = tmp_path / "celeba"
    img_dir = root / "img_align_celeba"
    for path in make_face_images(img_dir, 9, "tmp", size=(178, 218), seed=5):
        index = int(path.stem.split("_")[1]) + 1
        path.rename(img_dir / f"{index:06d}.jpg")
    names = [f"{i:06d}.jpg" for i in range(1, 11)]
    splits = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {s}\n" for n, s in zip(names, splits)))
    rows = [f"{n} " + " ".join("1" if (i + j) % 2 else "-1" for j in range(len(CELEBA_ATTRS))) for i, n in enumerate(names)]
    (root / "list_attr_celeba.txt").write_text(f"{len(names)}\n{' '.join(CELEBA_ATTRS)}\n" + "\n".join(rows) + "\n")
    bbox = [f"{n} {10 + i} {20 + i} {100 + i} {120 + i}" for i, n in enumerate(names)]
    (root / "list_bbox_celeba.txt").write_text(f"{len(names)}\nimage_id x_1 y_1 width height\n" + "\n".join(bbox) + "\n")
    return root


@pytest.fixture(scope="session")
def face_shards(tmp_path_factory) -> Path:
    """A grey 32-px shard set of LFW faces (real) and toy fakes (see ``datasets.toy_fake``):
    60 + 60 images, 16 per shard, split 0.8/0.1/0.1. Built once per test session."""
    from datasets import write_face_folder

    from deepfake_dist.data.prepare import prepare
    from deepfake_dist.options import PrepareOptions

    root = tmp_path_factory.mktemp("face_shards")
    folder = write_face_folder(root / "faces", 60, 60)
    out = root / "shards" / "faces"
    prepare(PrepareOptions(source=f"folder:{folder}", out=out, resolution=32, format="png", shard_size=16))
    return out


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons; in-process runs each start clean."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def smoke_config(tmp_path, face_shards):
    """``configs/smoke.yaml`` pointed at the test shards, writing under tmp_path; returns
    (path, overrides) for ``load_config`` or the CLI."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    overrides = [f"data.train=[{face_shards}]", f"output_dir={tmp_path / 'runs'}", "wandb.mode=disabled"]
    return root / "configs" / "smoke.yaml", overrides


@pytest.fixture(scope="session")
def eval_sets(tmp_path_factory) -> dict:
    """Shard sets for the evaluation tests (see ``eval_setup``): {"data": [faces, gen], "faces_folder"}."""
    from eval_setup import make_eval_sets

    return make_eval_sets(tmp_path_factory.mktemp("eval_sets"))


@pytest.fixture(scope="session")
def detectors(eval_sets, tmp_path_factory) -> list[str]:
    """Two small CNN run folders trained on the evaluation sets."""
    from eval_setup import train_detectors

    return train_detectors(eval_sets["data"], tmp_path_factory.mktemp("eval_runs"))


@pytest.fixture(scope="session")
def evaluated(detectors, eval_sets, tmp_path_factory) -> dict:
    """One full single-process ``evaluate`` of both detectors (robustness, Grad-CAM, report)."""
    from deepfake_dist.evaluation import evaluate
    from deepfake_dist.options import EvaluateOptions

    out = tmp_path_factory.mktemp("evaluation") / "eval"
    opts = EvaluateOptions(checkpoints=detectors, data=eval_sets["data"], out=out, batch_size=8, workers=0)
    return evaluate(opts, command="pytest evaluated")


@pytest.fixture(scope="session")
def deploy_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(shard set, image folder) for the deploy tests: 100 real + 100 fake, test split 40%."""
    from deploy_setup import make_deploy_shards

    return make_deploy_shards(tmp_path_factory.mktemp("deploy_data"))


@pytest.fixture(scope="session")
def deploy_run(deploy_shards, tmp_path_factory) -> Path:
    """A small CNN trained on ``deploy_shards`` (run folder with model.safetensors + model.json)."""
    from deploy_setup import train_detector

    return train_detector(deploy_shards[0], tmp_path_factory.mktemp("deploy_runs"))


@pytest.fixture(scope="session")
def real_face_shards(tmp_path_factory) -> Path:
    """The 100 LFW faces bundled with scikit-image, all real, grey 32 px, 10 per shard, split
    0.8/0.1/0.1: what the generators train on."""
    from deepfake_dist.data.prepare import prepare
    from deepfake_dist.options import PrepareOptions

    out = tmp_path_factory.mktemp("real_faces") / "lfw"
    prepare(PrepareOptions(source="builtin:lfw", out=out, resolution=32, format="png", shard_size=10))
    return out


@pytest.fixture(scope="session")
def gan_run(real_face_shards, tmp_path_factory) -> Path:
    """A tiny DCGAN trained for 4 steps on ``real_face_shards`` (run folder with generator.safetensors)."""
    from gen_setup import CONFIGS, tiny_gan

    from deepfake_dist.config import load_config
    from deepfake_dist.train.loop import train

    cfg = load_config(CONFIGS / "dcgan.yaml", tiny_gan(real_face_shards, tmp_path_factory.mktemp("gan_runs"), "tinygan"))
    train(cfg)
    return cfg.run_dir


@pytest.fixture(scope="session")
def generator_run(real_face_shards, tmp_path_factory, gan_run):
    """``generator_run(model)``: the run folder of that generator (configs/MODEL.yaml, ``gen_setup.TINY``)
    trained for 4 steps on ``real_face_shards``, trained on first use; dcgan's is ``gan_run``."""
    from gen_setup import CONFIGS, tiny_generator

    from deepfake_dist.config import load_config
    from deepfake_dist.train.loop import train

    runs = {"dcgan": gan_run}

    def run(model: str) -> Path:
        if model not in runs:
            out = tmp_path_factory.mktemp(f"{model}_runs")
            cfg = load_config(CONFIGS / f"{model}.yaml", tiny_generator(model, real_face_shards, out, f"tiny{model}"))
            train(cfg)
            runs[model] = cfg.run_dir
        return runs[model]

    return run


@pytest.fixture(scope="session")
def av_replica(tmp_path_factory):
    """A FakeAVCeleb replica of 4 identities, one video of each category each (``av_data``)."""
    pytest.importorskip("cv2", reason="videos need the video extra (opencv-python-headless<5)")
    pytest.importorskip("av", reason="sound needs the video extra (av)")
    from av_data import build_fakeavceleb

    return build_fakeavceleb(tmp_path_factory.mktemp("fakeavceleb") / "FakeAVCeleb_v1.2", identities=4)


@pytest.fixture(scope="session")
def av_shards(av_replica, tmp_path_factory) -> Path:
    """``av_replica`` prepared: 32-px clips of 4 frames with their sound, identities split 2/1/1."""
    from av_data import CLIP

    from deepfake_dist.data.prepare import prepare
    from deepfake_dist.options import PrepareOptions

    out = tmp_path_factory.mktemp("av_shards") / "fakeavceleb"
    prepare(PrepareOptions(source=f"fakeavceleb:{av_replica.root}", out=out, resolution=32, shard_size=4,
                           options={**CLIP, "identity_split": "0.5,0.25,0.25"}))
    return out
