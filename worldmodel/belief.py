"""M as a belief-state model with overshooting (Gregor et al. 2019, "Shaping Belief States with
Generative Environment Models for RL").

Two recurrent parts:

- The *belief* LSTM filters real data.  The paper writes b_t = f(b_{t-1}, x_t, a_{t-1}), reading
  the stream ..., a_{t-1}, x_t, a_t, ...  This repo pairs each z_t with the action taken after it
  (worldmodel/m.py): ``observe(state_t, z_t, a_t)`` returns state_{t+1} = (b_h, b_c) =
  LSTM(state_t, [z_t, a_t]).  That has read z_{≤t} and a_{≤t}: the paper's b_t with a_t already
  folded in.
- The *simulation core*, a smaller GRU cell, starts from that belief, s_1 = tanh(W b_h + β), and
  is driven by the actions that follow: s_k = GRU(s_{k-1}, a_{t+k-1}) for k = 2 .. K.  One head
  (laid out as the MDN-RNN's) reads s_k and predicts z_{t+k} (a mixture of ``model.mixtures``
  Gaussians for each dimension), r_{t+k} and d_{t+k}.  Prediction k is conditioned on
  z_{≤t}, a_{≤t+k-1}, the same information as the paper's core started at b_t and driven by
  a_t ... a_{t+k-1}.  With K = ``model.overshoot`` = 1 the core never steps: a one-step model
  (an MDN-RNN with one tanh layer between h and its heads).

Overshooting trains the belief to hold what predicts z up to K steps ahead, not just the next one.

The dream closes the loop through the belief.  ``imagine_step`` filters (z_t, a_t) into the belief,
samples z_{t+1} from the core's first prediction (from s_1), and the next step filters that
sample in turn.  It does not roll the core open loop, because:

- C must see the belief.  In the real environment it sees the belief filtered from V's z; a dream
  rolled in the core would hand it the core's state, a feature C never meets in reality.
- The core is trained only K steps out; dreams run for up to ``cmaes.max_steps`` (2100) steps.
- A step then costs what an MDN-RNN step costs, plus one small layer.

The core's K-step predictions thus shape the belief during training and measure M in
validation (``z_nll_K``); the dream uses the first of them.  Noise is the MDN-RNN's
(:func:`worldmodel.mixture.mixture_noise`), so common random numbers work as there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.m import State, WorldModel, controller_features, hidden_parts
from worldmodel.mixture import (
    LOG_SIGMA_MAX,
    LOG_SIGMA_MIN,
    masked_mean,
    mdn_log_prob,
    mdn_sample,
    mixture_noise,
)

if TYPE_CHECKING:
    from worldmodel.config import Config



def _ahead(x: torch.Tensor, j: int) -> torch.Tensor:
    """x shifted j steps back in time: out[:, t] = x[:, t + j], zero / False past the window.

    x: (B, T, ...) -> (B, T, ...).
    """
    if j == 0:
        return x
    pad = x.new_zeros((x.shape[0], min(j, x.shape[1]), *x.shape[2:]))
    return torch.cat([x[:, j:], pad], dim=1)


def overshoot_targets(batch: dict[str, torch.Tensor], overshoot: int) -> list[dict[str, torch.Tensor]]:
    """What step k = 1 .. K of the core started at position t consumes and must predict, for every t.

    batch: as :meth:`WorldModel.loss` reads it (``z`` (B, T, Z), ``action`` (B, T, A), ``reward``,
    ``terminated``, ``mask`` (B, T)).  Entry k - 1 holds, at [:, t]:

    - ``action`` (B, T, A): a_{t+k-1}, which the core consumes at step k (k ≥ 2; a_t is in the belief);
    - ``z`` (B, T, Z): z_{t+k}, with ``z_mask`` (B, T);
    - ``reward``, ``done`` (B, T): r_{t+k}, d_{t+k}, which follow a_{t+k-1} (batch step t+k-1),
      with ``rd_mask`` (B, T).

    Step t+j is in the episode of step t ("live_j") when ``mask`` holds at t .. t+j and no death
    comes at t .. t+j-1: a death at step i means the episode ended after a_i, so nothing follows
    it.  z_{t+k} is a target where live_k; r_{t+k} and d_{t+k} where live_{k-1}.  Targets beyond
    the window are masked.
    """
    mask, term = batch["mask"], batch["terminated"]
    live = mask  # live_0
    out = []
    for k in range(1, overshoot + 1):
        rd_mask = live
        live = live & ~_ahead(term, k - 1) & _ahead(mask, k)
        out.append({
            "action": _ahead(batch["action"], k - 1),
            "z": _ahead(batch["z"], k), "z_mask": live,
            "reward": _ahead(batch["reward"], k - 1), "done": _ahead(term, k - 1), "rd_mask": rd_mask,
        })
    return out


class BeliefModel(WorldModel):
    """Belief LSTM over [z_t, a_t], and a GRU simulation core with mixture, reward and done heads.

    State: the belief ``(b_h, b_c)``, each (B, H), batch first.  Noise: (Gumbel (B, K, Z), ε (B, Z)),
    K the mixture count, as the MDN-RNN's.
    """

    def __init__(self, z_dim: int, action_dim: int, hidden: int, mixtures: int, *, sim_hidden: int,
                 overshoot: int = 1, overshoot_weight: float = 1.0, predict_reward: bool = True,
                 reward_weight: float = 1.0, done_weight: float = 1.0, done_pos_weight: float = 1.0) -> None:
        super().__init__()
        if overshoot < 1:
            raise ValueError(f"overshoot must be >= 1, got {overshoot}")
        self.z_dim, self.action_dim = z_dim, action_dim
        self.hidden, self.sim_hidden, self.mixtures = hidden, sim_hidden, mixtures
        self.overshoot, self.overshoot_weight = overshoot, overshoot_weight
        self.predict_reward = predict_reward
        self.reward_weight, self.done_weight = reward_weight, done_weight
        self.register_buffer("done_pos_weight", torch.tensor(float(done_pos_weight)), persistent=False)
        self.belief = nn.LSTM(z_dim + action_dim, hidden, batch_first=True)
        self.sim_init = nn.Linear(hidden, sim_hidden)
        self.sim = nn.GRUCell(action_dim, sim_hidden)
        # Per z dimension: K logits, K means, K log σ; then reward and done logit.
        self.head = nn.Linear(sim_hidden, 3 * z_dim * mixtures + 2)

    @classmethod
    def from_config(cls, cfg: Config, z_dim: int, action_dim: int) -> BeliefModel:
        m = cfg.model
        return cls(z_dim, action_dim, m.hidden, m.mixtures,
                   sim_hidden=m.sim_hidden if m.sim_hidden is not None else max(1, m.hidden // 2),
                   overshoot=m.overshoot, overshoot_weight=m.overshoot_weight,
                   predict_reward=m.predict_reward, reward_weight=m.reward_weight,
                   done_weight=m.done_weight, done_pos_weight=m.done_pos_weight)

    # ------------------------------------------------------------- the parts

    def heads(self, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions from a core state s_k.  s: (..., S) ->

        ``logits``, ``mu``, ``log_sigma``: (..., Z, K) mixture over z_{t+k};
        ``reward``: (...) r_{t+k} (zeros when reward is not predicted); ``done_logit``: (...) d_{t+k}.
        """
        out = self.head(s)
        zk = self.z_dim * self.mixtures
        logits, mu, log_sigma = out[..., : 3 * zk].unflatten(-1, (3, self.z_dim, self.mixtures)).unbind(-3)
        reward = out[..., -2] if self.predict_reward else torch.zeros_like(out[..., -2])
        return {"logits": logits, "mu": mu, "log_sigma": log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
                "reward": reward, "done_logit": out[..., -1]}

    def sim_start(self, b_h: torch.Tensor) -> torch.Tensor:
        """s_1 = tanh(W b_h + β).  b_h: (..., H) -> (..., S)."""
        return torch.tanh(self.sim_init(b_h))

    def _filter(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        """One belief step: state_t (b_h, b_c), z_t (B, Z), a_t (B, A) -> state_{t+1}, each (B, H)."""
        h0, c0 = (s.unsqueeze(0).contiguous() for s in state)
        _, (h, c) = self.belief(torch.cat([z, action], dim=-1).unsqueeze(1), (h0, c0))
        return (h[0], c[0])

    # ------------------------------------------------------------- the M interface

    def initial_state(self, batch_size: int) -> State:
        p = self.head.weight
        zeros = torch.zeros(batch_size, self.hidden, device=p.device, dtype=p.dtype)
        return (zeros, zeros.clone())

    def feature_dim(self, mode: str) -> int:
        return self.z_dim + self.hidden * hidden_parts(mode)

    def features(self, state: State, z: torch.Tensor, mode: str) -> torch.Tensor:
        """z: (B, Z), belief (b_h, b_c) each (B, H) -> "zh": [z, b_h] (B, Z+H); "zch": [z, b_c, b_h] (B, Z+2H)."""
        b_h, b_c = state
        return controller_features(z, b_h, b_c, mode)

    def sample_noise(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """(Gumbel (B, K, Z), ε (B, Z)) on M's device; see :func:`worldmodel.mixture.mixture_noise`."""
        return mixture_noise((batch_size,), self.z_dim, self.mixtures, generator, self.head.weight.device)

    def observe(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        """z_t: (B, Z), a_t: (B, A) -> the belief state_{t+1}.  Inference only (no gradients)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._filter(state, z, action)
        return self._filter(state, z, action)

    def imagine_step(
        self,
        state: State,
        z: torch.Tensor,
        action: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, ...] | None = None,
        dropout: torch.Tensor | None = None,
    ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_t: (B, Z), a_t: (B, A) -> (state_{t+1}, z_{t+1} (B, Z), r_{t+1} (B,), P(d_{t+1}) (B,)).

        The belief filters (z_t, a_t); the core's first prediction, from s_1, gives z_{t+1} at
        temperature τ (logits / τ, σ √τ), r_{t+1} and a calibrated P(d_{t+1}).
        noise: :meth:`sample_noise` rows; None draws them from ``generator`` (τ = 0 draws nothing).
        """
        if dropout is not None:
            raise ValueError("the belief model has no dream dropout (see WorldModel.dropout_masks)")
        if torch.is_grad_enabled():  # only then: under inference_mode, no_grad slows every op
            with torch.no_grad():
                return self.imagine_step(state, z, action, temperature, generator, noise)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        state = self._filter(state, z, action)
        p = self.heads(self.sim_start(state[0]))
        z_next = mdn_sample(p["logits"], p["mu"], p["log_sigma"], temperature, generator, noise)
        # A BCE that weighs deaths by w learns logit(p) + log w; the dream needs p itself.
        done = torch.sigmoid(p["done_logit"] - torch.log(self.done_pos_weight))
        return state, z_next, p["reward"], done

    # ------------------------------------------------------------- the objective

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The overshooting objective on real subsequences (see :meth:`WorldModel.loss` for the batch).

        For every position t and step k = 1 .. K of the core started at the belief after (z_t, a_t),
        masked as :func:`overshoot_targets` says and averaged over valid positions:

            z_nll_k  = -log p(z_{t+k} | s_k), per-dimension mixture, averaged over z's dimensions
            reward_k = (r̂_{t+k} - r_{t+k})²                   (0 when reward is not predicted)
            done_k   = BCE(d̂_{t+k}, d_{t+k}), deaths weighted by ``done_pos_weight``

            loss = z_nll_1 + reward_weight · reward_1 + done_weight · done_1
                 + overshoot_weight · Σ_{k=2..K} (z_nll_k + reward_weight · reward_k + done_weight · done_k)

        Returns ``loss``; the one-step terms ``z_nll_1`` (also as ``z_nll``, the MDN-RNN's name),
        ``reward``, ``done``; the sums over k ≥ 2 ``overshoot_nll``, ``overshoot_reward``,
        ``overshoot_done``; and ``z_nll_K`` (K = ``overshoot``), M's NLL K steps ahead.
        """
        b_h, _ = self.belief(torch.cat([batch["z"], batch["action"]], dim=-1))  # [:, t]: b_h of state_{t+1}
        s = self.sim_start(b_h)  # (B, T, S): s_1 at every position
        z_nll, reward, done = [], [], []
        for k, target in enumerate(overshoot_targets(batch, self.overshoot), start=1):
            if k > 1:
                s = self.sim(target["action"].flatten(0, 1), s.flatten(0, 1)).view_as(s)
            p = self.heads(s)
            logp = mdn_log_prob(p["logits"], p["mu"], p["log_sigma"], target["z"])
            z_nll.append(masked_mean(-logp.mean(dim=-1), target["z_mask"]))
            if self.predict_reward:
                reward.append(masked_mean((p["reward"] - target["reward"]) ** 2, target["rd_mask"]))
            else:
                reward.append(z_nll[-1].new_zeros(()))
            bce = F.binary_cross_entropy_with_logits(p["done_logit"], target["done"].to(s.dtype),
                                                     pos_weight=self.done_pos_weight, reduction="none")
            done.append(masked_mean(bce, target["rd_mask"]))
        zero = z_nll[0].new_zeros(())
        overshoot_nll, overshoot_reward, overshoot_done = (sum(x[1:], zero) for x in (z_nll, reward, done))
        one_step = z_nll[0] + self.reward_weight * reward[0] + self.done_weight * done[0]
        beyond = overshoot_nll + self.reward_weight * overshoot_reward + self.done_weight * overshoot_done
        return {
            "loss": one_step + self.overshoot_weight * beyond,
            "z_nll": z_nll[0], "reward": reward[0], "done": done[0],
            "overshoot_nll": overshoot_nll, "overshoot_reward": overshoot_reward, "overshoot_done": overshoot_done,
            "z_nll_1": z_nll[0], f"z_nll_{self.overshoot}": z_nll[-1],
        }

