"""M as an action-conditioned TD-VAE (Gregor, Papamakarios, Besse, Buesing, Weber, ICLR 2019).

Parts, named as the paper names them (s is the latent state, b the belief):

- belief  b_t = LSTM(b_{t-1}, [z_t, a_{t-1}]): deterministic, reads z_{≤t} and a_{<t} only;
- p_B(s | b): the belief distribution;
- q_S(s_{t1} | s_{t2}, b_{t1}, b_{t2}): the smoothing posterior;
- p_T(s_{t2} | s_{t1}, a_{t1} … a_{t2-1}, δ): the jumpy transition, δ = t2 - t1 ≤ D.  The action
  block is zero-padded to D actions and fed flat with a one-hot of δ (which is also its mask);
- p_D(z | s): the decoder over V's latent; reward and done heads on s.

Every distribution is a diagonal Gaussian; with ``model.tdvae_layers`` = 2, s = [s², s¹] is the
paper's two-layer hierarchy, each of p_B, q_S, p_T drawing s² first and then s¹ given s².

Training (:meth:`TDVAE.loss`) is the paper's jumpy objective (Eq. 6) on sampled pairs t1 < t2:
s_{t2} ~ p_B(· | b_{t2}), s_{t1} ~ q_S(· | s_{t2}, b_{t1}, b_{t2}), both reparameterised, and
  ELBO = log p_D(z_{t2}|s_{t2}) + log p_B(s_{t1}|b_{t1}) + log p_T(s_{t2}|s_{t1})
         - log p_B(s_{t2}|b_{t2}) - log q_S(s_{t1}|s_{t2}, b_{t1}, b_{t2}).

Time convention.  This repo pairs z_t with the action taken after it (worldmodel/m.py), the paper
pairs it with the one before.  So the state *before* step t holds b_{t-1} and a_{t-1}:
state_t = (h, c, a_prev, s, z_pred), where (h, c) is the LSTM state of b_{t-1} (zeros at t = 0),
a_prev = a_{t-1} (zeros at t = 0), s a state s_t imagined by the last dream step and z_pred the z_t
it decoded (NaN: none).  ``features``, ``observe`` and ``imagine_step`` first complete the paper's
b_t = LSTM(b_{t-1}, [z_t, a_{t-1}]); ``observe`` returns state_{t+1} = (b_t, a_t, -, NaN).

The dream rolls s forward with p_T at δ = 1.  ``imagine_step(state_t, z_t, a_t)`` takes
s_t ~ p_B(· | b_t) when z_t is not the z that M imagined last (the first step, or real z handed in
from outside, as train-rnn's done check does); when it is, it keeps the s_t that z_t was decoded
from, so that the dream is the paper's rollout in s.  Then s_{t+1} ~ p_T(s_t, a_t, δ = 1),
z_{t+1} ~ p_D(z | s_{t+1}), reward and P(done) from s_{t+1}.  The belief is still filtered with
the sampled z (at the next call), because C sees it: ``features`` = [z_t, h_t] ("zh") or
[z_t, c_t, h_t] ("zch") of b_t, as C sees it in reality.  Temperature τ scales every σ by √τ.
Noise per step: (ε of p_B (B, L·S), ε of p_T (B, L·S), ε of p_D (B, Z)), standard normals.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.m import State, WorldModel, controller_features, hidden_parts
from worldmodel.mixture import LOG_SIGMA_MAX, LOG_SIGMA_MIN, masked_mean
from worldmodel.torch_utils import rand

if TYPE_CHECKING:
    from worldmodel.config import Config

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ELU(), nn.Linear(hidden, n_out))


def normal_log_prob(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; μ, σ²) summed over the last dimension.  (..., S) -> (...)."""
    return (-0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - _LOG_SQRT_2PI).sum(-1)


