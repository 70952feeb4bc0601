"""Generator training: the GAN on two gloo ranks and under DeepSpeed ZeRO-2 (two engines),
resume with the EMA, the conditional GAN, the VAE, and FID/KID across ranks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import pytest
import torch
from fidelity_launch import SmallExtractor, fixed_images
from gen_setup import CONFIGS, DEEPSPEED_ZERO2, ROOT, launch, tiny, tiny_gan
from safetensors.torch import load_file

from deepfake_dist.config import load_config
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.data.prepare import prepare
from deepfake_dist.engine.runtime import make_accelerator
from deepfake_dist.engine.step import NONFINITE
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.fidelity import INCEPTION_FILE, Fidelity, find_inception_weights
from deepfake_dist.models import create_model
from deepfake_dist.models.exported import load_exported
from deepfake_dist.options import PrepareOptions
from deepfake_dist.tasks import create_task, task_class
from deepfake_dist.tasks.gan import GANTask
from deepfake_dist.train.loop import train


def ema_parameters(checkpoint) -> dict[str, torch.Tensor]:
    """The EMA generator's parameters (not its BatchNorm buffers) saved in a checkpoint."""
    names = dict(create_model("dcgan", resolution=32, channels=1, ngf=8, ndf=8).generator.named_parameters())
    tensors = load_file(str(checkpoint / "task_state.safetensors"))
    return {name: tensors[f"ema.module.{name}"] for name in names}


def assert_generator_learned_and_replicas_agree(run):
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["rank_digests"]) == 2 and summary["ranks agree"], summary  # G and D, params and buffers
    early, late = ema_parameters(run / "checkpoints" / "step-2"), ema_parameters(run / "checkpoints" / "step-4")
    assert any(not torch.equal(early[k], late[k]) for k in early), "the generator's weights never changed"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000002.png", "step-000004.png"]
    generator, info = load_exported(run, "generator")
    assert info["module"] == "generator" and info["build_args"] == {"resolution": 32, "channels": 1}
    with torch.no_grad():
        images = generator(generator.sample_noise(3))
    assert images.shape == (3, 1, 32, 32)  # grey faces in, grey faces out


@pytest.mark.slow
def test_two_gloo_ranks_train_identical_replicas_and_draw_grids(real_face_shards, tmp_path):
    args = tiny_gan(real_face_shards, tmp_path, "ddp", **{"checkpoint.every_steps": 2})
    result = launch(["launch/train.py", "--config", str(CONFIGS / "dcgan.yaml"), *args])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_generator_learned_and_replicas_agree(tmp_path / "ddp")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install 'deepfake_dist[deepspeed]')")
def test_deepspeed_zero2_gan_trains_with_two_engines(real_face_shards, tmp_path):
    args = tiny_gan(real_face_shards, tmp_path, "zero2", **{"checkpoint.every_steps": 2})
    result = launch(["launch/train.py", "--config", str(CONFIGS / "dcgan.yaml"), *args], DEEPSPEED_ZERO2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_generator_learned_and_replicas_agree(tmp_path / "zero2")


def test_gan_resume_continues_at_the_saved_step_with_the_same_ema(real_face_shards, tmp_path):
    full = load_config(CONFIGS / "dcgan.yaml", tiny_gan(real_face_shards, tmp_path, "full", steps=4, **{
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 5}))
    train(full)
    step2 = full.run_dir / "checkpoints" / "step-2"
    resumed = load_config(CONFIGS / "dcgan.yaml", tiny_gan(real_face_shards, tmp_path, "resumed", steps=4, **{
        "checkpoint.every_steps": 2, "checkpoint.resume": str(step2)}))
    summary = train(resumed)
    assert summary["steps"] == 4
    logged = [r["step"] for r in read_jsonl(resumed.run_dir / "metrics.jsonl") if "train/loss_g" in r]
    assert logged == [3, 4]  # continued after the saved step
    # the EMA was restored: an EMA restarted at step 2 would end elsewhere
    a = load_file(str(full.run_dir / "checkpoints" / "step-4" / "task_state.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints" / "step-4" / "task_state.safetensors"))
    assert a.keys() == b.keys() and int(b["ema.n_averaged"]) == 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(load_file(str(full.run_dir / "generator.safetensors"))["net.0.weight"],
                       load_file(str(resumed.run_dir / "generator.safetensors"))["net.0.weight"])


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
])
def test_bad_generator_settings_are_refused_when_the_config_is_loaded(real_face_shards, tmp_path, config, override,
                                                                      message):
    overrides = (tiny_gan if "gan" in config else tiny)(real_face_shards, tmp_path, "bad") + [override]
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


@pytest.mark.parametrize("config, extra", [
    ("dcgan.yaml", {"model.ngf": 8, "model.ndf": 8}), ("vae.yaml", {"model.width": 8, "model.latent_dim": 16})])
def test_generator_tasks_skip_a_nonfinite_batch_without_an_update(config, extra, real_face_shards, tmp_path):
    cfg = load_config(CONFIGS / config, tiny(real_face_shards, tmp_path, "nan", **extra))
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
