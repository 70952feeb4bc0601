"""Generator training: DCGAN, StyleGAN2 and DDPM on two gloo ranks (then generating on both) and under
DeepSpeed ZeRO-2 (a GAN with two engines), bit-exact resume with the EMA, the conditional GAN, the VAE,
the refusals, and FID/KID across ranks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import pytest
import torch
import yaml
from fidelity_launch import SmallExtractor, fixed_images
from gen_setup import (CONFIGS, GENERATORS, ROOT, TINY, assert_one_rank_and_two_agree, deepspeed_zero2, launch, tiny,
                       tiny_gan, tiny_generator, tiny_settings)
from PIL import Image
from safetensors.torch import load_file

from deepfake_dist.config import load_config
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.data.prepare import prepare
from deepfake_dist.engine.runtime import make_accelerator
from deepfake_dist.engine.step import NONFINITE
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.fidelity import INCEPTION_FILE, Fidelity, find_inception_weights
from deepfake_dist.generate import generate
from deepfake_dist.models.exported import load_exported
from deepfake_dist.options import GenerateOptions, PrepareOptions
from deepfake_dist.tasks import create_task, task_class
from deepfake_dist.tasks.gan import GANTask
from deepfake_dist.train.loop import train


def ema_parameters(checkpoint, generator: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA generator's parameters (not its buffers) saved in a checkpoint."""
    tensors = load_file(str(checkpoint / "task_state.safetensors"))
    return {name: tensors[f"ema.module.{name}"] for name, _ in generator.named_parameters()}


