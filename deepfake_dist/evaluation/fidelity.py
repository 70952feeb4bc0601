"""FID and KID of generated faces against held-out real ones (torchmetrics), across ranks.

Each rank extracts features of its share of real and generated images once; torchmetrics'
``FrechetInceptionDistance`` and ``KernelInceptionDistance`` are fed those features (through an
identity "extractor") and reduce their states over all ranks at ``compute()``, so a 2-rank
value equals the one-process value on the same images.

The standard extractor is torch-fidelity's Inception-v3 (as torchmetrics uses it). Its weights
cannot be downloaded here: they are read from a configured path or the torch hub cache, always
with ``weights_only`` unpickling; when the file is missing, ``find_inception_weights`` says in one
line where it goes and FID/KID are skipped (training goes on).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from deepfake_dist.envvars import temporary_env

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(configured: str | None) -> tuple[Path | None, str]:
    """(path, "") when the Inception weights are on disk (and torch-fidelity, which reads them,
    is installed), else (None, the one line to show)."""
    path = Path(configured) if configured else hub_checkpoints() / INCEPTION_FILE
    if path.is_file():
        if importlib.util.find_spec("torch_fidelity") is None:
            return None, "FID/KID skipped: torch-fidelity is not installed; pip install 'deepfake_dist[fid]'"
        return path, ""
    if configured:
        return None, (f"FID/KID skipped: samples.inception_weights {path} does not exist; point it at "
                      f"{INCEPTION_FILE} (from {INCEPTION_URL})")
    return None, (f"FID/KID skipped: {INCEPTION_FILE} not found in {path.parent}/; download it from "
                  f"{INCEPTION_URL} into that folder, or set samples.inception_weights")


def inception(path: Path) -> nn.Module:
    """The 2048-feature Inception-v3 of FID, weights from ``path``; takes uint8 (B, 3, H, W)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    # torch-fidelity loads the .pth with ``weights_only=False``; force the safe unpickler
    with temporary_env("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1"):
        model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                   feature_extractor_weights_path=str(path))
    model.num_features = 2048
    return model


class _Given(nn.Module):
    """Lets the torchmetrics metrics take features computed once for both."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Images in [-1, 1] (B, 1 or 3, H, W) -> uint8 (B, 3, H, W), the extractors' input."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class Fidelity:
    """Accumulates features of real and fake images on this rank; ``compute`` gives FID and KID
    over all ranks (a collective: every rank calls it)."""

    def __init__(self, extractor: nn.Module, device: torch.device | str = "cpu", kid_subsets: int = 100,
                 kid_subset_size: int = 1000):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.extractor = extractor.to(device).eval()
        num_features = getattr(extractor, "num_features", None)
        if num_features is None:
            raise ValueError("the feature extractor needs a num_features attribute")
        given = _Given(int(num_features))
        self.fid = FrechetInceptionDistance(feature=given).to(device)
        self.kid = KernelInceptionDistance(feature=given, subsets=kid_subsets, subset_size=kid_subset_size).to(device)
        self.counts = {True: 0, False: 0}
        self.kid_subset_size = kid_subset_size

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """``images``: uint8 (B, 3, H, W) as ``to_uint8_rgb`` makes them."""
        features = self.extractor(images.to(self.fid.device)).double()
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)
        self.counts[real] += images.shape[0]

    def compute(self, accelerator=None) -> dict[str, float]:
        counts = torch.tensor([self.counts[True], self.counts[False]], device=self.fid.device)
        if accelerator is not None and accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        self.kid.subset_size = int(min(self.kid_subset_size, *counts.tolist()))
        fid = self.fid.compute()
        with torch.random.fork_rng(devices=[]):  # KID's random subsets: seeded, and the training RNG untouched
            torch.manual_seed(0)
            kid, kid_std = self.kid.compute()
        return {"fid": float(fid), "kid": float(kid), "kid_std": float(kid_std),
                "fid_real": int(counts[0]), "fid_fake": int(counts[1])}
