"""M as in the paper: an MDN-RNN, P(z_{t+1}, r_{t+1}, d_{t+1} | a_t, z_t, h_t).

An LSTM reads [z_t, a_t] and its new hidden state h_{t+1} feeds three heads:

- a mixture of K Gaussians for *each* dimension of z_{t+1} (every dimension has
  its own K logits, means and scales, as in Ha & Schmidhuber),
- the reward r_{t+1} (regression; only trained when ``model.predict_reward``),
- a logit of d_{t+1}, the probability that the game ended the episode.

The dream samples z_{t+1} at temperature τ: mixture logits / τ, σ · √τ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.m import State, WorldModel

if TYPE_CHECKING:
    from worldmodel.config import Config

#: log σ of a mixture component is clamped to this range, so a collapsing component
#: cannot drive the likelihood to infinity (or σ to zero) in float32.
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -7.0, 5.0

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------- mixture maths

def mdn_log_prob(logits: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
    """log p(x) under a 1-D Gaussian mixture, independently for every leading index.

    logits, mu, log_sigma: (..., K); x: (...) -> log p: (...)
    log p(x) = logsumexp_k [ log π_k + log N(x; μ_k, σ_k) ]
    """
    log_pi = F.log_softmax(logits, dim=-1)
    log_normal = -0.5 * ((x.unsqueeze(-1) - mu) / log_sigma.exp()) ** 2 - log_sigma - _LOG_SQRT_2PI
    return torch.logsumexp(log_pi + log_normal, dim=-1)


def mdn_sample(logits: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, temperature: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample each 1-D mixture at temperature τ.  logits, mu, log_sigma: (..., K) -> (...).

    τ > 0: component k ~ softmax(logits / τ) (Gumbel-max), x ~ N(μ_k, τ σ_k²).
    τ = 0: the mean of the most likely component (no noise at all).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        k = logits.argmax(dim=-1, keepdim=True)
        return mu.gather(-1, k).squeeze(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    gumbel = -torch.log(-torch.log(u))
    k = (logits / temperature + gumbel).argmax(dim=-1, keepdim=True)
    mu_k = mu.gather(-1, k).squeeze(-1)
    sigma_k = log_sigma.gather(-1, k).squeeze(-1).exp()
    eps = torch.randn(mu_k.shape, generator=generator, device=mu_k.device, dtype=mu_k.dtype)
    return mu_k + sigma_k * math.sqrt(temperature) * eps


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (same shape); 0 when none are."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------- the module

class MDNRNN(WorldModel):
    """LSTM over [z_t, a_t] with mixture-density, reward and done heads.

    State: ``(h, c)``, each (B, H), batch first.  Training runs ``nn.LSTM`` over
    whole subsequences; stepping runs the same LSTM one step at a time.
    """

    def __init__(self, z_dim: int, action_dim: int, hidden: int, mixtures: int, *,
                 predict_reward: bool = True, reward_weight: float = 1.0, done_weight: float = 1.0,
                 done_pos_weight: float = 1.0) -> None:
        super().__init__()
        self.z_dim, self.action_dim = z_dim, action_dim
        self.hidden, self.mixtures = hidden, mixtures
        self.predict_reward = predict_reward
        self.reward_weight, self.done_weight = reward_weight, done_weight
        self.register_buffer("done_pos_weight", torch.tensor(float(done_pos_weight)), persistent=False)
        self.lstm = nn.LSTM(z_dim + action_dim, hidden, batch_first=True)
        # Per z dimension: K logits, K means, K log σ; then reward and done logit.
        self.head = nn.Linear(hidden, 3 * z_dim * mixtures + 2)

    @classmethod
    def from_config(cls, cfg: Config, z_dim: int, action_dim: int) -> MDNRNN:
        m = cfg.model
        return cls(z_dim, action_dim, m.hidden, m.mixtures, predict_reward=m.predict_reward,
                   reward_weight=m.reward_weight, done_weight=m.done_weight,
                   done_pos_weight=m.done_pos_weight)

    # ------------------------------------------------------------- heads

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions from h_{t+1}.  h: (..., H) ->

        ``logits``, ``mu``, ``log_sigma``: (..., Z, K) mixture over z_{t+1};
        ``reward``: (...) r_{t+1} (zeros when reward is not predicted);
        ``done_logit``: (...) logit of d_{t+1}.
        """
        out = self.head(h)
        zk = self.z_dim * self.mixtures
        mix = out[..., : 3 * zk].unflatten(-1, (3, self.z_dim, self.mixtures))
        logits, mu, log_sigma = mix.unbind(dim=-3)
        reward = out[..., -2] if self.predict_reward else torch.zeros_like(out[..., -2])
        return {
            "logits": logits,
            "mu": mu,
            "log_sigma": log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
            "reward": reward,
            "done_logit": out[..., -1],
        }

    def forward(self, z: torch.Tensor, action: torch.Tensor,
                state: State | None = None) -> tuple[dict[str, torch.Tensor], State]:
        """Run over sequences.  z: (B, T, Z), action: (B, T, A), state: (h, c) each (B, H) or None.

        Returns the heads at every step (``logits`` etc. (B, T, Z, K); ``reward``,
        ``done_logit`` (B, T)) predicting step t+1 from step t, and the final state.
        """
        if state is None:
            state = self.initial_state(z.shape[0])
        h0, c0 = (s.unsqueeze(0).contiguous() for s in state)
        out, (h, c) = self.lstm(torch.cat([z, action], dim=-1), (h0, c0))
        return self.heads(out), (h[0], c[0])

    # ------------------------------------------------------------- the M interface

    def initial_state(self, batch_size: int) -> State:
        p = self.head.weight
        zeros = torch.zeros(batch_size, self.hidden, device=p.device, dtype=p.dtype)
        return (zeros, zeros.clone())

    def feature_dim(self, mode: str) -> int:
        return self.z_dim + self.hidden * _n_hidden_parts(mode)

    def features(self, state: State, z: torch.Tensor, mode: str) -> torch.Tensor:
        """z: (B, Z), state (h, c) each (B, H) -> "zh": [z, h] (B, Z+H); "zch": [z, c, h] (B, Z+2H)."""
        h, c = state
        return torch.cat([z, h] if _n_hidden_parts(mode) == 1 else [z, c, h], dim=-1)

    def _step(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        h, c = state
        x = torch.cat([z, action], dim=-1).unsqueeze(1)
        _, (h1, c1) = self.lstm(x, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        return (h1[0], c1[0])

    @torch.no_grad()
    def observe(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        """z_t: (B, Z), a_t: (B, A) -> state_{t+1}.  Inference only (no gradients)."""
        return self._step(state, z, action)

    @torch.no_grad()
    def imagine_step(
        self,
        state: State,
        z: torch.Tensor,
        action: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_t: (B, Z), a_t: (B, A) -> (state_{t+1}, z_{t+1} (B, Z), r_{t+1} (B,), P(d_{t+1}) (B,))."""
        state = self._step(state, z, action)
        p = self.heads(state[0])
        z_next = mdn_sample(p["logits"], p["mu"], p["log_sigma"], temperature, generator)
        return state, z_next, p["reward"], torch.sigmoid(p["done_logit"])

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masked losses on real subsequences (see :meth:`WorldModel.loss` for the batch).

        z_nll: -log p(z_{t+1} | h_{t+1}), averaged over z dimensions and then over
            steps where both t and t+1 are inside the episode (the last step of a
            window has no z_{t+1} to predict).
        reward: (r̂_{t+1} - r_{t+1})², over valid steps; 0 when not predicted.
        done: BCE(d̂_{t+1}, terminated_t) with ``done_pos_weight`` on deaths, over valid steps.
        """
        p, _ = self(batch["z"], batch["action"])
        mask = batch["mask"]
        z_mask = mask[:, :-1] & mask[:, 1:]
        z_logp = mdn_log_prob(p["logits"][:, :-1], p["mu"][:, :-1], p["log_sigma"][:, :-1],
                              batch["z"][:, 1:])
        z_nll = masked_mean(-z_logp.mean(dim=-1), z_mask)
        if self.predict_reward:
            reward = masked_mean((p["reward"] - batch["reward"]) ** 2, mask)
        else:
            reward = z_nll.new_zeros(())
        done_bce = F.binary_cross_entropy_with_logits(
            p["done_logit"], batch["terminated"].to(z_nll.dtype), pos_weight=self.done_pos_weight,
            reduction="none")
        done = masked_mean(done_bce, mask)
        loss = z_nll + self.reward_weight * reward + self.done_weight * done
        return {"loss": loss, "z_nll": z_nll, "reward": reward, "done": done}


def _n_hidden_parts(mode: str) -> int:
    if mode == "zh":
        return 1
    if mode == "zch":
        return 2
    raise ValueError(f"unknown feature mode {mode!r} (expected 'zh' or 'zch')")
