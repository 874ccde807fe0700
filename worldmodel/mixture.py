"""Mixtures of Gaussians over z: their log-likelihood and their sampling at temperature τ.

The M's that predict z_{t+1} as a mixture (the MDN-RNN and the belief-state model) score and
sample it here, so that their dreams draw the same random numbers: a standard Gumbel per
component (the component is the argmax of logits / τ + Gumbel) and a standard normal ε per
dimension of z (:func:`mixture_noise`).  The TD-VAE (one Gaussian) takes only the bounds on
log σ and :func:`masked_mean`, the masked average every M's losses use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from worldmodel.torch_utils import rand

#: log σ of a mixture component is clamped to this range, so a collapsing component
#: cannot drive the likelihood to infinity (or σ to zero) in float32.
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -7.0, 5.0

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def mdn_log_prob(logits: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
    """log p(x) under a 1-D Gaussian mixture, independently for every leading index.

    logits, mu, log_sigma: (..., K); x: (...) -> log p: (...)
    log p(x) = logsumexp_k [ log π_k + log N(x; μ_k, σ_k) ]
    """
    log_pi = F.log_softmax(logits, dim=-1)
    log_normal = -0.5 * ((x.unsqueeze(-1) - mu) / log_sigma.exp()) ** 2 - log_sigma - _LOG_SQRT_2PI
    return torch.logsumexp(log_pi + log_normal, dim=-1)


def joint_log_prob(logits: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
    """log p(x) under one mixture of K diagonal Gaussians over the whole vector.

    logits: (..., K); mu, log_sigma: (..., Z, K); x: (..., Z) -> log p: (...)
    log p(x) = logsumexp_k [ log π_k + Σ_d log N(x_d; μ_dk, σ_dk) ]
    """
    log_normal = -0.5 * ((x.unsqueeze(-1) - mu) / log_sigma.exp()) ** 2 - log_sigma - _LOG_SQRT_2PI
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + log_normal.sum(dim=-2), dim=-1)


def mixture_noise(batch_shape: tuple[int, ...], z_dim: int, mixtures: int, generator: torch.Generator | None,
                  device: torch.device | str, joint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What sampling z once consumes: (Gumbel (..., K, Z), ε (..., Z)), standard Gumbel and normal.

    The uniforms behind the Gumbels are drawn as (..., Z, K), then ε, from ``generator``.
    joint: one Gumbel per component for all dimensions, (..., K, 1), its uniforms drawn as (..., 1, K).
    """
    u = rand((*batch_shape, 1 if joint else z_dim, mixtures), generator, device)
    eps = rand((*batch_shape, z_dim), generator, device, normal=True)
    return (-torch.log(-torch.log(u))).transpose(-1, -2).contiguous(), eps


def mdn_sample(logits: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, temperature: float,
               generator: torch.Generator | None = None,
               noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Sample each 1-D mixture at temperature τ.  logits, mu, log_sigma: (..., Z, K) -> (..., Z).

    τ > 0: component k ~ softmax(logits / τ) (Gumbel-max), x ~ N(μ_k, τ σ_k²).
    τ = 0: the mean of the most likely component (no noise at all).
    noise: as from :func:`mixture_noise`; None draws it from ``generator``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and noise is None:
        noise = mixture_noise(logits.shape[:-2], logits.shape[-2], logits.shape[-1], generator, logits.device)
    tempered = logits / temperature if temperature > 0 else logits
    return sample_mixture(torch.stack([tempered, mu, log_sigma], dim=-3).transpose(-1, -2), temperature, noise)


def sample_mixture(mix: torch.Tensor, temperature: float, noise: tuple[torch.Tensor, torch.Tensor] | None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`mdn_sample` in place.  mix: (..., 3, K, Z) = [logits / τ, μ, log σ], overwritten;
    noise: (Gumbel (..., K, Z) or (..., K, 1), ε (..., Z)), unused at τ = 0 -> z (..., Z), written
    into ``out``.  A joint mixture passes its logits repeated over Z and a Gumbel (..., K, 1),
    so every dimension picks the same component.

    The component is picked with float arithmetic, a one-hot sign(x - max_k x) + 1 and one
    multiply-sum, since argmax + gather is far slower on the CPU; an exact tie (rare)
    averages the tied components.
    """
    x = mix.select(-3, 0) if temperature == 0 else mix.select(-3, 0).add_(noise[0])
    pick = x.sub_(x.amax(-2, keepdim=True)).sign_().add_(1.0)  # (..., K, Z): 1 for the winner, else 0
    picked = (mix.narrow(-3, 1, 2) * pick.unsqueeze(-3)).sum(-2).div_(pick.sum(-2, keepdim=True))
    mu, log_sigma = picked.unbind(-2)
    if temperature == 0:
        return mu if out is None else out.copy_(mu)
    sigma = log_sigma.clamp_(LOG_SIGMA_MIN, LOG_SIGMA_MAX).exp_().mul_(math.sqrt(temperature))
    return torch.addcmul(mu, sigma, noise[1], out=out)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (same shape); 0 when none are."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
