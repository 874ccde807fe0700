"""V: the convolutional VAE that compresses a 64×64×3 frame into a latent z.

The architecture is the paper's (Ha & Schmidhuber 2018, appendix A.1):

- encoder: four stride-2 convolutions, kernel 4, ReLU, with 32, 64, 128, 256
  channels (64 → 31 → 14 → 6 → 2 pixels), flattened to 2·2·256 = 1024, then two
  linear heads for μ and log σ².
- decoder: linear z → 1024, reshaped to a 1024×1×1 image, then four stride-2
  transposed convolutions (128 k5, 64 k5, 32 k6, 3 k6; 1 → 5 → 13 → 30 → 64
  pixels), ReLU between them and a sigmoid at the end.

Frames arrive as uint8 (B, 64, 64, 3) arrays; :func:`preprocess` turns them into
float (B, 3, 64, 64) in [0, 1].
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from worldmodel.errors import UserError
from worldmodel.io import load_checkpoint, load_state_dict_checked, save_checkpoint

if TYPE_CHECKING:
    from worldmodel.config import Config

FRAME_SHAPE = (64, 64, 3)
ENCODED = 2 * 2 * 256  # flattened encoder output and decoder input


def preprocess(frames: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 frames (B, 64, 64, 3) -> float (B, 3, 64, 64) in [0, 1] on ``device``.

    The conversion happens on ``device``, so only uint8 bytes cross to a GPU.
    The permute is a view: the result has channels_last strides, which the CPU
    convolutions run as fast as contiguous NCHW (docs/benchmarks.md), so no copy.
    """
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # e.g. a read-only memory map; torch wants writable memory
    x = torch.as_tensor(frames).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


class VectorConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution whose input is a 1×1 image, computed as the matrix product it is.

    Each input channel k scatters its kernel W[k] onto the output, so for a 1×1
    input ``out[c, i, j] = sum_k x[k] W[k, c, i, j] + b[c]``: one (B, C_in) @
    (C_in, C_out·kh·kw) product.  Same weights, same result as the convolution,
    but about 9× faster on a CPU, where this layer took a third of the VAE step
    (docs/benchmarks.md).  Inputs larger than 1×1 take the ordinary convolution.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """x: (B, C_in, 1, 1) -> (B, C_out, kh, kw)."""
        if x.shape[-2:] != (1, 1) or output_size is not None or self.groups != 1:
            return super().forward(x, output_size)
        kh, kw = self.kernel_size
        weight = self.weight.reshape(self.in_channels, -1)
        if self.bias is None:
            out = x.reshape(x.shape[0], -1) @ weight
        else:
            out = torch.addmm(self.bias.repeat_interleave(kh * kw), x.reshape(x.shape[0], -1), weight)
        return out.view(x.shape[0], self.out_channels, kh, kw)


