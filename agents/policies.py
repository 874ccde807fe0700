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
    """A uniform random action held for 1-10 steps, as the original collected TakeCover.

    With ``lean`` > 0 each episode also draws a bias b ~ U(-lean, lean) that is added to
    every action (then clipped): a leaning episode drifts to one side and stays near the
    wall, states that unbiased random play rarely visits and a dream must know about.
    """

    def __init__(self, action_space: spaces.Box, hold_min: int, hold_max: int, lean: float = 0.0):
        super().__init__(action_space)
        self.hold_min, self.hold_max, self.lean = hold_min, hold_max, lean

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.left = 0
        self.bias = rng.uniform(-self.lean, self.lean) if self.lean > 0 else 0.0

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.left == 0:
            self.action = np.clip(super().act(obs) + self.bias, self.low, self.high).astype(np.float32)
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


class RoadFollowingPolicy(RandomPolicy):
    """CarRacing: steer toward the road ahead, with noisy steering, gas and brake.

    Steering aims at the mean column of grey road pixels a little ahead of the car,
    plus an Ornstein-Uhlenbeck noise whose scale is drawn per episode (from careful
    driving to swerving onto the grass and back). Gas follows its own OU process around
    a level drawn per episode from ``gas_levels`` (slow and tidy to fast, skidding off in
    corners and steering back), and the brake fires in random pulses.

    Now and then (a per-step chance drawn per episode from [0, ``wander_max``]) the driver
    lets go for 20-100 steps: all three actions follow a random walk over the whole action
    box (full brake to a standstill, full gas, hard steering onto the grass), then road
    following takes over again and steers back.  Gas, brake and wandering are blind to the
    frame, so none gives away the reward to M, and M sees every corner of the action box
    earn (or not earn) its reward: a dream-trained controller's actions saturate.
    """

    LOOK_AHEAD = slice(34, 46)  # rows of the 64x64 frame ahead of the car (at row ~52)
    CAR_COLUMN = 32.0
    WANDER_STEP = 0.2  # std of the random walk's step per frame

    def __init__(self, action_space: spaces.Box, noise_max: float = 0.6,
                 gas_levels: tuple[float, float] = (0.1, 0.8), wander_max: float = 0.01):
        super().__init__(action_space)
        self.noise_max, self.gas_levels, self.wander_max = noise_max, gas_levels, wander_max

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.noise_scale = rng.uniform(0.05, self.noise_max)
        self.level = rng.uniform(*self.gas_levels)
        self.wander_rate = rng.uniform(0.0, self.wander_max)
        self.steer_noise, self.gas, self.brake_left, self.wander_left = 0.0, self.level, 0, 0

    def _follow(self, obs: np.ndarray) -> np.ndarray:
        o = obs[self.LOOK_AHEAD].astype(np.int16)
        grey = (abs(o[..., 0] - o[..., 1]) < 12) & (abs(o[..., 1] - o[..., 2]) < 12)
        road = grey & (o[..., 0] > 80) & (o[..., 0] < 140)
        columns = np.nonzero(road)[1]
        target = columns.mean() if columns.size else self.CAR_COLUMN
        self.steer_noise += -0.15 * self.steer_noise + 0.3 * self.noise_scale * self.rng.standard_normal()
        steer = np.clip((target - self.CAR_COLUMN) / 8.0 + self.steer_noise, -1.0, 1.0)
        self.gas = float(np.clip(self.gas + 0.1 * (self.level - self.gas) + 0.08 * self.rng.standard_normal(), 0, 1))
        if self.brake_left == 0 and self.rng.random() < 0.01:
            self.brake_left = int(self.rng.integers(3, 15))
        brake = 0.6 if self.brake_left else 0.0
        self.brake_left = max(0, self.brake_left - 1)
        return np.array([steer, self.gas, brake], np.float32)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self._follow(obs)  # runs every step, so the OU states stay in step
        if self.wander_left == 0 and self.rng.random() < self.wander_rate:
            self.wander_left, self.wander = int(self.rng.integers(20, 101)), action
        if self.wander_left == 0:
            return action
        self.wander_left -= 1
        step = self.WANDER_STEP * self.rng.standard_normal(action.shape)
        self.wander = np.clip(self.wander + step, self.low, self.high).astype(np.float32)
        return self.wander


class PacingPolicy:
    """TakeCover's blind baseline: full speed left for ``steps`` steps, then right, and so on.

    It never looks at the screen.  At 110 steps a leg crosses the room from wall to wall, and
    moving all the time dodges most fireballs by chance: on the 100 evaluation seeds this
    policy scores about 700, close to the "solved" 750 (docs/results.md), so an agent has to
    beat it, not just the random policy, to show that it sees the fireballs.
    """

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"steps {steps}: must be at least 1")
        self.steps = int(steps)

    def reset(self, rng: np.random.Generator | None = None) -> None:
        self.t = 0

    def action_at(self, t: int) -> float:
        """The action at step ``t`` of an episode: -1 (left) or +1 (right)."""
        return -1.0 if (t // self.steps) % 2 == 0 else 1.0

    def act(self, obs: np.ndarray | None) -> np.ndarray:
        action = self.action_at(self.t)
        self.t += 1
        return np.array([action], np.float32)


def make_policy(cfg: CollectConfig, action_space: spaces.Box) -> RandomPolicy:
    if cfg.policy == "random":
        return RandomPolicy(action_space)
    if cfg.policy == "held_random":
        return HeldRandomPolicy(action_space, cfg.hold_min, cfg.hold_max, cfg.lean)
    if cfg.policy == "brownian":
        return BrownianPolicy(action_space, cfg.brownian_dt)
    if cfg.policy == "road":
        if action_space.shape != (3,):
            raise UserError("config collect.policy: 'road' is for CarRacing (steer, gas, brake)")
        return RoadFollowingPolicy(action_space)
    raise UserError(f"config collect.policy: unknown policy {cfg.policy!r}")
