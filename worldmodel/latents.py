"""V's latents on disk and the fixed-length subsequence batches M trains on.

A latent file ``latents/ep_XXXXXX.npz`` (written by train-vae) holds, for T steps:
``mu``, ``logvar`` float32 (T, Z) of V's posterior q(z_t | frame_t), and the
episode's ``action`` (T, A), ``reward`` (T,), ``done`` (T,), ``terminated`` (T,).
Step t holds z_t, a_t and what followed a_t (r_{t+1}, d_{t+1}); only
``terminated`` (the game ended the episode) is a death target.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from worldmodel.errors import UserError

KEYS = ("mu", "logvar", "action", "reward", "done", "terminated")


@dataclass
class Latents:
    """Episodes concatenated along time (N steps in all, E episodes).

    mu, logvar: (N, Z); action: (N, A); reward: (N,); terminated: (N,) bool;
    starts, lengths: (E,) first flat index and length of each episode.
    """

    mu: np.ndarray
    logvar: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    paths: list[Path]

    @property
    def n_episodes(self) -> int:
        return len(self.lengths)

    @property
    def z_dim(self) -> int:
        return self.mu.shape[1]

    @property
    def action_dim(self) -> int:
        return self.action.shape[1]

    def subset(self, episodes: np.ndarray) -> Latents:
        """The episodes with the given indices, in that order, as a new (copied) Latents."""
        ranges = [np.arange(self.starts[i], self.starts[i] + self.lengths[i]) for i in episodes]
        rows = np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)
        lengths = self.lengths[episodes]
        return Latents(self.mu[rows], self.logvar[rows], self.action[rows], self.reward[rows],
                       self.terminated[rows], _starts(lengths), lengths, [self.paths[i] for i in episodes])

    def sample_z(self, rng: np.random.Generator) -> np.ndarray:
        """z = μ + exp(logvar / 2) · ε, ε ~ N(0, I), fresh for every step.  -> (N, Z) float32."""
        eps = rng.standard_normal(self.mu.shape, dtype=np.float32)
        return self.mu + np.exp(0.5 * self.logvar) * eps


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def list_latents(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("ep_*.npz") if not p.name.startswith("."))


def load_latent_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and check one latent file; anything wrong is a UserError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in KEYS if k not in data.files]
            if missing:
                raise UserError(f"{path}: latent file lacks {', '.join(missing)}")
            ep = {k: data[k] for k in KEYS}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{path}: corrupt or truncated latent file ({type(exc).__name__})") from None
    if ep["action"].ndim == 1:
        ep["action"] = ep["action"][:, None]
    lengths = {k: len(v) for k, v in ep.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{path}: latent arrays differ in length {lengths}")
    if lengths["mu"] == 0:
        raise UserError(f"{path}: latent file holds no steps")
    if ep["mu"].ndim != 2 or ep["logvar"].shape != ep["mu"].shape:
        raise UserError(f"{path}: mu {ep['mu'].shape} and logvar {ep['logvar'].shape} must both be (T, Z)")
    for key in ("mu", "logvar", "action", "reward"):
        if not np.isfinite(ep[key]).all():
            raise UserError(f"{path}: {key} holds NaN or inf")
    return ep


def load_latents(folder: str | os.PathLike, z_dim: int, skip_bad: bool = False) -> Latents:
    """Load every latent file in ``folder``; each must have ``z_dim`` and the same action size.

    A bad file is a UserError naming it, or (``skip_bad``) a warning and skipped.
    """
    episodes, paths = [], []
    for path in list_latents(folder):
        try:
            ep = load_latent_file(path)
            if ep["mu"].shape[1] != z_dim:
                raise UserError(
                    f"{path}: latents have z size {ep['mu'].shape[1]}, V has z_dim {z_dim}; "
                    "rerun `python run.py train-vae`")
            if episodes and ep["action"].shape[1] != episodes[0]["action"].shape[1]:
                raise UserError(f"{path}: action size {ep['action'].shape[1]}, "
                                f"{paths[0]} has {episodes[0]['action'].shape[1]}")
        except UserError as exc:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {exc}", stacklevel=2)
            continue
        episodes.append(ep)
        paths.append(path)
    if not episodes:
        raise UserError(f"{folder}: no usable latent files")
    lengths = np.array([len(ep["mu"]) for ep in episodes], dtype=np.int64)

    def cat(key: str, dtype: type) -> np.ndarray:
        return np.concatenate([ep[key] for ep in episodes]).astype(dtype, copy=False)

    return Latents(cat("mu", np.float32), cat("logvar", np.float32), cat("action", np.float32),
                   cat("reward", np.float32), cat("terminated", bool), _starts(lengths), lengths, paths)


def split_episodes(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) episode indices; the same for the same (n, val_fraction, seed).

    At least one episode stays in training; validation is empty when ``n`` is 1
    or ``val_fraction`` is 0.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(int(round(val_fraction * n)), n - 1)
    if val_fraction > 0 and n > 1:
        n_val = max(n_val, 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def with_done_horizon(data: Latents, horizon: int) -> Latents:
    """A copy whose ``terminated`` also marks the ``horizon`` - 1 steps before each death
    (within its episode): the done head then learns "death within the next ``horizon``
    steps" (``model.done_horizon``).  ``horizon`` 1 returns ``data`` itself."""
    if horizon <= 1:
        return data
    terminated = data.terminated.copy()
    for death in np.flatnonzero(data.terminated):
        start = data.starts[np.searchsorted(data.starts, death, side="right") - 1]
        terminated[max(start, death - horizon + 1): death + 1] = True
    return replace(data, terminated=terminated)


