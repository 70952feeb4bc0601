"""DeepSpeed ZeRO-1, ZeRO-2 (in bf16), ZeRO-3 and ZeRO-2 with the optimizer on the CPU, through
the accelerate configs users launch on GPUs, on two CPU processes (gloo). Each config trains the
smoke detector for an epoch, is resumed by a second launch that trains a second epoch, and its
exported model.safetensors loads into a plain model and equals the weights in the checkpoint
(ZeRO-3 gathered). The GAN (two engines) does the same under ZeRO-3."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scale_setup import (
    ACCELERATE_CONFIGS,
    ENV,
    EXTENSIONS,
    ROOT,
    accelerate,
    free_port,
    logged_train_steps,
    optimizer_steps,
    smoke,
)

from deepfake_dist.config import Config, DataConfig, TrainConfig
from deepfake_dist.engine.runtime import _fill_deepspeed_config
from deepfake_dist.errors import UserError
from deepfake_dist.models.exported import load_exported

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (pip install 'deepfake_dist[deepspeed]')")


def cpu_adam_built() -> bool:
    """DeepSpeedCPUAdam (what offload runs) is a C++ op that DeepSpeed compiles on first use:
    about three CPU-minutes, too long for a test. It is there once built, or when prebuilt."""
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("cpu_adam")) or (Path(EXTENSIONS) / "cpu_adam" / "cpu_adam.so").is_file()


def launch_deepspeed(config: str, precision: str, script: list[str]) -> subprocess.CompletedProcess:
    cmd = accelerate("--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml"), "--num_processes", "2",
                     "--mixed_precision", precision, "--main_process_port", str(free_port()), *script)
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=500,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def zero_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The fp32 weights rebuilt from the ZeRO partitions of every rank (DeepSpeed's own tool)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def test_the_experiment_config_fills_deepspeeds_settings():
    cfg = Config(data=DataConfig(batch_size=12), train=TrainConfig(grad_clip=0.5, grad_accum=2))
    zero3 = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
    _fill_deepspeed_config(zero3, cfg, "bf16")
    assert zero3["train_micro_batch_size_per_gpu"] == 12 and zero3["gradient_clipping"] == 0.5
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]  # the export gathers
    assert zero3["data_types"]["buffer_dtype"] == "bf16"  # BatchNorm statistics in the weights' dtype
    fixed = {"gradient_clipping": 2.0, "zero_optimization": {"stage": 2}}
    _fill_deepspeed_config(fixed, cfg, "no")
    assert fixed["gradient_clipping"] == 2.0 and "data_types" not in fixed
    with pytest.raises(UserError, match="gradient_accumulation_steps: 8 but train.grad_accum is 2"):
        _fill_deepspeed_config({"gradient_accumulation_steps": 8}, cfg, "no")


@pytest.mark.slow
@pytest.mark.parametrize("config, precision", [
    ("deepspeed_zero1", "no"), ("deepspeed_zero2", "bf16"), ("deepspeed_zero3", "no"), ("deepspeed_zero2_offload", "no")])
def test_detector_trains_resumes_and_exports(config, precision, face_shards, tmp_path):
    if "offload" in config and not cpu_adam_built():
        pytest.skip(f"DeepSpeedCPUAdam is not compiled yet: run `TORCH_EXTENSIONS_DIR={EXTENSIONS} python -c "
                    "'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'` once (about "
                    "3 CPU-minutes), or install DeepSpeed with DS_BUILD_CPU_ADAM=1")
    runs = tmp_path / "runs"
    run = runs / config
    first = launch_deepspeed(config, precision, smoke(face_shards, runs, config, "train.epochs=1"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["ranks agree"], first.stderr[-3000:]  # BatchNorm statistics too

    # the export is a plain full state dict that equals the checkpointed (ZeRO-partitioned) weights
    info = json.loads((run / "model.json").read_text())
    checkpoint = run / "checkpoints" / f"step-{info['step']}"
    exported, trained = load_file(str(run / "model.safetensors")), zero_weights(checkpoint)
    assert exported.keys() == trained.keys()
    for key, value in exported.items():
        # bf16 trains bf16 copies of the fp32 master weights; the export holds those copies
        assert torch.equal(value, trained[key].to(value.dtype)), key
    assert {v.dtype for k, v in exported.items() if "num_batches" not in k} == {
        torch.bfloat16 if precision == "bf16" else torch.float32}
    model, _ = load_exported(run)
    assert all(torch.equal(v, exported[k].to(v.dtype)) for k, v in model.state_dict().items())
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2,)

    second = launch_deepspeed(config, precision, smoke(face_shards, runs, config, "train.epochs=2"))
    assert f"resuming from {run / 'checkpoints' / 'step-6'} (epoch 1, step 6)" in second.stderr, second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["ranks agree"]
    assert logged_train_steps(run) == [2, 4, 6, 8, 10, 12]  # the second launch went on, it did not restart
    assert optimizer_steps(run / "checkpoints" / "step-12") == 12  # Adam's state came back too


@pytest.mark.slow
def test_gan_two_engines_under_zero3_trains_resumes_and_exports(real_face_shards, tmp_path):
    from gen_setup import CONFIGS, tiny_gan

    run = tmp_path / "zero3gan"
    script = [str(ROOT / "launch" / "train.py"), "--config", str(CONFIGS / "dcgan.yaml")]
    launch_deepspeed("deepspeed_zero3", "no", script + tiny_gan(real_face_shards, tmp_path, run.name, steps=4))
    ema = load_file(str(run / "checkpoints" / "step-4" / "task_state.safetensors"))
    exported = load_file(str(run / "generator.safetensors"))
    assert exported.keys() and all(torch.equal(v, ema[f"ema.module.{k}"]) for k, v in exported.items())
    generator, info = load_exported(run, "generator")
    assert info["step"] == 4 and generator(generator.sample_noise(2)).shape == (2, 1, 32, 32)

    second = launch_deepspeed("deepspeed_zero3", "no", script + tiny_gan(real_face_shards, tmp_path, run.name, steps=6))
    assert f"resuming from {run / 'checkpoints' / 'step-4'}" in second.stderr, second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["ranks agree"]
    assert int(load_file(str(run / "checkpoints" / "step-6" / "task_state.safetensors"))["ema.n_averaged"]) == 6
    assert optimizer_steps(run / "checkpoints" / "step-6") == 6  # both engines' Adam states came back