class ConvVAE(nn.Module):
    """The paper's ConvVAE.  ``z_dim``: latent size Z."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2), nn.ReLU(),
            nn.Conv2d(128, 256, 4, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(ENCODED, z_dim)
        self.fc_logvar = nn.Linear(ENCODED, z_dim)
        self.fc_decode = nn.Linear(z_dim, ENCODED)
        self.decoder = nn.Sequential(
            VectorConvTranspose2d(ENCODED, 128, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 6, stride=2), nn.Sigmoid(),
        )

    @classmethod
    def from_config(cls, cfg: Config) -> ConvVAE:
        return cls(cfg.vae.z_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 64, 64) in [0, 1] -> mu, logvar: (B, Z)."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, Z) -> reconstruction (B, 3, 64, 64) in [0, 1]."""
        h = self.fc_decode(z).view(-1, ENCODED, 1, 1)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, 3, 64, 64) -> (recon (B, 3, 64, 64), mu (B, Z), logvar (B, Z)).

        z is sampled with the reparameterisation z = mu + sigma * eps.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z), mu, logvar


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_tolerance: float, beta: float, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The negative ELBO with free bits, as the paper's code computes it.

    x, recon: (B, 3, 64, 64); mu, logvar: (B, Z); weight: None or per-pixel weights
    (B, 1, 64, 64) of the squared error (:func:`pixel_weights`).  Every returned term
    is a scalar averaged over the batch:

    - ``recon_raw``: sum over pixels of (x - x̂)²  (a Gaussian -log p(x|z) up to constants)
    - ``recon``:  the same with each pixel's error times its weight (= recon_raw without weights)
    - ``kl_raw``: KL(q(z|x) ‖ N(0, I)) summed over z
    - ``kl``:     the same, floored per image at kl_tolerance · Z (free bits)
    - ``loss``:   recon + beta · kl
    """
    z_dim = mu.shape[1]
    sq = (x - recon).pow(2)
    recon_raw = sq.sum(dim=(1, 2, 3)).mean()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    kl_floored = torch.clamp(kl, min=kl_tolerance * z_dim)
    out = {
        "recon": recon_raw if weight is None else (sq * weight).sum(dim=(1, 2, 3)).mean(),
        "recon_raw": recon_raw,
        "kl_raw": kl.mean(),
        "kl": kl_floored.mean(),
    }
    out["loss"] = out["recon"] + beta * out["kl"]
    return out


# ----------------------------------------------------------------- colour balance

COLOUR_LEVELS = 8  # levels per channel of the colour histogram: 8³ = 512 bins


def colour_bins(frames: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """uint8 frames (..., 3) -> the colour bin of every pixel (...), in [0, COLOUR_LEVELS³)."""
    shift = 8 - int(np.log2(COLOUR_LEVELS))
    if isinstance(frames, torch.Tensor):
        q = frames.to(torch.int64) >> shift
    else:
        q = frames.astype(np.int64) >> shift
    return (q[..., 0] * COLOUR_LEVELS + q[..., 1]) * COLOUR_LEVELS + q[..., 2]


def colour_weights(frames: np.ndarray, gamma: float, max_weight: float) -> np.ndarray:
    """Per-colour-bin weights of the reconstruction error that favour rare colours.

    frames: uint8 (N, H, W, 3), a sample of the training frames.  A bin that holds a
    share p of the pixels gets a weight ∝ p^-gamma, capped at ``max_weight`` times the
    weight of the commonest colour; the table is then scaled so that the mean weight
    over the sample's pixels is 1, which keeps the reconstruction term on the scale
    of the unweighted one.  gamma = 0 gives 1 everywhere (the paper's loss).  Bins
    that never occur get the largest weight.  Returns float32 (COLOUR_LEVELS³,).

    Why: in TakeCover a distant fireball is a few bright pixels on a grey floor, so
    the plain squared error barely notices when V drops it (docs/results.md).
    """
    counts = np.bincount(colour_bins(frames).ravel(), minlength=COLOUR_LEVELS ** 3).astype(np.float64)
    share = counts / max(counts.sum(), 1.0)
    seen = share > 0
    w = np.ones_like(share)
    if gamma > 0 and seen.any():
        w[seen] = (share[seen] / share.max()) ** -gamma
        w = np.minimum(w, max_weight)
        w[~seen] = w[seen].max()
    w /= (share * w).sum() if seen.any() else 1.0
    return w.astype(np.float32)


def pixel_weights(frames: np.ndarray | torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, 64, 64, 3) and a :func:`colour_weights` table -> weights (B, 1, 64, 64)."""
    bins = torch.as_tensor(colour_bins(frames), device=table.device)
    return table[bins].unsqueeze(1)


def save_vae(path: str | os.PathLike, vae: ConvVAE) -> None:
    """Write V's weights atomically as ``{"z_dim": Z, "state_dict": ...}`` (CPU tensors)."""
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    save_checkpoint(path, {"z_dim": int(vae.z_dim), "state_dict": state})


def load_vae(path: str | os.PathLike, z_dim: int, device: torch.device | str = "cpu") -> ConvVAE:
    """Load weights written by :func:`save_vae`; a file whose Z is not ``z_dim`` is a UserError."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "z_dim" not in ckpt:
        raise UserError(f"{path}: not a VAE weights file (expected keys z_dim, state_dict)")
    stored = int(ckpt["z_dim"])
    if stored != z_dim:
        raise UserError(
            f"{path}: VAE was trained with z_dim {stored}, config expects vae.z_dim={z_dim}"
        )
    vae = ConvVAE(z_dim)
    load_state_dict_checked(vae, ckpt["state_dict"], path)
    return vae.to(device).eval()


@torch.inference_mode()
def encode_frames(vae: ConvVAE, frames: np.ndarray, batch_size: int,
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames (T, 64, 64, 3) -> mu, logvar: (T, Z) float32 numpy arrays, in batches."""
    mus, logvars = [], []
    for start in range(0, len(frames), batch_size):
        mu, logvar = vae.encode(preprocess(frames[start:start + batch_size], device))
        mus.append(mu.float().cpu().numpy())
        logvars.append(logvar.float().cpu().numpy())
    if not mus:
        empty = np.zeros((0, vae.z_dim), dtype=np.float32)
        return empty, empty.copy()
    return np.concatenate(mus), np.concatenate(logvars)