def windows(data: Latents, seq_len: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Cut every episode into windows of at most ``seq_len`` steps: (W,) flat starts, (W,) lengths.

    Windows tile each episode, so every step (the final one, often a death,
    included) is in exactly one window.  With ``rng`` the tiling is shifted by
    a random offset per episode, so the window boundaries, where one z_{t+1}
    target is lost, move from epoch to epoch; without it, tiling starts at 0.
    """
    starts, lengths = [], []
    n = data.n_episodes
    offsets = rng.integers(0, seq_len, size=n) if rng is not None else np.zeros(n, dtype=np.int64)
    for start, length, offset in zip(data.starts, data.lengths, offsets, strict=True):
        cuts = np.arange(offset % seq_len or seq_len, length, seq_len)
        lo = np.concatenate([[0], cuts])
        hi = np.concatenate([cuts, [length]])
        starts.append(start + lo)
        lengths.append(hi - lo)
    return np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)


def lanes(data: Latents, seq_len: int, n_lanes: int,
          rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows for training with a carried state (``model.carry_state``): S batches of ``n_lanes``.

    Each lane plays whole episodes one after another, in windows of ``seq_len`` steps from
    the episode's start, so that batch s + 1 row i continues batch s row i (the same episode,
    the next window) unless ``first[s + 1, i]``: a new episode, from a zero state.  Episodes
    (shuffled by ``rng``) go to the lane with the fewest windows so far.  Returns (S, n_lanes)
    flat ``starts``, ``lengths`` (0 once a lane has run out) and ``first``.
    """
    order = rng.permutation(data.n_episodes) if rng is not None else np.arange(data.n_episodes)
    queues: list[list[tuple[int, int, bool]]] = [[] for _ in range(n_lanes)]
    load = np.zeros(n_lanes, dtype=np.int64)
    for e in order:
        lane = int(np.argmin(load))
        start, length = int(data.starts[e]), int(data.lengths[e])
        for lo in range(0, length, seq_len):
            queues[lane].append((start + lo, min(seq_len, length - lo), lo == 0))
        load[lane] = len(queues[lane])
    n_steps = int(load.max()) if n_lanes else 0
    starts = np.zeros((n_steps, n_lanes), dtype=np.int64)
    lengths = np.zeros((n_steps, n_lanes), dtype=np.int64)
    first = np.ones((n_steps, n_lanes), dtype=bool)
    for lane, queue in enumerate(queues):
        if queue:
            starts[: len(queue), lane], lengths[: len(queue), lane], first[: len(queue), lane] = zip(*queue)
    return starts, lengths, first


def make_batch(data: Latents, z: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Gather windows into a padded batch for :meth:`WorldModel.loss`.

    z: (N, Z) sampled latents of ``data``; starts, lengths: (B,).  Returns ``z`` (B, T, Z),
    ``action`` (B, T, A), ``reward`` (B, T), ``terminated`` (B, T), ``mask`` (B, T) and
    ``step`` (B, T) int64, each step's index within its episode (0 at the first frame),
    T = ``seq_len``; padded steps are zero / False (``step`` runs on).
    """
    steps = np.arange(seq_len)
    episode_start = data.starts[np.searchsorted(data.starts, starts, side="right") - 1]
    mask = steps[None, :] < lengths[:, None]
    rows = np.where(mask, starts[:, None] + steps[None, :], starts[:, None])

    def take(array: np.ndarray) -> torch.Tensor:
        out = array[rows]
        out[~mask] = 0
        return torch.from_numpy(out).to(device)

    return {
        "z": take(z),
        "action": take(data.action),
        "reward": take(data.reward),
        "terminated": take(data.terminated),
        "mask": torch.from_numpy(mask).to(device),
        "step": torch.from_numpy((starts - episode_start)[:, None] + steps[None, :]).to(device),
    }
