"""C: the linear controller ``a_t = squash(W f_t + b)`` on the features M exposes.

``f_t = m.features(state_t, z_t, cfg.controller.features)`` (``[z, h]`` or ``[z, c, h]``).

Parameter layout, one flat float vector of length ``P = A * F + A`` (what CMA-ES searches)::

    flat[: A * F]  W, row-major (A, F): W[a, f] = flat[a * F + f]
    flat[A * F :]  b (A,)

Squashing of the A outputs ``y = W f + b``:

- TakeCover (A = 1): ``tanh(y)`` in [-1, 1]; the environment splits that range into thirds
  (left / stay / right).
- CarRacing (A = 3): steer ``tanh(y0)`` in [-1, 1]; gas ``(tanh(y1) + 1) / 2`` in [0, 1]; brake
  (``controller.brake``) ``clip(tanh(y2), 0, 1)`` as in the paper's code (``clip``: off for every
  y2 <= 0, so a controller near zero drives and braking is one sign change away) or
  ``(tanh(y2) + 1) / 2`` like the gas (``shift``: half the brake at y2 = 0, so CMA-ES first learns
  to saturate it at 0, where it stays).

:func:`act_batched` evaluates N controllers, each with its own parameters, in one batched op:
the dream runs a whole CMA-ES generation as one batch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from worldmodel.config import BRAKE_SQUASHES, LEGACY_BRAKE
from worldmodel.errors import UserError
from worldmodel.io import load_checkpoint, save_checkpoint

#: real environment -> number of actions the controller emits.
ACTION_DIMS: dict[str, int] = {"takecover": 1, "carracing": 3}


def action_space(env_name: str) -> gym.spaces.Box:
    """The real environment's action space (the dream uses the same one)."""
    if env_name == "takecover":
        return gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    if env_name == "carracing":
        return gym.spaces.Box(np.array([-1.0, 0.0, 0.0], dtype=np.float32),
                              np.array([1.0, 1.0, 1.0], dtype=np.float32), dtype=np.float32)
    raise UserError(f"controller: unknown environment {env_name!r} (known: {', '.join(ACTION_DIMS)})")


@dataclass(frozen=True)
class ControllerSpec:
    """Sizes of a controller: what it sees (F) and what it emits (A) for one environment."""

    env: str
    feature_dim: int
    action_dim: int
    brake: str = "clip"

    @classmethod
    def for_env(cls, env_name: str, feature_dim: int, brake: str = "clip") -> ControllerSpec:
        if env_name not in ACTION_DIMS:
            raise UserError(f"controller: unknown environment {env_name!r} (known: {', '.join(ACTION_DIMS)})")
        if brake not in BRAKE_SQUASHES:
            raise UserError(f"controller.brake: {brake!r} is not one of {', '.join(BRAKE_SQUASHES)}")
        return cls(env=env_name, feature_dim=int(feature_dim), action_dim=ACTION_DIMS[env_name], brake=brake)

    @classmethod
    def for_config(cls, cfg, m) -> ControllerSpec:
        """The controller of a run: its env's actions on the features M gives for ``controller.features``."""
        return cls.for_env(cfg.env.name, m.feature_dim(cfg.controller.features), cfg.controller.brake)

    @property
    def num_params(self) -> int:
        """P = A * F + A."""
        return self.action_dim * self.feature_dim + self.action_dim

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """params (N, P) -> W (N, A, F), b (N, A) (views, no copy)."""
        n_w = self.action_dim * self.feature_dim
        w = params[:, :n_w].view(-1, self.action_dim, self.feature_dim)
        return w, params[:, n_w:]

    def to_dict(self) -> dict[str, Any]:
        out = {"env": self.env, "feature_dim": self.feature_dim, "action_dim": self.action_dim}
        return {**out, "brake": self.brake} if self.env == "carracing" else out


def squash(spec: ControllerSpec, y: torch.Tensor) -> torch.Tensor:
    """Map pre-activations y (N, A) into the action box (N, A)."""
    a = torch.tanh(y)
    if spec.env == "carracing":
        brake = a[:, 2:].clamp(min=0.0) if spec.brake == "clip" else (a[:, 2:] + 1.0) * 0.5
        a = torch.cat([a[:, :1], (a[:, 1:2] + 1.0) * 0.5, brake], dim=1)
    return a


