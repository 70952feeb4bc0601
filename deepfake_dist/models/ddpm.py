"""A denoising diffusion model (DDPM, Ho et al. 2020) of faces: diffusers' ``UNet2DModel``
predicting the noise added by ``DDPMScheduler``'s forward process, sampled with a fast solver.

``forward(noisy, timesteps)`` is the noise prediction (what training regresses onto the true noise
with MSE). ``sample(noise, steps, sampler)`` denoises N(0, I) images in ``steps`` steps with DDIM
(eta 0) or DPM-Solver++ (2nd order): both deterministic, so an image depends on its starting noise
only, and images in [-1, 1] (clamped). DDIM is the robust choice; DPM-Solver++ wants a well
trained network (an undertrained one gives washed-out samples where DDIM's are already faces). The
noise schedule (``num_train_timesteps``, ``beta_schedule``) belongs to the model: a network is only
valid with the schedule it learned.

diffusers is an optional dependency (``pip install 'deepfake_dist[diffusion]'``, Python >= 3.11);
without it, building this model is a one-line error.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

import torch
from torch import Tensor, nn

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS

MIN_PYTHON = (3, 11)
SAMPLERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def require_diffusers(what: str = "model ddpm") -> None:
    """One line saying what to install (or which Python to use) when diffusers cannot be used."""
    if sys.version_info < MIN_PYTHON:
        raise UserError(f"{what} needs diffusers, which needs Python >= {'.'.join(map(str, MIN_PYTHON))} "
                        f"(this is {platform.python_version()}); run it in a newer Python")
    if importlib.util.find_spec("diffusers") is None:
        raise UserError(f"{what} needs diffusers: pip install 'deepfake_dist[diffusion]'")


@MODELS.register("ddpm", kind="diffusion")
class DDPM(nn.Module):
    """The UNet: ``width`` channels at full resolution, times ``channel_mult`` per level (each level
    halves the resolution), ``layers_per_block`` residual blocks per level, self-attention at the
    levels whose resolution is in ``attention_resolutions`` (and in the middle block)."""

    def __init__(
        self,
        resolution: int = 64,
        channels: int = 3,
        width: int = 64,
        channel_mult: list[int] | None = None,
        layers_per_block: int = 2,
        attention_resolutions: list[int] | None = None,
        dropout: float = 0.0,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
    ):
        require_diffusers()
        from diffusers import DDPMScheduler, UNet2DModel

        super().__init__()
        channel_mult = list(channel_mult or (1, 2, 2, 2))
        attention = set(attention_resolutions if attention_resolutions is not None else (16,))
        levels = [resolution // 2 ** i for i in range(len(channel_mult))]
        if resolution % 2 ** (len(channel_mult) - 1) or min(channel_mult) < 1 or width < 1:
            raise UserError(f"ddpm: {len(channel_mult)} levels (channel_mult {channel_mult}) need a resolution divisible "
                            f"by {2 ** (len(channel_mult) - 1)} and positive widths; got resolution {resolution}, "
                            f"width {width}")
        if not attention <= set(levels):
            raise UserError(f"ddpm attention_resolutions {sorted(attention)}: the levels are at {levels} px")
        if beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"ddpm beta_schedule '{beta_schedule}': choose one of {', '.join(BETA_SCHEDULES)}")
        if num_train_timesteps < 2:
            raise UserError(f"ddpm num_train_timesteps must be at least 2, got {num_train_timesteps}")
        attended = [res in attention for res in levels]
        self.unet = UNet2DModel(
            sample_size=resolution, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(width * m for m in channel_mult), layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attended),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended)),
            norm_num_groups=_groups(width), dropout=dropout,
        )
        self.schedule = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                      prediction_type="epsilon", clip_sample=True)
        self.resolution, self.channels = resolution, channels

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.config.num_train_timesteps

    def forward(self, noisy: Tensor, timesteps: Tensor) -> Tensor:
        return self.unet(noisy, timesteps).sample

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, sampler: str = "ddim") -> Tensor:
        """Images in [-1, 1] from the starting noise (B, channels, res, res) in ``steps`` steps."""
        import diffusers

        # "leading" steps start below the last training timestep, where the signal is nearly gone;
        # both solvers clip their estimate of the clean image to [-1, 1] (DDIM: the schedule's
        # clip_sample; DPM-Solver++: thresholding at 1), which an estimate divided by a tiny signal
        # scale would otherwise blow up
        solver = getattr(diffusers, SAMPLERS[sampler]).from_config(
            self.schedule.config, timestep_spacing="leading", **({"thresholding": True, "sample_max_value": 1.0}
                                                                 if sampler == "dpm" else {}))
        solver.set_timesteps(steps, device=noise.device)
        x = noise * solver.init_noise_sigma
        for t in solver.timesteps:
            x = solver.step(self(solver.scale_model_input(x, t), t), t, x).prev_sample
        return x.clamp(-1, 1)


def _groups(width: int) -> int:
    """GroupNorm groups: 32 as the DDPM paper, fewer for narrow test networks (must divide every level)."""
    groups = 32
    while width % groups:
        groups //= 2
    return groups
