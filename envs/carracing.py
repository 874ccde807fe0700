"""CarRacing-v3 with 64x64 frames of the playfield.

The bottom indicator bar (speed, ABS, steering, gyro) is cropped away as in the
paper; the crop is resized to 64x64.  ``render()`` returns the full frame.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

FRAME = 64
PLAYFIELD_ROWS = 84  # of CarRacing's 96: the rest is the indicator bar


def crop_resize(frame: np.ndarray) -> np.ndarray:
    """(96, 96, 3) uint8 -> (64, 64, 3) uint8 of the playfield."""
    return np.asarray(Image.fromarray(frame[:PLAYFIELD_ROWS]).resize((FRAME, FRAME), Image.BILINEAR))


class CarRacingEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, render_mode: str = "rgb_array", frame_skip: int = 1, max_steps: int = 1000):
        if render_mode != "rgb_array":
            raise ValueError(f"render_mode {render_mode!r}: only 'rgb_array' is supported")
        self.render_mode = render_mode
        self.env = gym.make("CarRacing-v3", render_mode=render_mode, continuous=True,
                            max_episode_steps=max_steps)
        self.frame_skip = int(frame_skip)
        self.action_space = self.env.action_space
        self.observation_space = spaces.Box(0, 255, (FRAME, FRAME, 3), np.uint8)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self.env.reset(seed=seed, options=options)
        return crop_resize(obs), info

    def step(self, action):
        total = 0.0
        for _ in range(self.frame_skip):
            obs, reward, terminated, truncated, info = self.env.step(np.asarray(action, np.float32))
            total += float(reward)
            if terminated or truncated:
                break
        return crop_resize(obs), total, terminated, truncated, info

    def render(self) -> np.ndarray:
        """The full-size frame (for videos)."""
        return self.env.render()

    def close(self) -> None:
        self.env.close()
