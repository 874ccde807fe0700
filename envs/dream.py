"""The dream: M rolled forward on its own samples while C picks the actions.

Two faces of one loop:

- :func:`dream_rollouts` runs N dreams at once (a whole CMA-ES generation, population ×
  rollouts) as one batched tensor program: features -> controller -> ``imagine_step`` at
  temperature τ -> reward and done.  Finished dreams are dropped from the batch, so the
  compute shrinks as they die; the loop ends when none is left or at ``max_steps``.
- :class:`DreamEnv` is the same dream, one at a time, as a ``gymnasium.Env``.

Reward: ``"alive"`` (TakeCover) gives +1 for every step, the last one included, so a
dream's return is its length; ``"model"`` (CarRacing) sums M's predicted r_{t+1};
``"alive+model"`` (TakeCover with ``cmaes.hazard_penalty``) gives 1 + r_{t+1}, where M's r is
the hazard critic's penalty (worldmodel/ensemble.py).
Done: ``"threshold"`` ends a dream when P(d_{t+1}) > ``done_threshold``; ``"sample"``
ends it when u < P(d_{t+1}) with u ~ U(0, 1).  The done rule is the dream's, not M's, so
u is the dream's own draw (per stream, after M's noise), not part of M's noise.

Common random numbers: every dream belongs to a noise *stream* (``streams``).  Each step
draws M's noise for the S streams only (``m.sample_noise(S, generator)``) and hands every
live dream its stream's row (``imagine_step(..., noise=...)``), so candidate i's rollout j
sees the same start z and the same noise as every other candidate's rollout j, however
many dreams have already ended; fitness differences then come from the controllers, not
from luck.

Dreams that start inside real episodes (``cmaes.midway_starts`` > 0): a dream from step 0
with M's empty state must invent the late game (more imps, more fireballs) on its own, and
M's dreams keep the death rate flat where the game's climbs (docs/results.md).  A
:class:`MidwayStarts` pool holds points t0 inside real episodes, with M's state after it
observed the real steps 0 … t0-1, exactly the state the agent's M has at t0 in the game;
a dream from there plays on for at most ``max_steps - t0`` steps.

Dream dropout (``cmaes.dream_dropout`` > 0): before the first step every stream draws
one mask (``m.dropout_masks``), and its dreams run in that thinned M to the end.  Each
rollout of a candidate is then a slightly different world (Wellmer & Kwok 2021), while
candidates still meet the same worlds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from agents.controller import ControllerSpec, act_batched, action_space, add_action_noise
from agents.shield import shield_actions
from worldmodel.config import Config
from worldmodel.errors import UserError
from worldmodel.latents import Latents
from worldmodel.m import State, WorldModel
from worldmodel.runs import Run, open_run
from worldmodel.torch_utils import rand, resolve_precision

REWARD_MODES = {"takecover": "alive", "carracing": "model"}


@dataclass(frozen=True)
class DreamSettings:
    """How a dream runs; :meth:`from_config` reads ``controller`` and ``cmaes``."""

    features: str = "zh"
    temperature: float = 1.15
    max_steps: int = 2100
    done: str = "threshold"
    done_threshold: float = 0.5
    reward: str = "alive"
    action_noise: float = 0.0
    dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config, **overrides) -> DreamSettings:
        c = cfg.cmaes
        reward = REWARD_MODES[cfg.env.name]
        if reward == "alive" and c.hazard_penalty > 0:
            reward = "alive+model"
        base = cls(features=cfg.controller.features, temperature=c.temperature, max_steps=c.max_steps,
                   done=c.done, done_threshold=c.done_threshold, reward=reward,
                   action_noise=cfg.controller.action_noise, dropout=c.dream_dropout)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def ended(self, done_prob: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """done_prob (B,), u (B,) or None -> bool (B,)."""
        if self.done == "sample":
            return u < done_prob
        return done_prob > self.done_threshold


@dataclass
class DreamResult:
    """returns (N,) float; lengths (N,) int64 steps taken; terminated (N,) bool (M ended it)."""

    returns: torch.Tensor
    lengths: torch.Tensor
    terminated: torch.Tensor


# ----------------------------------------------------------------- where dreams start

def load_start_latents(run: Run | str | os.PathLike) -> torch.Tensor:
    """V's posterior at step 0 of every real episode: (E, 2, Z) = [mu, logvar] per episode."""
    folder = run.latents_dir if isinstance(run, Run) else Path(run) / "latents"
    paths = sorted(p for p in Path(folder).glob("ep_*.npz") if not p.name.startswith("."))
    if not paths:
        raise UserError(f"{folder}: no latent files; run `python run.py train-vae` first")
    rows = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                rows.append(np.stack([data["mu"][0], data["logvar"][0]]).astype(np.float32))
        except (OSError, ValueError, KeyError, IndexError, EOFError) as exc:
            raise UserError(f"{path}: corrupt latent file ({type(exc).__name__})") from None
    return torch.from_numpy(np.stack(rows))


