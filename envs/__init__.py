"""Environments: the two real games and the dream.

``envs.make(name, **kwargs)`` returns a ``gymnasium.Env`` with
``render_mode="rgb_array"`` and 64x64x3 uint8 observations.
"""

from __future__ import annotations

import gymnasium as gym

from worldmodel.errors import UserError

REAL_ENVS = ("takecover", "carracing")
ACTION_DIMS = {"takecover": 1, "carracing": 3}
MAX_STEPS = {"takecover": 2100, "carracing": 1000}


def make(name: str, **kwargs) -> gym.Env:
    """Make an environment by name: "takecover", "carracing" or "dream" (needs ``run=``)."""
    if name == "takecover":
        from envs.takecover import TakeCoverEnv

        return TakeCoverEnv(**kwargs)
    if name == "carracing":
        from envs.carracing import CarRacingEnv

        return CarRacingEnv(**kwargs)
    if name == "dream":
        from envs.dream import make_dream_env

        return make_dream_env(**kwargs)
    raise UserError(f"unknown environment {name!r} (known: {', '.join(REAL_ENVS + ('dream',))})")


def make_from_config(env_cfg) -> gym.Env:
    """The real env a config's ``env`` section names."""
    return make(env_cfg.name, frame_skip=env_cfg.frame_skip, max_steps=env_cfg.max_steps)


def action_dim(name: str) -> int:
    if name not in ACTION_DIMS:
        raise UserError(f"unknown environment {name!r} (known: {', '.join(REAL_ENVS)})")
    return ACTION_DIMS[name]
