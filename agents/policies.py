"""Exploration policies for collecting rollouts in the real environments.

Each policy is reset with its own ``numpy`` generator at the start of an
episode, so an episode's seed fixes both the game and the actions.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from worldmodel.config import CollectConfig
from worldmodel.errors import UserError


class RandomPolicy:
    """A fresh uniform action every step."""

    def __init__(self, action_space: spaces.Box):
        self.low, self.high = action_space.low, action_space.high

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)


class HeldRandomPolicy(RandomPolicy):
    """A uniform random action held for 1-10 steps, as the original collected TakeCover."""

    def __init__(self, action_space: spaces.Box, hold_min: int, hold_max: int):
        super().__init__(action_space)
        self.hold_min, self.hold_max = hold_min, hold_max

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.left = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.left == 0:
            self.action = super().act(obs)
            self.left = int(self.rng.integers(self.hold_min, self.hold_max + 1))
        self.left -= 1
        return self.action


class BrownianPolicy(RandomPolicy):
    """Actions follow a clipped random walk: a_{t+1} = clip(a_t + sqrt(dt) * N(0, I)).

    Unlike per-step uniform noise, which leaves CarRacing's car crawling on the
    spot, a random walk holds gas and steering long enough to drive.
    """

    def __init__(self, action_space: spaces.Box, dt: float):
        super().__init__(action_space)
        self.scale = np.sqrt(dt)

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.action = super().act(None)

    def act(self, obs: np.ndarray) -> np.ndarray:
        step = self.scale * self.rng.standard_normal(self.action.shape)
        self.action = np.clip(self.action + step, self.low, self.high).astype(np.float32)
        return self.action


def make_policy(cfg: CollectConfig, action_space: spaces.Box) -> RandomPolicy:
    if cfg.policy == "random":
        return RandomPolicy(action_space)
    if cfg.policy == "held_random":
        return HeldRandomPolicy(action_space, cfg.hold_min, cfg.hold_max)
    if cfg.policy == "brownian":
        return BrownianPolicy(action_space, cfg.brownian_dt)
    raise UserError(f"config collect.policy: unknown policy {cfg.policy!r}")