def sample_start_z(starts: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n start latents z0 = mu + σ·ε from random episodes.  starts: (E, 2, Z) -> (n, Z)."""
    idx = torch.randint(starts.shape[0], (n,), generator=generator, device=_gen_device(generator))
    return posterior_sample(starts[idx.to(starts.device)], generator)


def posterior_sample(rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = mu + σ·ε for rows (n, 2, Z) of [mu, logvar] -> (n, Z)."""
    mu, logvar = rows.unbind(1)
    eps = rand(tuple(mu.shape), generator, rows.device, normal=True)
    return mu + torch.exp(0.5 * logvar) * eps


@dataclass(frozen=True)
class MidwayStarts:
    """Points inside real episodes where dreams may start (``cmaes.midway_starts``).

    latents (K, 2, Z): V's posterior [mu, logvar] at step t0 of the episode; state: M's state
    after it observed the episode's steps 0 … t0-1 (a State of (K, ...) tensors, as in the
    game); elapsed (K,) int64: t0, so a dream from there lasts at most max_steps - t0 steps.
    """

    latents: torch.Tensor
    state: State
    elapsed: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]


def pick_midway_points(lengths: np.ndarray, count: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points (episode, t0), t0 uniform over the game's time, not over the data's steps.

    t0 ~ U{1, …, longest - 2}, then an episode that was still going after step t0 + 1 (so it was
    alive at t0), uniformly among those.  The late game, which the data holds few episodes of,
    thus gets as many starts as the early game, which dreams from step 0 already cover.
    lengths (E,) -> (episodes (count,), t0 (count,)), sorted by t0, longest first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    longest = int(lengths.max(initial=0))
    if longest < 3:
        raise UserError(f"cmaes.midway_starts: the longest real episode has {longest} steps; "
                        "a dream cannot start inside it (set cmaes.midway_starts to 0)")
    order = np.argsort(lengths, kind="stable")
    by_length = lengths[order]
    t0 = np.sort(rng.integers(1, longest - 1, size=count))[::-1]
    first = np.searchsorted(by_length, t0 + 2, side="left")  # episodes with length >= t0 + 2
    pick = first + np.floor(rng.random(count) * (len(lengths) - first)).astype(np.int64)
    return order[pick], t0.astype(np.int64)


@torch.inference_mode()
def midway_starts(m: WorldModel, data: Latents, count: int, rng: np.random.Generator) -> MidwayStarts:
    """A pool of ``count`` starts inside the episodes of ``data``, M's state filtered up to each.

    M observes each chosen episode from step 0 with z sampled from V's posterior (as M was
    trained) and the real actions; the rows whose t0 is reached leave the batch, longest first.
    """
    episodes, t0 = pick_midway_points(data.lengths, count, rng)
    device = next(m.parameters(), torch.zeros(0)).device
    state = m.initial_state(count)
    base = data.starts[episodes]
    for t in range(int(t0[0])):
        live = int(np.count_nonzero(t0 > t))  # t0 is sorted descending: rows [0, live) still filter
        rows = base[:live] + t
        mu, logvar = data.mu[rows], data.logvar[rows]
        z = mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape, dtype=np.float32)
        a = torch.from_numpy(data.action[rows]).to(device)
        head = m.observe(tuple(s[:live] for s in state), torch.from_numpy(z).to(device), a)
        state = tuple(torch.cat([h, s[live:]]) if live < count else h for h, s in zip(head, state))
    at = base + t0
    latents = torch.from_numpy(np.stack([data.mu[at], data.logvar[at]], axis=1)).to(device)
    return MidwayStarts(latents=latents, state=state, elapsed=torch.from_numpy(t0).to(device))


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