@functools.cache
def _action_bounds(env_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    box = action_space(env_name)
    return torch.from_numpy(box.low), torch.from_numpy(box.high)


def add_action_noise(spec: ControllerSpec, actions: torch.Tensor, std: float, eps: torch.Tensor) -> torch.Tensor:
    """actions + std · eps, clipped to the action box (``controller.action_noise``).  (N, A) -> (N, A).

    On the dream's hot path: the box's bounds are built once per environment, not per step.
    """
    low, high = (b.to(actions.device, actions.dtype) for b in _action_bounds(spec.env))
    return torch.clamp(actions + std * eps, low, high)


def act_batched(spec: ControllerSpec, params: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """N controllers on N feature rows: params (N, P), features (N, F) -> actions (N, A).

    y[n, a] = sum_f W[n, a, f] features[n, f] + b[n, a], as one batched row-wise dot product
    (``vecdot`` reads the strided views directly; ``bmm`` would copy them first).
    """
    w, b = spec.split(params)
    y = torch.linalg.vecdot(w, features.unsqueeze(1)) + b
    return squash(spec, y)


class Controller:
    """One controller with fixed weights: W (A, F), b (A,)."""

    def __init__(self, spec: ControllerSpec, flat: torch.Tensor | np.ndarray | None = None):
        self.spec = spec
        self.flat = torch.zeros(spec.num_params)
        if flat is not None:
            self.set_flat(flat)

    @classmethod
    def from_flat(cls, spec: ControllerSpec, flat: torch.Tensor | np.ndarray) -> Controller:
        return cls(spec, flat)

    @property
    def num_params(self) -> int:
        return self.spec.num_params

    def set_flat(self, flat: torch.Tensor | np.ndarray) -> None:
        """Take the weights from a flat vector (P,) laid out as in the module docstring."""
        flat = torch.as_tensor(np.asarray(flat, dtype=np.float32)).reshape(-1)
        if flat.numel() != self.spec.num_params:
            raise UserError(f"controller: expected {self.spec.num_params} parameters, got {flat.numel()}")
        self.flat = flat.clone()

    def get_flat(self) -> np.ndarray:
        return self.flat.numpy().copy()

    @property
    def weight(self) -> torch.Tensor:
        """W (A, F)."""
        return self.spec.split(self.flat.unsqueeze(0))[0][0]

    @property
    def bias(self) -> torch.Tensor:
        """b (A,)."""
        return self.spec.split(self.flat.unsqueeze(0))[1][0]

    def act(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """features (B, F) or (F,) -> actions (B, A) or (A,)."""
        f = torch.as_tensor(features, dtype=torch.float32)
        single = f.dim() == 1
        f = f.reshape(-1, self.spec.feature_dim).to(self.flat.device)
        a = squash(self.spec, f @ self.weight.T + self.bias)
        return a[0] if single else a


def save_controller(path: str | os.PathLike, flat: np.ndarray | torch.Tensor, meta: dict[str, Any]) -> None:
    """Write a controller: ``{"params": float32 (P,), "meta": {...}}`` (meta: plain JSON-like values)."""
    params = torch.as_tensor(np.asarray(flat, dtype=np.float32)).reshape(-1).clone()
    save_checkpoint(path, {"params": params, "meta": dict(meta)})


def load_controller(path: str | os.PathLike, expected_params: int | None = None,
                    spec: ControllerSpec | None = None) -> tuple[np.ndarray, dict]:
    """Read a controller written by :func:`save_controller` -> (params float32 (P,), meta).

    Loads with ``weights_only=True``; a file whose parameter count differs from
    ``expected_params`` (or ``spec.num_params``) is a :class:`UserError` naming the file and both
    sizes, and so is a CarRacing controller evolved with another ``controller.brake`` than
    ``spec``'s (its weights would drive another car).  Files from before the key was kept in the
    meta were evolved with ``shift``.
    """
    path = Path(path)
    data = load_checkpoint(path)
    if not isinstance(data, dict) or not isinstance(data.get("params"), torch.Tensor):
        raise UserError(f"{path}: not a controller file (no 'params' tensor)")
    params = data["params"].detach().to(torch.float32).reshape(-1).numpy().copy()
    if spec is not None:
        expected_params = spec.num_params
    if expected_params is not None and params.size != expected_params:
        raise UserError(
            f"{path}: controller has {params.size} parameters, this config expects {expected_params}"
        )
    meta = data.get("meta") or {}
    if spec is not None and spec.env == "carracing" and meta.get("env") == "carracing":
        evolved = meta.get("brake", LEGACY_BRAKE)
        if evolved != spec.brake:
            raise UserError(f"{path}: evolved with controller.brake {evolved!r}, this config says "
                            f"{spec.brake!r}; set controller.brake: {evolved} to play it")
    return params, dict(meta)


def save_committee(path: str | os.PathLike, params: np.ndarray, m_ids: list[str], meta: dict[str, Any]) -> None:
    """Write a committee (agents/agent.py): ``{"params": float32 (N, P), "m": [the fingerprint of the M
    each controller plays with, "" for the run's own], "meta": {...}}``, the leader first."""
    params = torch.as_tensor(np.asarray(params, dtype=np.float32)).clone()
    save_checkpoint(path, {"params": params, "m": [str(m) for m in m_ids], "meta": dict(meta)})


def load_committee(path: str | os.PathLike, spec: ControllerSpec) -> tuple[np.ndarray, list[str], dict]:
    """Read a committee written by :func:`save_committee` (``weights_only``) -> (params (N, P),
    M fingerprints, meta); a file of another shape is a :class:`UserError` naming it."""
    path = Path(path)
    data = load_checkpoint(path)
    params = data.get("params") if isinstance(data, dict) else None
    m_ids = data.get("m") if isinstance(data, dict) else None
    if not isinstance(params, torch.Tensor) or params.ndim != 2 or len(params) < 2:
        raise UserError(f"{path}: not a committee file (no 'params' tensor of two controllers or more)")
    if params.shape[1] != spec.num_params:
        raise UserError(f"{path}: controllers have {params.shape[1]} parameters, this config expects {spec.num_params}")
    if not (isinstance(m_ids, list) and len(m_ids) == len(params) and all(isinstance(m, str) for m in m_ids)):
        raise UserError(f"{path}: 'm' must name the M of each of its {len(params)} controllers")
    return params.to(torch.float32).numpy().copy(), m_ids, dict(data.get("meta") or {})

