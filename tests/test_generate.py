"""Synthesis: exactly N fakes with unique keys and a valid manifest, as shards or PNG files, from each
kind of generator (DCGAN, StyleGAN2, DDPM) with its own options. On two ranks: test_gan.py, whose
two-rank training pipelines end with a generate stage."""

from __future__ import annotations

import numpy as np
import pytest
from gen_setup import read_set
from PIL import Image

from deepfake_dist.data.common import SPLITS
from deepfake_dist.data.manifest import file_sha256, verify
from deepfake_dist.errors import UserError
from deepfake_dist.generate import generate
from deepfake_dist.options import GenerateOptions


def test_generate_writes_exactly_n_fakes_with_a_manifest(gan_run, tmp_path):
    manifest = generate(GenerateOptions(checkpoint=gan_run, num_images=23, out=tmp_path / "fake", shard_size=5))
    samples = read_set(tmp_path / "fake")
    assert set(samples) == {f"tinygan-{i:06d}" for i in range(23)}
    assert verify(tmp_path / "fake") == []
    for key, (split, cls, meta, pixels) in samples.items():
        assert cls == 1 and pixels.shape == (32, 32)  # grey, like the faces it learned from
        assert meta["index"] == int(key.rsplit("-", 1)[1])
        assert (meta["generator"], meta["run"], meta["step"], meta["label"]) == ("dcgan", "tinygan", 4, "fake")
    counts = manifest["counts"]
    assert sum(counts[s]["total"] for s in SPLITS) == 23 and sum(counts[s]["real"] for s in SPLITS) == 0
    assert counts["train"]["total"] == 18  # split 0.8/0.1/0.1, like a prepared set
    assert (manifest["channels"], manifest["mode"], manifest["label"]) == (1, "L", "fake")
    assert manifest["generator"]["weights_sha256"] == file_sha256(gan_run / "generator.safetensors")
    assert manifest["generator"]["step"] == 4 and manifest["created"]["world_size"] == 1


def test_png_files_and_the_truncation_trick(gan_run, tmp_path):
    result = generate(GenerateOptions(checkpoint=gan_run, num_images=5, out=tmp_path / "plain", format="png"))
    truncated = generate(GenerateOptions(checkpoint=gan_run, num_images=5, out=tmp_path / "trunc", format="png", truncation=0.5))
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == [f"tinygan-{i:06d}.png" for i in range(5)] and result["images"] == 5
    assert truncated["images"] == 5
    a = np.asarray(Image.open(tmp_path / "plain" / names[0]))
    b = np.asarray(Image.open(tmp_path / "trunc" / names[0]))
    assert a.shape == b.shape == (32, 32) and not np.array_equal(a, b)
    # image i depends only on (seed, i)
    again = generate(GenerateOptions(checkpoint=gan_run, num_images=1, out=tmp_path / "again", format="png"))
    assert again["images"] == 1
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "again" / names[0])))


def test_stylegan2_truncation_and_diffusion_steps(generator_run, tmp_path):
    def images(run, name, **options) -> np.ndarray:
        generate(GenerateOptions(checkpoint=run, num_images=4, out=tmp_path / name, format="png", **options))
        return np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / name).iterdir())]).astype(int)

    stylegan2, ddpm = generator_run("stylegan2"), generator_run("ddpm")
    plain, truncated = images(stylegan2, "plain"), images(stylegan2, "psi", truncation=1e-4)
    assert plain.shape == (4, 32, 32)  # grey
    # psi -> 0 pulls every latent onto the average w: the images all but agree
    assert np.abs(truncated - truncated[0]).max() <= 1 < np.abs(plain - plain[0]).max()

    default, fewer = images(ddpm, "default"), images(ddpm, "fewer", steps=1)
    assert default.shape == fewer.shape == (4, 32, 32) and not np.array_equal(default, fewer)
    assert np.array_equal(default, images(ddpm, "again", steps=3))  # the run's diffusion.sample_steps
    manifest = generate(GenerateOptions(checkpoint=ddpm, num_images=2, out=tmp_path / "set", shard_size=5, steps=2))
    assert (manifest["generator"]["steps"], manifest["generator"]["sampler"]) == (2, "ddim")
    assert {meta["steps"] for _, _, meta, _ in read_set(tmp_path / "set").values()} == {2}

    with pytest.raises(UserError, match="--steps does not apply to .*tinystylegan2: it holds a stylegan2 generator"):
        generate(GenerateOptions(checkpoint=stylegan2, num_images=2, out=tmp_path / "x", steps=5))
    with pytest.raises(UserError, match="--truncation does not apply to .*tinyddpm: it holds a ddpm generator"):
        generate(GenerateOptions(checkpoint=ddpm, num_images=2, out=tmp_path / "x", truncation=0.7))
    with pytest.raises(UserError, match="--steps 0: expected an integer >= 1"):
        generate(GenerateOptions(checkpoint=ddpm, num_images=2, out=tmp_path / "x", steps=0))


def test_bad_generate_input_is_one_clear_line(gan_run, tmp_path, smoke_config):
    with pytest.raises(UserError, match="--num-images 0"):
        generate(GenerateOptions(checkpoint=gan_run, num_images=0, out=tmp_path / "x"))
    with pytest.raises(UserError, match="generator.safetensors not found"):
        generate(GenerateOptions(checkpoint=tmp_path, num_images=3, out=tmp_path / "x"))
    generate(GenerateOptions(checkpoint=gan_run, num_images=2, out=tmp_path / "set", shard_size=5))
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        generate(GenerateOptions(checkpoint=gan_run, num_images=2, out=tmp_path / "set"))
    assert len(read_set(tmp_path / "set")) == 2