def assert_generator_learned_and_replicas_agree(run):
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["rank_digests"]) == 2 and summary["ranks agree"], summary  # the replicas, params and buffers
    generator, info = load_exported(run, "generator")
    early = ema_parameters(run / "checkpoints" / "step-2", generator)
    late = ema_parameters(run / "checkpoints" / "step-4", generator)
    assert any(not torch.equal(early[k], late[k]) for k in early), "the generator's weights never changed"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000002.png", "step-000004.png"]
    assert info["build_args"] == {"resolution": 32, "channels": 1}
    result = generate(GenerateOptions(checkpoint=run, num_images=3, out=run / "fakes", format="png"))
    assert result["images"] == 3
    for png in (run / "fakes").iterdir():  # grey faces in, grey faces out
        image = Image.open(png)
        assert (image.mode, image.size) == ("L", (32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("model", GENERATORS)
def test_two_gloo_ranks_train_identical_replicas_draw_grids_and_generate(model, real_face_shards, tmp_path):
    """A pipeline under the launcher: training, then ``generate`` split over the two ranks, which
    writes the same 37 images one rank writes."""
    settings = tiny_settings(real_face_shards, tmp_path, "ddp", **{**TINY[model], "checkpoint.every_steps": 2})
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "two-ranks", "stamps": str(tmp_path / "stamps"), "stages": [
        {"train": {"config": str(CONFIGS / f"{model}.yaml"), "set": settings}},
        {"generate": {"checkpoint": str(tmp_path / "ddp"), "num_images": 37, "out": str(tmp_path / "two"),
                      "shard_size": 5}}]}))
    result = launch(["launch/train.py", "--config", str(pipeline)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_generator_learned_and_replicas_agree(tmp_path / "ddp")
    generate(GenerateOptions(checkpoint=tmp_path / "ddp", num_images=37, out=tmp_path / "one", shard_size=5))
    assert_one_rank_and_two_agree(tmp_path / "one", tmp_path / "two", 37)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install 'deepfake_dist[deepspeed]')")
@pytest.mark.parametrize("model, precision", [("dcgan", "no"), ("stylegan2", "bf16"), ("ddpm", "bf16")])
def test_deepspeed_zero2_trains_generators(model, precision, real_face_shards, tmp_path):
    """The GANs with two engines (one per network), the diffusion model with one; StyleGAN2 and
    DDPM in bf16 (the EMA, exported, stays fp32)."""
    args = tiny_generator(model, real_face_shards, tmp_path, "zero2", **{"checkpoint.every_steps": 2})
    result = launch(["launch/train.py", "--config", str(CONFIGS / f"{model}.yaml"), *args], deepspeed_zero2(precision))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_generator_learned_and_replicas_agree(tmp_path / "zero2")


@pytest.mark.parametrize("model", GENERATORS)
def test_resume_continues_at_the_saved_step_bit_exactly(model, real_face_shards, tmp_path):
    config = CONFIGS / f"{model}.yaml"
    full = load_config(config, tiny_generator(model, real_face_shards, tmp_path, "full", steps=4, **{
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 5, "samples.every": 0}))
    train(full)
    step2 = full.run_dir / "checkpoints" / "step-2"
    resumed = load_config(config, tiny_generator(model, real_face_shards, tmp_path, "resumed", steps=4, **{
        "checkpoint.every_steps": 2, "checkpoint.resume": str(step2), "samples.every": 0}))
    summary = train(resumed)
    assert summary["steps"] == 4
    logged = [r["step"] for r in read_jsonl(resumed.run_dir / "metrics.jsonl") if "train/lr" in r]
    assert logged == [3, 4]  # continued after the saved step
    # the EMA (and the task's counters, StyleGAN2's path-length mean) came back: restarted at step 2
    # they would end elsewhere
    a = load_file(str(full.run_dir / "checkpoints" / "step-4" / "task_state.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints" / "step-4" / "task_state.safetensors"))
    assert a.keys() == b.keys() and int(b["ema.n_averaged"]) == 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    exported = [load_file(str(run / "generator.safetensors")) for run in (full.run_dir, resumed.run_dir)]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_conditional_gan_reads_its_label_from_the_sample_json(celeba_folder, tmp_path):
    shards = tmp_path / "celeba_shards"
    prepare(PrepareOptions(source=f"celeba:{celeba_folder}", out=shards, resolution=32, shard_size=2))
    overrides = tiny_gan(shards, tmp_path, "cgan", steps=2, **{"data.batch_size": 2, "gan.condition": "attributes.Smiling"})
    cfg = load_config(CONFIGS / "cdcgan.yaml", overrides)
    train(cfg)
    generator, info = load_exported(cfg.run_dir, "generator")
    assert (info["num_classes"], info["condition"]) == (2, "attributes.Smiling")
    z = generator.sample_noise(1).repeat(2, 1)
    with torch.no_grad():
        images = generator(z, torch.tensor([0, 1]))
    assert images.shape == (2, 3, 32, 32) and not torch.allclose(images[0], images[1])

    bad = load_config(CONFIGS / "cdcgan.yaml", tiny_gan(shards, tmp_path, "bad", steps=1, **{
        "data.batch_size": 2, "gan.condition": "attributes.Bald"}))
    with pytest.raises(UserError, match="gan.condition 'attributes.Bald'.*no such key"):
        train(bad)


@pytest.mark.parametrize("config, override, message", [
    ("dcgan.yaml", "data.normalize=imagenet", "set data.normalize: half"),
    ("dcgan.yaml", "sched.name=cosine", "constant learning rate"),
    ("dcgan.yaml", "train.grad_accum=2", "set train.grad_accum: 1"),
    ("dcgan.yaml", "model.resolution=64", "remove model.resolution"),
    ("cdcgan.yaml", "gan.condition=null", "cdcgan is conditional; set gan.condition"),
    ("vae.yaml", "train.monitor=val/auroc_typo", "'train.monitor' is 'val/auroc_typo', which a vae run does not"),
    ("stylegan2.yaml", "stylegan2.r1_every=0", "'stylegan2.r1_every' is a number of batches, at least 1"),
    ("stylegan2.yaml", "stylegan2.augment=[cutout, blur]", r"'stylegan2.augment\[1\]' expected one of"),
    ("ddpm.yaml", "diffusion.sample_steps=2000", "'diffusion.sample_steps' must be from 1 to the model's "
                                                 "num_train_timesteps \\(1000\\)"),
])
def test_bad_generator_settings_are_refused_when_the_config_is_loaded(real_face_shards, tmp_path, config, override,
                                                                      message):
    overrides = tiny_generator(config.removesuffix(".yaml"), real_face_shards, tmp_path, "bad") + [override]
    with pytest.raises(UserError, match=f"^{re.escape(str(CONFIGS / config))}: .*{message}"):
        load_config(CONFIGS / config, overrides)


def test_generators_refuse_fake_training_data(face_shards, tmp_path):
    with pytest.raises(UserError, match="holds .* fake 'train' images; generators learn from real faces only"):
        load_config(CONFIGS / "dcgan.yaml", tiny_gan(face_shards, tmp_path, "bad"))


def test_vae_loss_falls_and_reconstructions_keep_shape_and_range(real_face_shards, tmp_path):
    cfg = load_config(CONFIGS / "vae.yaml", tiny(real_face_shards, tmp_path, "vae", steps=40, **{
        "model.width": 8, "model.latent_dim": 16, "data.batch_size": 16, "vae.kl_warmup_steps": 20,
        "samples.every": 20, "sched.warmup_steps": 0}))
    train(cfg)
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    recon = [r["train/recon"] for r in records if "train/recon" in r]
    assert sum(recon[-5:]) / 5 < 0.7 * sum(recon[:5]) / 5
    weights = [r["train/kl_weight"] for r in records if "train/kl_weight" in r]
    assert weights[0] == 0 and weights[-1] == pytest.approx(cfg.vae.kl_weight)  # warm-up reached its target
    assert any("val/recon" in r for r in records)
    assert sorted(p.name for p in (cfg.run_dir / "samples").glob("*.png")) == ["step-000020.png", "step-000040.png"]
    model, info = load_exported(cfg.run_dir, "generator")
    assert info.get("module") is None and info["build_args"] == {"resolution": 32, "channels": 1}
    batch = next(iter(eval_loader([str(real_face_shards)], "val", EvalOptions.from_data(cfg.data, 1))))
    with torch.no_grad():
        recon_images = model(batch.image)["recon"]
    assert recon_images.shape == batch.image.shape == (10, 1, 32, 32)
    assert recon_images.min() >= -1 and recon_images.max() <= 1


def test_ddpm_without_diffusers_is_one_line_naming_the_extra(real_face_shards, tmp_path, monkeypatch):
    from deepfake_dist.models import ddpm

    overrides = tiny_generator("ddpm", real_face_shards, tmp_path, "bad")
    monkeypatch.setattr(ddpm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"ddpm.yaml: model ddpm needs diffusers: pip install 'deepfake_dist\[diffusion\]'$"):
        load_config(CONFIGS / "ddpm.yaml", overrides)
    monkeypatch.setattr(ddpm, "MIN_PYTHON", (99, 0))
    with pytest.raises(UserError, match=r"needs diffusers, which needs Python >= 99.0 \(this is 3\."):
        load_config(CONFIGS / "ddpm.yaml", overrides)


@pytest.mark.parametrize("model", [*GENERATORS, "vae"])
def test_generator_tasks_skip_a_nonfinite_batch_without_an_update(model, real_face_shards, tmp_path):
    cfg = load_config(CONFIGS / f"{model}.yaml", tiny_generator(model, real_face_shards, tmp_path, "nan"))
    task = create_task(cfg, make_accelerator(cfg, engines=task_class(cfg).engines), channels=1)
    task.set_total_steps(4)
    batch = next(iter(eval_loader([str(real_face_shards)], "train", EvalOptions.from_data(cfg.data, 1))))

    def weights():  # parameters: the NaN images do reach the discriminator's BatchNorm statistics
        return {f"{name}.{k}": p.detach().clone() for name, module in task.replicated_modules().items()
                for k, p in module.named_parameters()}

    before = weights()
    poisoned = dataclasses.replace(batch, image=torch.full_like(batch.image, float("nan")))
    assert task.train_step(poisoned)[NONFINITE] == 1.0
    after = weights()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN batch changed the weights"
    assert NONFINITE not in task.train_step(batch)
    assert any(not torch.equal(after[k], v) for k, v in weights().items()), "a clean batch did not train"


@pytest.mark.slow
def test_fid_kid_over_two_ranks_equal_the_one_process_values(tmp_path):
    real, fake = fixed_images()
    single = Fidelity(SmallExtractor(), kid_subsets=10, kid_subset_size=8)
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = single.compute()
    result = launch([str(ROOT / "tests" / "fidelity_launch.py"), str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for values in ranks:
        assert (values["fid_real"], values["fid_fake"]) == (len(real), len(fake))
        for key in ("fid", "kid", "kid_std"):
            assert values[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert expected["fid"] > 0


def test_gan_fid_compares_ema_samples_with_held_out_faces(real_face_shards, tmp_path):
    cfg = load_config(CONFIGS / "dcgan.yaml", tiny_gan(real_face_shards, tmp_path, "fid", **{"samples.fid_samples": 40}))
    task = GANTask(cfg, make_accelerator(cfg, engines=GANTask.engines), channels=1)
    metrics = task.fidelity(SmallExtractor())
    assert (metrics["fid_real"], metrics["fid_fake"]) == (10, 40)  # the whole val split, then 40 fakes
    assert metrics["fid"] > 0 and metrics["kid"] == metrics["kid"]


def test_missing_inception_weights_name_the_file_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, line = find_inception_weights(None)
    folder = tmp_path / "hub" / "checkpoints"
    assert path is None and "\n" not in line and INCEPTION_FILE in line and str(folder) in line
    folder.mkdir(parents=True)
    (folder / INCEPTION_FILE).write_bytes(b"")
    assert find_inception_weights(None) == (folder / INCEPTION_FILE, "")
    path, line = find_inception_weights(str(tmp_path / "nowhere.pth"))
    assert path is None and "samples.inception_weights" in line and "nowhere.pth" in line