# ----------------------------------------------------------------- the batched dream

def _shielded(m: WorldModel, state: State, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The actions a dream step plays: ``a``, with C's riskiest moves replaced by the critic's
    holds where the ensemble carries the shield into the dream (``cmaes.dream_shield``)."""
    margin = getattr(m, "dream_shield", 0.0)
    return a if margin <= 0 else shield_actions(m.critic, m.critic_state(state), z, a, margin)[0]


def blind_policy(action_at: Callable[[int], float]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A ``policy`` for :func:`dream_rollouts` from a blind one (step t -> the action every dream
    takes at t; one action dimension, as TakeCover's)."""
    def act(t: int, features: torch.Tensor) -> torch.Tensor:
        return features.new_full((features.shape[0], 1), action_at(t))

    return act


@torch.inference_mode()
def dream_rollouts(m: WorldModel, params: torch.Tensor, spec: ControllerSpec, z0: torch.Tensor,
                   settings: DreamSettings, generator: torch.Generator | None = None,
                   streams: torch.Tensor | None = None,
                   policy: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                   state0: State | None = None, elapsed: torch.Tensor | None = None,
                   done_trace: list[torch.Tensor] | None = None) -> DreamResult:
    """Run N dreams to their end, each with its own controller.

    params: (N, P) controller weights; z0: (N, Z) start latents; ``policy(t, features)``, when
    given, acts instead of the controllers: features (B, F) of the B live dreams at step t ->
    actions (B, A) (a baseline such as the blind pacer; ``params`` may then be (N, 0)).
    streams: (N,) int64 noise
    stream of each dream, values in [0, S) (None: every dream its own stream, S = N).
    With ``settings.dropout`` > 0, the S streams' masks are drawn from ``generator`` first.
    Per step M's noise for the S streams is drawn from ``generator`` (then the done
    uniforms (S,) when ``settings.done == "sample"``, then the action noise (S, A) when
    ``settings.action_noise`` > 0), so the draws do not depend on how many dreams are
    still alive.
    state0: M's state for each dream (None: ``m.initial_state(N)``); elapsed (N,) int64: steps
    each dream's episode has already lasted (None: 0), so dream i lasts at most
    ``max_steps - elapsed[i]`` steps (a :class:`MidwayStarts` point).  lengths count the
    dream's own steps.
    done_trace: when given, each step's P(done) of the live dreams (B,) is appended to it (with a
    done threshold above 1 no dream ends early, so every entry covers all N: agents/calibrate.py).
    """
    device = z0.device
    n = params.shape[0]
    n_streams = n if streams is None else int(streams.max()) + 1
    stream = None if streams is None else streams.to(device)
    rows = torch.arange(n, device=device)  # original index of each live dream
    returns = torch.zeros(n, device=device)
    limit = None if elapsed is None else (settings.max_steps - elapsed.to(device)).clamp(min=1)
    lengths = torch.full((n,), settings.max_steps, dtype=torch.int64, device=device) if limit is None else limit.clone()
    terminated = torch.zeros(n, dtype=torch.bool, device=device)
    p, z, state = params.to(device), z0, m.initial_state(n) if state0 is None else state0
    masks = m.dropout_masks(n_streams, settings.dropout, generator) if settings.dropout > 0 else None
    if masks is not None and stream is not None:
        masks = masks.index_select(0, stream)
    for t in range(settings.max_steps):
        features = m.features(state, z, settings.features)
        a = act_batched(spec, p, features) if policy is None else policy(t, features)
        noise = m.sample_noise(n_streams, generator)
        u = rand((n_streams,), generator, device) if settings.done == "sample" else None
        eps = rand((n_streams, a.shape[1]), generator, device, normal=True) if settings.action_noise > 0 else None
        if stream is not None:
            noise = tuple(x.index_select(0, stream) for x in noise)
            u = None if u is None else u.index_select(0, stream)
            eps = None if eps is None else eps.index_select(0, stream)
        if eps is not None:
            a = add_action_noise(spec, a, settings.action_noise, eps)
        a = _shielded(m, state, z, a)
        thinned = {} if masks is None else {"dropout": masks}  # an M without dream dropout never sees it
        state, z, r, d = m.imagine_step(state, z, a, settings.temperature, noise=noise, **thinned)
        if done_trace is not None:
            done_trace.append(d.float().cpu())
        if settings.reward != "alive":
            returns.index_add_(0, rows, r.to(returns.dtype))
        ended = settings.ended(d, u)
        out = ended if limit is None else ended | (limit <= t + 1)  # died, or reached max_steps
        if not bool(out.any()):
            continue
        lengths[rows[ended]] = t + 1
        terminated[rows[ended]] = True
        keep = (~out).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        state = tuple(s.index_select(0, keep) for s in state)
        z, p, rows = z.index_select(0, keep), p.index_select(0, keep), rows.index_select(0, keep)
        limit = None if limit is None else limit.index_select(0, keep)
        stream = keep if stream is None else stream.index_select(0, keep)
        masks = None if masks is None else masks.index_select(0, keep)
    if settings.reward == "alive":
        returns = lengths.to(returns.dtype)
    elif settings.reward == "alive+model":
        returns += lengths.to(returns.dtype)
    return DreamResult(returns=returns, lengths=lengths, terminated=terminated)


# ----------------------------------------------------------------- the dream as an environment

class DreamEnv(gym.Env):
    """One dream as a ``gymnasium.Env``.

    observation: M's features of the current z (F,) float32; action: the real env's
    action space.  ``reset(seed=s)`` seeds a torch generator with ``s``; the start z and
    every step's noise come from it in the order :func:`dream_rollouts` draws them, so
    a single dream there with ``torch.Generator().manual_seed(s)`` follows the same path.
    ``render()`` decodes the current z with V (64×64×3 uint8) when a VAE is given.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, m: WorldModel, starts: torch.Tensor, env_name: str,
                 settings: DreamSettings | None = None, vae: torch.nn.Module | None = None,
                 render_mode: str | None = None) -> None:
        if render_mode not in (None, "rgb_array"):
            raise UserError(f"dream: render_mode {render_mode!r} is not supported (rgb_array)")
        self.m = m.eval()
        self.starts = starts
        self.settings = settings or DreamSettings(reward=REWARD_MODES[env_name])
        self.vae = vae.eval() if vae is not None else None
        self.render_mode = render_mode
        dim = m.feature_dim(self.settings.features)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
        self.action_space = action_space(env_name)
        self._device = next(m.parameters(), torch.zeros(0)).device
        self._gen: torch.Generator | None = None
        self._state = None
        self._z: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._t = 0

    def _obs(self) -> np.ndarray:
        f = self.m.features(self._state, self._z, self.settings.features)
        return f[0].detach().cpu().numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or self._gen is None:
            torch_seed = seed if seed is not None else int(self.np_random.integers(2**62))
            self._gen = torch.Generator(device="cpu").manual_seed(torch_seed)
        with torch.inference_mode():
            self._z = sample_start_z(self.starts, 1, self._gen).to(self._device)
            dropout = self.settings.dropout
            self._mask = self.m.dropout_masks(1, dropout, self._gen) if dropout > 0 else None
            self._state = self.m.initial_state(1)
            self._t = 0
            return self._obs(), {}

    def step(self, action):
        if self._z is None:
            raise RuntimeError("DreamEnv.step() called before reset()")
        low, high = self.action_space.low, self.action_space.high
        a = torch.from_numpy(np.clip(np.asarray(action, dtype=np.float32).reshape(1, -1), low, high)).to(self._device)
        with torch.inference_mode():
            a = _shielded(self.m, self._state, self._z, a)
            noise = self.m.sample_noise(1, self._gen)
            u = rand((1,), self._gen, self._device) if self.settings.done == "sample" else None
            self._state, self._z, r, d = self.m.imagine_step(
                self._state, self._z, a, self.settings.temperature,
                noise=noise, **({} if self._mask is None else {"dropout": self._mask}))
            terminated = bool(self.settings.ended(d, u)[0])
            obs = self._obs()
        self._t += 1
        reward = {"alive": 1.0, "model": float(r[0]), "alive+model": 1.0 + float(r[0])}[self.settings.reward]
        truncated = not terminated and self._t >= self.settings.max_steps
        return obs, reward, terminated, truncated, {"done_prob": float(d[0])}

    def render(self):
        if self.vae is None or self._z is None:
            return None
        with torch.inference_mode():
            frame = self.vae.decode(self._z.to(next(self.vae.parameters()).device))[0]
        return (frame.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def load_world_model(run: Run, device: str | torch.device = "cpu") -> WorldModel:
    """The dream's M: ``run.m_path`` (written by ``python run.py train-rnn``), or, with
    ``model.ensemble`` > 1 or a hazard critic, all the M's behind one
    :class:`worldmodel.ensemble.Ensemble`."""
    from envs import action_dim
    from worldmodel.train_m import load_m

    members = []
    for k in range(run.m_files):
        path = run.member_path(k)
        if not path.exists():
            raise UserError(f"{path}: no M; run `python run.py train-rnn` first")
        members.append(load_m(path, run.cfg, z_dim=run.cfg.vae.z_dim,
                              action_dim=action_dim(run.cfg.env.name), device=device))
    critic = members.pop() if run.cfg.model.hazard_horizon else None
    return assemble_world_model(run.cfg, members, critic, device)


def assemble_world_model(cfg: Config, members: list[WorldModel], critic: WorldModel | None,
                         device: str | torch.device = "cpu") -> WorldModel:
    """The dream's M from its parts: the one member, or the members and the hazard critic behind one
    :class:`worldmodel.ensemble.Ensemble` with ``cfg``'s dream rules; in ``system.precision``."""
    from worldmodel.ensemble import Ensemble

    m = members[0]
    if len(members) > 1 or critic is not None:
        c = cfg.cmaes
        m = Ensemble(members, c.disagreement, c.ensemble_done, critic, c.hazard_penalty, c.hazard_threshold,
                     cfg.controller.shield if c.dream_shield else 0.0, c.ensemble_moves).to(device)
    m.set_dream_precision(resolve_precision(cfg.system.precision, device))
    return m


def make_dream_env(run: Run | str | os.PathLike, temperature: float | None = None,
                   max_steps: int | None = None, done: str | None = None,
                   done_threshold: float | None = None, render_mode: str | None = "rgb_array",
                   device: str | torch.device = "cpu") -> DreamEnv:
    """The dream of a trained run: M (and V for ``render``, when present) from its folder.

    Unset arguments take the run's ``cmaes`` config (temperature, max_steps, done, ...).
    """
    if not isinstance(run, Run):
        if not (Path(run) / "config.yaml").exists():
            raise UserError(f"{run}: not a run folder (no config.yaml)")
        run = open_run(run, None, create=False)
    m = load_world_model(run, device)
    vae = None
    if run.vae_path.exists():
        from worldmodel.vae import load_vae

        vae = load_vae(run.vae_path, run.cfg.vae.z_dim, device=device)
    settings = DreamSettings.from_config(run.cfg, temperature=temperature, max_steps=max_steps,
                                         done=done, done_threshold=done_threshold)
    return DreamEnv(m, load_start_latents(run), run.cfg.env.name, settings, vae=vae,
                    render_mode=render_mode if vae is not None else None)
