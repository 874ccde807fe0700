"""M as in the paper: an MDN-RNN, P(z_{t+1}, r_{t+1}, d_{t+1} | a_t, z_t, h_t).

An LSTM reads [z_t, a_t] and its new hidden state h_{t+1} feeds three heads:

- a mixture of K Gaussians over z_{t+1}: ``model.mixture: per_dim`` gives *each*
  dimension its own K logits, means and scales (as in Ha & Schmidhuber), so every
  dimension picks its component on its own; ``joint`` has K logits for the whole z and
  a diagonal Gaussian per component, so one pick moves all dimensions together,
- the reward r_{t+1} (regression; only trained when ``model.predict_reward``),
- a logit of d_{t+1}, the probability that the game ended the episode.

The dream samples z_{t+1} at temperature τ: mixture logits / τ, σ · √τ.  Its random
numbers (:meth:`MDNRNN.sample_noise`) are a standard Gumbel per component — the component
is the argmax of logits / τ + Gumbel — and a standard normal ε per dimension of z.
A joint mixture draws one Gumbel per component, shared by every dimension.

Training runs ``nn.LSTM`` over whole subsequences.  Stepping (``observe``,
``imagine_step``) runs the same LSTM cell as two GEMMs on fused copies of its weights,
since the dream's speed hangs on it (docs/benchmarks.md, "Dream").

Time (``model.time_input``): the LSTM also reads t / ``env.max_steps``, the step's index in
its episode, and the state carries t as a third tensor (B, 1).  Training windows are
short (``model.seq_len``) and start from a zero state, so without it M cannot tell the
first minute of a game from the last; TakeCover sends more imps as it goes on.

Dropout (Wellmer & Kwok 2021, "Dropout's Dream Land"): with ``model.dropout`` = p,
training drops z inputs (a mask per sequence) and units of the recurrent h (a mask
per batch, on the columns of the recurrent weights, so the fused ``nn.LSTM`` still
runs), scaling the kept ones by 1 / (1 - p).  The dream (``cmaes.dream_dropout``)
thins the cell's [z, h] input the same way with one mask per dream; the heads and
the real game always use the whole M.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.m import State, WorldModel, controller_features, hidden_parts
from worldmodel.mixture import (
    LOG_SIGMA_MAX,
    LOG_SIGMA_MIN,
    joint_log_prob,
    mdn_log_prob,
    mixture_noise,
    sample_mixture,
)
from worldmodel.torch_utils import rand

if TYPE_CHECKING:
    from worldmodel.config import Config


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w in w's dtype, the result back in x's (float32 in, float32 out, bfloat16 inside)."""
    if x.dtype == w.dtype:
        return torch.mm(x, w)
    return torch.mm(x.to(w.dtype), w).to(x.dtype)


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x``; 0 when it is empty (as :func:`worldmodel.mixture.masked_mean` with nothing unmasked)."""
    return x.sum() / max(x.numel(), 1)


# ----------------------------------------------------------------- the module

@dataclass
class _StepCache:
    """What stepping keeps between calls: the fused weights and the last row buffer."""

    key: list = field(default_factory=list)  # :meth:`MDNRNN._params_key` the weights were built at
    w_gates: torch.Tensor | None = None
    w_head: torch.Tensor | None = None
    tau: float = 1.0
    w_head_tau: torch.Tensor | None = None  # w_head with the logit columns divided by tau
    low: dict = field(default_factory=dict)  # (tau, dtype) -> both weights cast for the dream
    last: torch.Tensor | None = None  # imagine_step's last row buffer [z', h', 1, ·]


class MDNRNN(WorldModel):
    """LSTM over [z_t, a_t] with mixture-density, reward and done heads.

    State: ``(h, c)``, each (B, H), batch first; with a clock, ``(h, c, t)``, t (B, 1) the step
    count.  Noise: (Gumbel (B, K, Z), ε (B, Z)); a joint
    mixture's Gumbel is (B, K, 1).
    """

    def __init__(self, z_dim: int, action_dim: int, hidden: int, mixtures: int, *,
                 predict_reward: bool = True, reward_weight: float = 1.0, done_weight: float = 1.0,
                 done_pos_weight: float = 1.0, dropout: float = 0.0, mixture: str = "per_dim",
                 clock: int = 0) -> None:
        """``clock`` > 0: the LSTM also reads t / ``clock`` (``model.time_input``, clock = env.max_steps)."""
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if mixture not in ("per_dim", "joint"):
            raise ValueError(f"mixture must be 'per_dim' or 'joint', got {mixture!r}")
        self.joint = mixture == "joint"
        self.dropout = float(dropout)
        if clock < 0:
            raise ValueError(f"clock must be >= 0, got {clock}")
        self.clock = int(clock)
        self.z_dim, self.action_dim = z_dim, action_dim
        self.hidden, self.mixtures = hidden, mixtures
        self.predict_reward = predict_reward
        self.reward_weight, self.done_weight = reward_weight, done_weight
        self.register_buffer("done_pos_weight", torch.tensor(float(done_pos_weight)), persistent=False)
        self.lstm = nn.LSTM(z_dim + action_dim + (1 if clock else 0), hidden, batch_first=True)
        # Per z dimension: K logits, K means, K log σ (joint: K logits in all, then the
        # means and log σ); then reward and done logit.
        self.n_logits = mixtures if self.joint else z_dim * mixtures
        self.head = nn.Linear(hidden, self.n_logits + 2 * z_dim * mixtures + 2)
        self._step_cache = _StepCache()
        self.dream_dtype: torch.dtype | None = None  # see set_dream_precision
        self.autocast_training = True  # train_m may run loss() under bfloat16 autocast
        self.segment = 16  # loss(): the LSTM's steps per segment over the rows not yet padding

    @classmethod
    def from_config(cls, cfg: Config, z_dim: int, action_dim: int) -> MDNRNN:
        m = cfg.model
        return cls(z_dim, action_dim, m.hidden, m.mixtures, predict_reward=m.predict_reward,
                   reward_weight=m.reward_weight, done_weight=m.done_weight,
                   done_pos_weight=m.done_pos_weight, dropout=m.dropout, mixture=m.mixture,
                   clock=cfg.env.max_steps if m.time_input else 0)

    # ------------------------------------------------------------- heads

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions from h_{t+1}.  h: (..., H) ->

        ``logits``, ``mu``, ``log_sigma``: (..., Z, K) mixture over z_{t+1} (joint: the same
        K logits repeated for every dimension; :meth:`z_log_prob` scores it);
        ``reward``: (...) r_{t+1} (zeros when reward is not predicted);
        ``done_logit``: (...) logit of d_{t+1}.
        """
        out = self.head(h).to(self.head.weight.dtype)  # the weights' dtype even under autocast
        z, k, nl = self.z_dim, self.mixtures, self.n_logits
        if self.joint:
            logits = out[..., :nl].unsqueeze(-2).expand(*out.shape[:-1], z, k)
            mu, log_sigma = out[..., nl: nl + 2 * z * k].unflatten(-1, (2, z, k)).unbind(dim=-3)
        else:
            logits, mu, log_sigma = out[..., : 3 * z * k].unflatten(-1, (3, z, k)).unbind(dim=-3)
        reward = out[..., -2] if self.predict_reward else torch.zeros_like(out[..., -2])
        return {
            "logits": logits,
            "mu": mu,
            "log_sigma": log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
            "reward": reward,
            "done_logit": out[..., -1],
        }

    def forward(self, z: torch.Tensor, action: torch.Tensor, state: State | None = None,
                step: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], State]:
        """Run over sequences.  z: (B, T, Z), action: (B, T, A), state: :meth:`initial_state`'s
        form or None (zeros).  step: (B, T) each step's index in its episode, read with a
        clock (None: counting on from the state's t).

        Returns the heads at every step (``logits`` etc. (B, T, Z, K); ``reward``,
        ``done_logit`` (B, T)) predicting step t+1 from step t, and the final state.
        """
        out, final = self._hidden_states(z, action, state, step)
        return self.heads(out), final

    def _hidden_states(self, z: torch.Tensor, action: torch.Tensor, state: State | None,
                       step: torch.Tensor | None,
                       lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, State | None]:
        """The LSTM's pass of :meth:`forward`: h_{t+1} at every step (B, T, H), and the final state.

        ``lengths`` (B,): each row's real steps, when only those matter (training from a zero
        state). The LSTM then runs in segments of :attr:`segment` steps, each over the rows
        still going (the padding is about 40 % of a TakeCover batch): the outputs at the real
        steps are the same, those past a row's length are zeros, and there is no final state
        (None).
        """
        if state is None:
            state = self.initial_state(z.shape[0])
        h0, c0 = (s.unsqueeze(0).contiguous() for s in state[:2])
        dropping, keep = self.training and self.dropout > 0, 1.0 - self.dropout
        if dropping:
            z = z * (torch.rand_like(z[:, :1]) < keep).to(z.dtype) / keep
        inputs = [z, action]
        if self.clock:
            if step is None:
                step = state[2] + torch.arange(z.shape[1], device=z.device, dtype=state[2].dtype)
            inputs.append((step.to(z.dtype) / self.clock).unsqueeze(-1))
        x = torch.cat(inputs, dim=-1)
        params = {}
        if dropping:
            w_hh = self.lstm.weight_hh_l0
            units = (torch.rand_like(w_hh[:1]) < keep).to(w_hh.dtype) / keep  # (1, H): columns of W_hh
            params = {"weight_hh_l0": w_hh * units}

        def lstm(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
            if params:
                return torch.func.functional_call(self.lstm, params, (x, (h, c)))
            return self.lstm(x, (h, c))

        b, t = x.shape[:2]
        if lengths is None or t <= self.segment or int(lengths.max()) == 0:
            out, (h, c) = lstm(x, h0, c0)
            return out, self._next((h[0], c[0]), state, t)
        order = torch.argsort(lengths, descending=True, stable=True)  # the rows still going: a prefix
        x, left = x[order], lengths[order]
        h, c = h0[:, order], c0[:, order]
        pieces = []
        for start in range(0, t, self.segment):
            n = int((left > start).sum())
            if n == 0:
                pieces.append(pieces[0].new_zeros(b, t - start, pieces[0].shape[-1]))
                break
            out, (h, c) = lstm(x[:n, start:start + self.segment], h[:, :n], c[:, :n])
            pieces.append(F.pad(out, (0, 0, 0, 0, 0, b - n)))
        out = torch.cat(pieces, dim=1)[torch.argsort(order)]
        return out, None

    # ------------------------------------------------------------- the M interface

    def initial_state(self, batch_size: int) -> State:
        p = self.head.weight
        zeros = torch.zeros(batch_size, self.hidden, device=p.device, dtype=p.dtype)
        if self.clock:
            return (zeros, zeros.clone(), zeros.new_zeros(batch_size, 1))
        return (zeros, zeros.clone())

    def _next(self, hc: tuple[torch.Tensor, torch.Tensor], state: State, steps: int = 1) -> State:
        """The state after ``steps`` steps from ``state``: (h, c), and t + steps with a clock."""
        return (*hc, state[2] + steps) if self.clock else hc

    def feature_dim(self, mode: str) -> int:
        return self.z_dim + self.hidden * hidden_parts(mode)

    def features(self, state: State, z: torch.Tensor, mode: str) -> torch.Tensor:
        """z: (B, Z), state (h, c) each (B, H) -> "zh": [z, h] (B, Z+H); "zch": [z, c, h] (B, Z+2H).

        "zh" of what :meth:`imagine_step` returned last is a view of its row buffer (no copy).
        """
        h, c = state[0], state[1]
        if hidden_parts(mode) == 1 and self._is_last(state, z):
            return self._step_cache.last[:, : self.z_dim + self.hidden]
        return controller_features(z, h, c, mode)

    def sample_noise(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """(Gumbel (B, K, Z) or joint (B, K, 1), ε (B, Z)) on M's device; see :func:`mixture_noise`."""
        return mixture_noise((batch_size,), self.z_dim, self.mixtures, generator, self.head.weight.device,
                             joint=self.joint)

    def z_log_prob(self, p: dict[str, torch.Tensor], z_next: torch.Tensor) -> torch.Tensor:
        """log p(z_{t+1}) under :meth:`heads` ``p``, summed over dimensions.  z_next (..., Z) -> (...)."""
        if self.joint:
            return joint_log_prob(p["logits"][..., 0, :], p["mu"], p["log_sigma"], z_next)
        return mdn_log_prob(p["logits"], p["mu"], p["log_sigma"], z_next).sum(dim=-1)

    def dropout_masks(self, batch_size: int, rate: float, generator: torch.Generator | None) -> torch.Tensor:
        """(B, Z + H) masks over the cell's [z, h] input: 0 with probability ``rate``, else 1 / (1 - rate)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        u = rand((batch_size, self.z_dim + self.hidden), generator, self.head.weight.device)
        return (u >= rate).to(u.dtype).div_(1.0 - rate)

    def observe(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        """z_t: (B, Z), a_t: (B, A) -> state_{t+1}.  Inference only (no gradients)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.observe(state, z, action)
        _, h, c = self._cell(self._row(state, z, action), state[1], self._weights(1.0)[0])
        return self._next((h, c), state)

    def set_dream_precision(self, dtype: torch.dtype | None) -> None:
        """Multiply in ``dtype`` (bfloat16) in :meth:`imagine_step` and :meth:`judge_step`.

        The two matrix products of a step are most of the dream's time, and bfloat16 makes
        them about 7× faster on a CPU with AMX (docs/benchmarks.md).  Their inputs are
        rounded to 8 significant bits; the cell state, the sampling and everything else stay
        float32, and so does :meth:`observe`, which the real game uses.
        """
        self.dream_dtype = dtype

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

        noise: :meth:`sample_noise` rows; None draws them from ``generator`` (τ = 0 draws
        nothing).  dropout: :meth:`dropout_masks` rows (B, Z + H), multiplying the cell's
        [z, h] input.  h' and z' are written into one fresh row buffer [z', h', 1, ·], so
        that the next step (and :meth:`features`) can use it without copying.
        """
        if torch.is_grad_enabled():  # only then: under inference_mode, no_grad slows every op of the step
            with torch.no_grad():
                return self.imagine_step(state, z, action, temperature, generator, noise, dropout)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        n, zd, k = z.shape[0], self.z_dim, self.mixtures
        if noise is None and temperature > 0:
            noise = self.sample_noise(n, generator)
        w_gates, w_head = self._weights(temperature, self.dream_dtype)
        row = self._row(state, z, action)
        if dropout is not None:  # a thinned copy: the row buffer also holds the controller's features
            row = torch.cat([row[:, : zd + self.hidden] * dropout, row[:, zd + self.hidden:]], dim=1)
        nxt, h, c = self._cell(row, state[1], w_gates)
        out = _mm(nxt[:, zd: zd + self.hidden + 1], w_head)  # [h', 1] -> (B, logits + 2KZ + 2)
        if self.joint:  # the K logits repeated over Z: every dimension then picks the same one
            mix = out.new_empty(n, 3, k, zd)
            mix[:, 0] = out[:, :k, None]
            mix[:, 1:] = out[:, k: k + 2 * k * zd].view(n, 2, k, zd)
        else:
            mix = out[:, : 3 * k * zd].view(n, 3, k, zd)
        z_next = sample_mixture(mix, temperature, noise, out=nxt[:, :zd])
        self._step_cache.last = nxt
        reward = out[:, -2] if self.predict_reward else torch.zeros_like(out[:, -2])
        return self._next((h, c), state), z_next, reward, torch.sigmoid(out[:, -1])

    def judge_step(self, state: State, z: torch.Tensor, action: torch.Tensor
                   ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """The LSTM step and the head's reward and done columns alone: no mixture, no sample."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.judge_step(state, z, action)
        w_gates, w_head = self._weights(1.0, self.dream_dtype)
        nxt, h, c = self._cell(self._row(state, z, action), state[1], w_gates)
        hid = nxt[:, self.z_dim: self.z_dim + self.hidden + 1]  # [h', 1]
        out = _mm(hid, w_head[:, -2:])  # (B, [r, done logit])
        reward = out[:, 0] if self.predict_reward else torch.zeros_like(out[:, 0])
        return self._next((h, c), state), reward, torch.sigmoid(out[:, 1])

    # ------------------------------------------------------------- the fused step

    def _weights(self, temperature: float, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's two weight matrices, rebuilt when a parameter changes (or moves).

        W_gates (Z + H + 1 + A (+ 1), 4H): rows follow the row buffer [z, h, 1, a (, t / clock)], so the biases
        ride on the 1 column; gate columns i, f, o, g, so that one sigmoid covers three.
        W_head (H + 1, 3KZ + 2; joint K + 2KZ + 2): rows [h', 1]; mixture columns laid out
        (3, K, Z) (joint: K logits, then (2, K, Z)), so the component choice reduces over K
        with Z contiguous, logit columns divided by τ; the done bias less
        log(done_pos_weight), so that the step returns a calibrated P(done).
        dtype: both cast to it (cached per τ), for :meth:`set_dream_precision`.
        """
        lstm, head, cache = self.lstm, self.head, self._step_cache
        key = self._params_key()
        if cache.key != key:
            z, hid, k = self.z_dim, self.hidden, self.mixtures
            ifog = torch.cat([torch.arange(2 * hid), torch.arange(3 * hid, 4 * hid), torch.arange(2 * hid, 3 * hid)])
            nl = self.n_logits
            kz = torch.arange(2 * z * k).view(2, z, k).transpose(1, 2).reshape(-1) + nl
            logit_rows = torch.arange(k) if self.joint else torch.arange(z * k).view(z, k).t().reshape(-1)
            rows = torch.cat([logit_rows, kz, torch.arange(nl + 2 * z * k, nl + 2 * z * k + 2)]).to(head.weight.device)
            ifog = ifog.to(rows.device)
            w_ih, w_hh = lstm.weight_ih_l0[ifog], lstm.weight_hh_l0[ifog]
            bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[ifog]
            cache.w_gates = torch.cat([w_ih[:, :z].t(), w_hh.t(), bias[None], w_ih[:, z:].t()]).contiguous()
            cache.w_head = torch.cat([head.weight[rows].t(), head.bias[rows][None]]).contiguous()
            # A BCE that weighs deaths by w learns logit(p) + log w; the dream needs p itself.
            cache.w_head[-1, -1] -= torch.log(self.done_pos_weight)
            cache.key, cache.tau, cache.w_head_tau, cache.low = key, 1.0, cache.w_head, {}
        if temperature in (0.0, 1.0):
            w_gates, w_head = cache.w_gates, cache.w_head
        else:
            if cache.tau != temperature:
                cache.w_head_tau = cache.w_head.clone()
                cache.w_head_tau[:, : self.n_logits] /= temperature
                cache.tau = temperature
            w_gates, w_head = cache.w_gates, cache.w_head_tau
        if dtype is None or dtype == w_gates.dtype:
            return w_gates, w_head
        low = cache.low.get((temperature, dtype))
        if low is None:
            low = cache.low[(temperature, dtype)] = (w_gates.to(dtype), w_head.to(dtype))
        return low

    def _params_key(self) -> list[tuple[int, int]]:
        """(data_ptr, version) of every parameter: it changes when one is updated in place or moved.

        Read through ``_parameters``: nn.Module's attribute lookup would cost more than the check.
        """
        params = [p for module in (self.lstm, self.head) for p in module._parameters.values()]
        try:
            return [(p.data_ptr(), p._version) for p in params]
        except RuntimeError:  # parameters made under torch.inference_mode() keep no version counter
            return [(p.data_ptr(), 0 if p.is_inference() else p._version) for p in params]

    def _is_last(self, state: State, z: torch.Tensor) -> bool:
        """Are z and h the views into :meth:`imagine_step`'s last row buffer?"""
        buf = self._step_cache.last
        return (buf is not None and z.shape[0] == buf.shape[0] and z.data_ptr() == buf.data_ptr()
                and state[0].data_ptr() == buf[:, self.z_dim].data_ptr()
                and z.stride() == state[0].stride() == buf.stride()
                and (not buf.is_inference() or torch.is_inference_mode_enabled()))

    def _row(self, state: State, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The row buffer [z, h, 1, a] (B, Z + H + 1 + A), with a clock [z, h, 1, a, t / clock];
        the last step's one when it holds z, h."""
        tail = torch.cat([action, state[2] / self.clock], dim=1) if self.clock else action
        if self._is_last(state, z):
            self._step_cache.last[:, self.z_dim + self.hidden + 1:] = tail
            return self._step_cache.last
        h = state[0]
        return torch.cat([z, h, h.new_ones(z.shape[0], 1), tail], dim=1)

    def _cell(self, row: torch.Tensor, c: torch.Tensor,
              w_gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One LSTM step in place.  row (B, Z + H + 1 + A), c (B, H) -> (a fresh row buffer
        with h' and its 1 written, h' (B, H) a view into it, c' (B, H))."""
        zd, hid = self.z_dim, self.hidden
        gates = _mm(row, w_gates)  # (B, 4H): i, f, o, g
        sig = gates[:, : 3 * hid].sigmoid_()
        g = gates[:, 3 * hid:].tanh_()
        c = sig[:, hid: 2 * hid].mul_(c).addcmul_(sig[:, :hid], g)  # c' = f c + i g
        nxt = torch.empty_like(row)
        nxt[:, zd + hid] = 1.0
        h = torch.mul(sig[:, 2 * hid:], torch.tanh(c, out=g), out=nxt[:, zd: zd + hid])  # h' = o tanh(c')
        return nxt, h, c

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._losses(batch, None, skip_padding=True)[0]

    def loss_and_state(self, batch: dict[str, torch.Tensor],
                       state: State | None = None) -> tuple[dict[str, torch.Tensor], State]:
        """Masked losses on real subsequences (see :meth:`WorldModel.loss` for the batch).

        z_nll: -log p(z_{t+1} | h_{t+1}), divided by the z dimensions and averaged over
            steps where both t and t+1 are inside the episode (the last step of a
            window has no z_{t+1} to predict).
        reward: (r̂_{t+1} - r_{t+1})², over valid steps; 0 when not predicted.
        done: BCE(d̂_{t+1}, terminated_t) with ``done_pos_weight`` on deaths, over valid steps.

        ``state``: where the windows begin (None: zeros), for training with a carried state
        (``model.carry_state``); returns the terms and the state after the windows.
        """
        return self._losses(batch, state, skip_padding=False)

    def _losses(self, batch: dict[str, torch.Tensor], state: State | None,
                skip_padding: bool) -> tuple[dict[str, torch.Tensor], State | None]:
        """:meth:`loss_and_state`; ``skip_padding``: the LSTM skips the padding too (no final
        state then: None), as :meth:`loss` does for training from zeros."""
        z, mask = batch["z"], batch["mask"]
        lengths = None
        if skip_padding:  # windows are real up to their length, padding after it (make_batch)
            lengths = mask.sum(dim=1)
            if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
                lengths = None
        out, final = self._hidden_states(z, batch["action"], state, batch.get("step"), lengths)
        # The heads run on the real steps only (the padding is about 40 % of a TakeCover
        # batch): the same losses as masking all B x T rows, in less time.
        has_next = torch.zeros_like(mask)
        has_next[:, :-1] = mask[:, :-1] & mask[:, 1:]  # z_{t+1} is in the window too
        p = self.heads(out[mask])  # (N, ...), N real steps
        with_next = has_next[mask]
        z_logp = self.z_log_prob({k: v[with_next] for k, v in p.items()}, z[:, 1:][has_next[:, :-1]])
        z_nll = _mean(-z_logp / self.z_dim)
        if self.predict_reward:
            reward = _mean((p["reward"] - batch["reward"][mask]) ** 2)
        else:
            reward = z_nll.new_zeros(())
        done = _mean(F.binary_cross_entropy_with_logits(
            p["done_logit"], batch["terminated"][mask].to(z_nll.dtype), pos_weight=self.done_pos_weight,
            reduction="none"))
        loss = z_nll + self.reward_weight * reward + self.done_weight * done
        return {"loss": loss, "z_nll": z_nll, "reward": reward, "done": done}, final

