"""Convolutional autoencoder and VAE face generators at 32, 64 or 128 px, and the VAE loss.

Both use the DCGAN stacks: encoder image -> latent, decoder latent -> image in [-1, 1].
``forward(x)`` returns ``{"recon", "mu", "logvar"}`` (``logvar`` is None for the plain AE), so
one loss, ``vae_loss``, serves both (KL is 0 without ``logvar``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS
from deepfake_dist.models.convstacks import down_stack, gaussian, up_stack


class ConvAutoEncoder(nn.Module):
    """Encoder, decoder and ``forward``; subclasses say how a latent code is drawn."""

    codes_per_latent = 1  # encoder outputs per latent dimension (mu only, or mu and logvar)

    def __init__(self, resolution: int = 64, channels: int = 3, latent_dim: int = 128, width: int = 32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = down_stack(channels, resolution, width, latent_dim * self.codes_per_latent)
        self.decoder = up_stack(latent_dim, resolution, channels, width)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z[:, :, None, None])

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        mu, logvar = self.encode(x)
        return {"recon": self.decode(self.latent(mu, logvar)), "mu": mu, "logvar": logvar}


@MODELS.register("ae", kind="autoencoder")
class AutoEncoder(ConvAutoEncoder):
    """Deterministic autoencoder. To sample, it keeps running per-dimension mean and std of its
    codes (updated in train mode, momentum 0.1, like BatchNorm's running stats) and decodes
    Gaussian draws with those moments."""

    momentum = 0.1

    def __init__(self, resolution: int = 64, channels: int = 3, latent_dim: int = 128, width: int = 32):
        super().__init__(resolution, channels, latent_dim, width)
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))

    def encode(self, x: Tensor) -> tuple[Tensor, None]:
        return self.encoder(x).flatten(1), None

    def latent(self, mu: Tensor, logvar: None) -> Tensor:
        if self.training and mu.shape[0] > 1:
            with torch.no_grad():
                self.latent_mean.lerp_(mu.mean(0), self.momentum)
                self.latent_std.lerp_(mu.std(0), self.momentum)
        return mu

    def from_noise(self, z: Tensor) -> Tensor:
        """Decode N(0, I) draws ``z`` (B, latent_dim), rescaled to the codes' running moments."""
        return self.decode(self.latent_mean + self.latent_std * z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.from_noise(gaussian(n, self.latent_dim, self.latent_mean.device, generator))


@MODELS.register("vae", kind="autoencoder")
class VAE(ConvAutoEncoder):
    """Variational autoencoder: codes are drawn by reparameterisation in train mode; in eval
    mode ``forward`` decodes the mean (deterministic reconstructions)."""

    codes_per_latent = 2

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).flatten(1).chunk(2, 1)
        return mu, logvar

    def latent(self, mu: Tensor, logvar: Tensor) -> Tensor:
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def from_noise(self, z: Tensor) -> Tensor:
        """Decode draws ``z`` (B, latent_dim) from the N(0, I) prior."""
        return self.decode(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.from_noise(gaussian(n, self.latent_dim, next(self.parameters()).device, generator))


RECON_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


def vae_loss(out: dict[str, Tensor | None], x: Tensor, kl_weight: float = 1.0, recon: str = "mse") -> dict[str, Tensor]:
    """``loss = recon + kl_weight * kl``. ``recon``: MSE or L1, mean over pixels and batch;
    ``kl``: KL(q(z|x) || N(0, I)) summed over latent dims, mean over the batch (0 when
    ``logvar`` is None). As recon is a per-pixel mean, kl_weight must be small for sharp faces;
    the trainer ramps it up (warm-up) to its target."""
    if recon not in RECON_LOSSES:
        raise UserError(f"unknown reconstruction loss '{recon}'; choose one of: {', '.join(RECON_LOSSES)}")
    recon_loss = RECON_LOSSES[recon](out["recon"], x)
    mu, logvar = out["mu"], out["logvar"]
    if logvar is None:
        kl = recon_loss.new_zeros(())
    else:
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return {"loss": recon_loss + kl_weight * kl, "recon": recon_loss, "kl": kl}