class LayeredGaussian(nn.Module):
    """p(s | x) = Π_l p(s^l | x, s^{above l}), diagonal Gaussians, the top layer first.

    s: (..., L·S) laid out [top, ..., bottom]; layer i is conditioned on x and s[..., :i·S].
    """

    def __init__(self, cond_dim: int, size: int, layers: int, hidden: int) -> None:
        super().__init__()
        self.size, self.layers = size, layers
        self.nets = nn.ModuleList(_mlp(cond_dim + i * size, hidden, 2 * size) for i in range(layers))

    def _params(self, i: int, x: torch.Tensor, s_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.nets[i](torch.cat([x, s_above], -1) if i else x).chunk(2, -1)
        return mu, log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def sample(self, x: torch.Tensor, eps: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
        """x: (..., X), eps: (..., L·S) standard normal or None (the means) -> s (..., L·S).

        s^l = μ_l + scale · σ_l · ε_l (reparameterised); the dream's scale is √τ.
        """
        s = x.new_zeros((*x.shape[:-1], 0))
        for i in range(self.layers):
            mu, log_sigma = self._params(i, x, s)
            if eps is not None:
                mu = mu + scale * log_sigma.exp() * eps[..., i * self.size:(i + 1) * self.size]
            s = torch.cat([s, mu], -1)
        return s

    def log_prob(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log p(s | x), summed over layers and dimensions.  x: (..., X), s: (..., L·S) -> (...)."""
        total = s.new_zeros(s.shape[:-1])
        for i in range(self.layers):
            mu, log_sigma = self._params(i, x, s[..., : i * self.size])
            total = total + normal_log_prob(s[..., i * self.size:(i + 1) * self.size], mu, log_sigma)
        return total


# ----------------------------------------------------------------- indexing helpers

def last_index(mask: torch.Tensor, terminated: torch.Tensor) -> torch.Tensor:
    """Last step whose z a jump may land on: the last valid step, or the first death if earlier.

    mask, terminated: (B, T) bool -> (B,) int64 (-1 for an empty row).
    """
    steps = torch.arange(mask.shape[1], device=mask.device)
    last_valid = torch.where(mask, steps, -1).amax(1)
    first_death = torch.where(mask & terminated, steps, mask.shape[1]).amin(1)
    return torch.minimum(last_valid, first_death)


def sample_pairs(end: torch.Tensor, n: int, max_jump: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n pairs per row with 0 ≤ t1 < t2 = t1 + δ ≤ end, δ ≤ max_jump.  end: (B,) int64 ->

    (t1 (B, n), δ (B, n), ok (B, n) bool; False where end < 1).  t1 is uniform over
    [0, end - 1], then δ uniform over [1, min(max_jump, end - t1)].
    """
    u = rand((2, end.shape[0], n), generator, end.device)
    span = end.clamp(min=1)[:, None]
    t1 = torch.minimum((u[0] * span).long(), span - 1)  # the min guards a float u that rounds to 1
    reach = (end[:, None] - t1).clamp(1, max_jump)
    delta = 1 + torch.minimum((u[1] * reach).long(), reach - 1)
    return t1, delta, (end >= 1)[:, None].expand(-1, n)


def action_block(action: torch.Tensor, t1: torch.Tensor, delta: torch.Tensor, max_jump: int) -> torch.Tensor:
    """a_{t1} … a_{t1+δ-1}, zero-padded to D.  action: (B, T, A), t1, δ: (B, N) -> (B, N, D, A)."""
    k = torch.arange(max_jump, device=action.device)
    idx = (t1[..., None] + k).clamp(max=action.shape[1] - 1)
    rows = torch.arange(action.shape[0], device=action.device)[:, None, None]
    return action[rows, idx] * (k < delta[..., None]).to(action.dtype)[..., None]


def _at(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...), t: (B, N) -> x[b, t[b, n]]: (B, N, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], t]


def _span_sum(x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Σ_{t1 ≤ t < t2} x_t.  x: (B, T), t1, t2: (B, N), t2 ≤ T -> (B, N)."""
    c = F.pad(x.cumsum(1), (1, 0))
    return _at(c, t2) - _at(c, t1)


# ----------------------------------------------------------------- the module

class TDVAE(WorldModel):
    """Belief LSTM, p_B, q_S, p_T, p_D and reward / done heads on s.

    State: (h (B, H), c (B, H), a_prev (B, A), s (B, L·S), z_pred (B, Z)); see the module doc.
    """

    def __init__(self, z_dim: int, action_dim: int, hidden: int, state_size: int, *, layers: int = 1,
                 max_jump: int = 4, pairs: int = 16, predict_reward: bool = True, reward_weight: float = 1.0,
                 done_weight: float = 1.0, done_pos_weight: float = 1.0) -> None:
        super().__init__()
        self.z_dim, self.action_dim, self.hidden = z_dim, action_dim, hidden
        self.state_dim, self.max_jump, self.pairs = layers * state_size, max_jump, pairs
        self.predict_reward, self.reward_weight, self.done_weight = predict_reward, reward_weight, done_weight
        self.register_buffer("done_pos_weight", torch.tensor(float(done_pos_weight)), persistent=False)
        s = self.state_dim
        self.lstm = nn.LSTM(z_dim + action_dim, hidden, batch_first=True)
        self.p_belief = LayeredGaussian(hidden, state_size, layers, hidden)
        self.q_smoothing = LayeredGaussian(s + 2 * hidden, state_size, layers, hidden)
        self.p_transition = LayeredGaussian(s + max_jump * (action_dim + 1), state_size, layers, hidden)
        self.p_decoder = LayeredGaussian(s, z_dim, 1, hidden)
        self.heads = _mlp(s, hidden, 2)  # [reward, done logit]

    @classmethod
    def from_config(cls, cfg: Config, z_dim: int, action_dim: int) -> TDVAE:
        m = cfg.model
        return cls(z_dim, action_dim, m.hidden, m.tdvae_state, layers=m.tdvae_layers,
                   max_jump=m.tdvae_max_jump, pairs=m.tdvae_pairs, predict_reward=m.predict_reward,
                   reward_weight=m.reward_weight, done_weight=m.done_weight,
                   done_pos_weight=m.done_pos_weight)

    # ------------------------------------------------------------- pieces

    def beliefs(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """b_t = LSTM(b_{t-1}, [z_t, a_{t-1}]), a_{-1} = 0, b_{-1} = 0.  z: (B, T, Z), action: (B, T, A)
        -> b (B, T, H), the LSTM's output h_t at every step."""
        a_prev = F.pad(action[:, :-1], (0, 0, 1, 0))
        return self.lstm(torch.cat([z, a_prev], -1))[0]

    def transition_input(self, s: torch.Tensor, block: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """What p_T is conditioned on: [s_{t1}, the action block flat, one-hot δ].

        s: (..., L·S), block: (..., D, A) zero past δ, δ: (...) int64 in [1, D] -> (..., L·S + D·(A+1)).
        """
        one_hot = F.one_hot(delta - 1, self.max_jump).to(s.dtype)
        return torch.cat([s, block.flatten(-2), one_hot], -1)

    def reward_done(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s: (..., L·S) -> (reward (...) (zeros when not predicted), done logit (...))."""
        reward, done_logit = self.heads(s).unbind(-1)
        return (reward if self.predict_reward else torch.zeros_like(reward)), done_logit

    def jumpy_terms(self, b1: torch.Tensor, b2: torch.Tensor, z2: torch.Tensor, block: torch.Tensor,
                    delta: torch.Tensor, eps_t2: torch.Tensor,
                    eps_t1: torch.Tensor) -> dict[str, torch.Tensor]:
        """The five terms of Eq. 6 for pairs (t1, t2).  b1, b2: (..., H) beliefs; z2: (..., Z);
        block: (..., D, A); δ: (...); eps_t2, eps_t1: (..., L·S) standard normal -> each term (...)."""
        s2 = self.p_belief.sample(b2, eps_t2)  # s_{t2} ~ p_B(· | b_{t2}), drawn first
        smoothing_cond = torch.cat([s2, b1, b2], -1)
        s1 = self.q_smoothing.sample(smoothing_cond, eps_t1)  # s_{t1} ~ q_S(· | s_{t2}, b_{t1}, b_{t2})
        return {
            "decoder_log_prob": self.p_decoder.log_prob(s2, z2),
            "belief_log_prob_t1": self.p_belief.log_prob(b1, s1),
            "transition_log_prob": self.p_transition.log_prob(self.transition_input(s1, block, delta), s2),
            "belief_log_prob_t2": self.p_belief.log_prob(b2, s2),
            "smoothing_log_prob": self.q_smoothing.log_prob(smoothing_cond, s1),
        }

    def head_terms(self, s: torch.Tensor, reward: torch.Tensor,
                   ended: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared reward error and done BCE (``done_pos_weight`` on deaths) of heads(s).

        s: (..., L·S) reached by a jump; reward: (...) summed over the jump; ended: (...) bool.
        """
        pred, done_logit = self.reward_done(s)
        bce = F.binary_cross_entropy_with_logits(done_logit, ended.to(s.dtype),
                                                 pos_weight=self.done_pos_weight, reduction="none")
        return (pred - reward) ** 2, bce

    # ------------------------------------------------------------- training

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
             pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """-ELBO (Eq. 6) plus the heads' losses (see :meth:`WorldModel.loss` for ``batch``).

        ELBO pairs: t1 < t2 ≤ :func:`last_index` (z_{t2} exists and no death is crossed), δ ≤ D,
        ``model.tdvae_pairs`` per row (``pairs`` = (t1, δ), each (B, N), fixes them).  The five
        terms are reported as means over pairs, ``loss`` = -ELBO + reward_weight · reward +
        done_weight · done; ``z_nll`` (:meth:`one_step_nll`) is reported, not trained.
        """
        z, action, mask = batch["z"], batch["action"], batch["mask"]
        h = self.beliefs(z, action)
        last = last_index(mask, batch["terminated"])
        if pairs is None:
            t1, delta, ok = sample_pairs(last, self.pairs, self.max_jump, generator)
        else:
            (t1, delta), ok = pairs, torch.ones_like(pairs[0], dtype=torch.bool)
        t2 = t1 + delta
        eps = rand((2, *t1.shape, self.state_dim), generator, z.device, normal=True)
        block = action_block(action, t1, delta, self.max_jump)
        terms = self.jumpy_terms(_at(h, t1), _at(h, t2), _at(z, t2), block, delta, eps[0], eps[1])
        out = {name: masked_mean(value, ok) for name, value in terms.items()}
        elbo = (out["decoder_log_prob"] + out["belief_log_prob_t1"] + out["transition_log_prob"]
                - out["belief_log_prob_t2"] - out["smoothing_log_prob"])
        out["reward"], out["done"] = self.head_losses(h, batch, last, generator)
        out["z_nll"] = self.one_step_nll(h, z, action, mask, generator)
        out["loss"] = -elbo + self.reward_weight * out["reward"] + self.done_weight * out["done"]
        return out

    def head_losses(self, h: torch.Tensor, batch: dict[str, torch.Tensor], last: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward, done) losses of jumps drawn as the dream draws them: s_{t1} ~ p_B(b_{t1}), then
        s_{t2} ~ p_T(s_{t1}, a_{t1} … a_{t2-1}, δ), with t2 ≤ last + 1: a jump may end in the death,
        which has no z.  Targets: Σ r over the jump, and whether the episode ended within it.
        h: (B, T, H) beliefs; last: (B,) from :func:`last_index` -> two scalars.
        """
        mask = batch["mask"]
        t1, delta, ok = sample_pairs(last + 1, self.pairs, self.max_jump, generator)
        t2 = t1 + delta
        eps = rand((2, *t1.shape, self.state_dim), generator, h.device, normal=True)
        s1 = self.p_belief.sample(_at(h, t1), eps[0])
        s2 = self.p_transition.sample(self.transition_input(s1, action_block(batch["action"], t1, delta,
                                                                             self.max_jump), delta), eps[1])
        reward = _span_sum(batch["reward"] * mask.to(h.dtype), t1, t2)
        ended = _span_sum((batch["terminated"] & mask).to(h.dtype), t1, t2) > 0
        reward_err, done_bce = self.head_terms(s2, reward, ended)
        reward_loss = masked_mean(reward_err, ok) if self.predict_reward else reward_err.new_zeros(())
        return reward_loss, masked_mean(done_bce, ok)

    @torch.no_grad()
    def one_step_nll(self, h: torch.Tensor, z: torch.Tensor, action: torch.Tensor, mask: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """The dream's one-step z NLL per dimension, over steps where t and t+1 are valid:
        -log p_D(z_{t+1} | s_{t+1}) / Z, s_{t+1} ~ p_T(· | s_t, a_t, δ = 1), s_t ~ p_B(· | b_t).
        One sample of each s: an upper bound on -log p(z_{t+1} | b_t, a_t).  h: (B, T, H) -> scalar.
        """
        eps = rand((2, *h.shape[:2], self.state_dim), generator, z.device, normal=True)
        block = F.pad(action[..., None, :], (0, 0, 0, self.max_jump - 1))  # (B, T, D, A): [a_t, 0, ...]
        one = torch.ones(h.shape[:2], dtype=torch.long, device=z.device)
        s = self.p_belief.sample(h, eps[0])
        s_next = self.p_transition.sample(self.transition_input(s, block, one), eps[1])
        nll = -self.p_decoder.log_prob(s_next[:, :-1], z[:, 1:]) / self.z_dim
        return masked_mean(nll, mask[:, :-1] & mask[:, 1:])

    # ------------------------------------------------------------- the M interface

    def initial_state(self, batch_size: int) -> State:
        w = self.heads[0].weight
        zeros = w.new_zeros(batch_size, self.hidden)
        return (zeros, zeros.clone(), w.new_zeros(batch_size, self.action_dim),
                w.new_zeros(batch_size, self.state_dim), w.new_full((batch_size, self.z_dim), float("nan")))

    def _belief_step(self, state: State, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b_t = LSTM(b_{t-1}, [z_t, a_{t-1}]).  state_t, z_t (B, Z) -> (h_t, c_t), each (B, H)."""
        h, c, a_prev = state[:3]
        x = torch.cat([z, a_prev], -1)[:, None]
        _, (h, c) = self.lstm(x, (h[None].contiguous(), c[None].contiguous()))
        return h[0], c[0]

    def feature_dim(self, mode: str) -> int:
        return self.z_dim + self.hidden * hidden_parts(mode)

    def features(self, state: State, z: torch.Tensor, mode: str) -> torch.Tensor:
        """z_t: (B, Z) -> "zh": [z_t, h_t] (B, Z+H); "zch": [z_t, c_t, h_t] (B, Z+2H), of the belief b_t."""
        with torch.no_grad():
            h, c = self._belief_step(state, z)
        return controller_features(z, h, c, mode)

    def observe(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        """z_t: (B, Z), a_t: (B, A) -> state_{t+1} = (b_t, a_t, no imagined s).  No gradients."""
        with torch.no_grad():
            h, c = self._belief_step(state, z)
        return (h, c, action, torch.zeros_like(state[3]), torch.full_like(z, float("nan")))

    def sample_noise(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """(ε of p_B (B, L·S), ε of p_T (B, L·S), ε of p_D (B, Z)), standard normal, on M's device."""
        device = self.heads[0].weight.device
        return tuple(rand((batch_size, n), generator, device, normal=True)
                     for n in (self.state_dim, self.state_dim, self.z_dim))

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

        A jump of δ = 1 (:meth:`imagine_jump`).
        """
        if dropout is not None:
            raise ValueError("TD-VAE has no dream dropout (see WorldModel.dropout_masks)")
        return self.imagine_jump(state, z, action[:, None], temperature, generator, noise)

    def imagine_jump(
        self,
        state: State,
        z: torch.Tensor,
        actions: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A jumpy dream step: δ = actions.shape[1] ≤ D steps at once.

        z_t: (B, Z), actions a_t … a_{t+δ-1}: (B, δ, A) -> (state_{t+δ}, z_{t+δ} (B, Z), Σ r over the
        jump (B,), P(the episode ended within the jump) (B,)).  The belief is filtered with z_t only,
        then skips the frames the jump did not decode: the next call reads z_{t+δ} with a_{t+δ-1}.
        noise: :meth:`sample_noise` rows; None draws them from ``generator`` (τ = 0 draws nothing).
        """
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.imagine_jump(state, z, actions, temperature, generator, noise)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        n, delta = z.shape[0], actions.shape[1]
        if not 1 <= delta <= self.max_jump:
            raise ValueError(f"jump of {delta} steps: TD-VAE was trained on 1 .. {self.max_jump}")
        if noise is None and temperature > 0:
            noise = self.sample_noise(n, generator)
        eps_b, eps_t, eps_z = noise if temperature > 0 else (None, None, None)
        scale = math.sqrt(temperature)
        h, c = self._belief_step(state, z)
        carried = (z == state[4]).all(-1, keepdim=True)  # z_t is what M decoded from state's s_t
        if bool(carried.all()):  # the usual dream step: p_B is not needed
            s = state[3]
        else:
            s = torch.where(carried, state[3], self.p_belief.sample(h, eps_b, scale))
        block = F.pad(actions, (0, 0, 0, self.max_jump - delta))
        steps = torch.full((n,), delta, dtype=torch.long, device=z.device)
        s_next = self.p_transition.sample(self.transition_input(s, block, steps), eps_t, scale)
        z_next = self.p_decoder.sample(s_next, eps_z, scale)
        reward, done_logit = self.reward_done(s_next)
        # A BCE that weighs deaths by w learns logit(p) + log w; the dream needs p itself.
        p_done = torch.sigmoid(done_logit - torch.log(self.done_pos_weight))
        return (h, c, actions[:, -1], s_next, z_next), z_next, reward, p_done

