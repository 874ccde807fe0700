"""VizDoom TakeCover as a gymnasium.Env, as in the paper.

One continuous action in [-1, 1] split into thirds (left / stay / right),
reward +1 per step survived, episodes capped at 2100 steps, 64x64x3 uint8
frames.  Runs headless; the engine starts on the first ``reset``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

FRAME = 64
# take_cover.cfg declares the buttons in this order.
_LEFT, _STAY, _RIGHT = [1, 0], [0, 0], [0, 1]


def discretize(action: float) -> list[int]:
    """The paper's mapping of a continuous action to a button press."""
    if action < -1.0 / 3.0:
        return _LEFT
    if action > 1.0 / 3.0:
        return _RIGHT
    return _STAY


class TakeCoverEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 35}

    def __init__(self, render_mode: str = "rgb_array", frame_skip: int = 1, max_steps: int = 2100):
        if render_mode != "rgb_array":
            raise ValueError(f"render_mode {render_mode!r}: only 'rgb_array' is supported")
        self.render_mode = render_mode
        self.frame_skip = int(frame_skip)
        self.max_steps = int(max_steps)
        self.observation_space = spaces.Box(0, 255, (FRAME, FRAME, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self._game = None
        self._steps = 0
        self._frame = np.zeros((120, 160, 3), np.uint8)

    def _start(self) -> None:
        import vizdoom as vzd  # imported here: envs/ must import without ViZDoom's engine

        game = vzd.DoomGame()
        game.load_config(os.path.join(vzd.scenarios_path, "take_cover.cfg"))
        game.set_window_visible(False)
        game.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
        game.set_screen_format(vzd.ScreenFormat.RGB24)
        game.set_mode(vzd.Mode.PLAYER)
        game.set_sound_enabled(False)
        # ViZDoom writes its settings file into the working directory unless told otherwise.
        game.set_doom_config_path(os.path.join(tempfile.gettempdir(), "worldmodels_vizdoom.ini"))
        # The engine also makes ./_vizdoom/; two engines starting at once in a fresh directory race
        # to make it and the loser exits ("Failed to create ./_vizdoom/ directory: File exists").
        os.makedirs("_vizdoom", exist_ok=True)
        game.init()
        self._game = game

    def _observe(self) -> np.ndarray:
        state = self._game.get_state()
        if state is not None:
            self._frame = state.screen_buffer
        return np.asarray(Image.fromarray(self._frame).resize((FRAME, FRAME), Image.BILINEAR))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self._game is None:
            self._start()
        # ViZDoom keeps its own RNG; seed it from ours so a seed fixes the episode.
        self._game.set_seed(int(self.np_random.integers(0, 2**31 - 1)))
        self._game.new_episode()
        self._steps = 0
        return self._observe(), {}

    def step(self, action: Any):
        a = float(np.asarray(action, dtype=np.float32).reshape(-1)[0])
        reward = float(self._game.make_action(discretize(a), self.frame_skip))
        self._steps += 1
        terminated = bool(self._game.is_episode_finished())
        truncated = not terminated and self._steps >= self.max_steps
        obs = self._observe()
        return obs, reward, terminated, truncated, {}

    def game_variable(self, name: str) -> float:
        """A ViZDoom game variable by name, e.g. "HEALTH" or "POSITION_Y" (the lateral position).

        For diagnostics (scripts/takecover_traces.py): the agent never sees these.
        """
        import vizdoom as vzd

        if self._game is None:
            raise RuntimeError("TakeCoverEnv.game_variable() called before reset()")
        try:
            variable = getattr(vzd.GameVariable, name)
        except AttributeError:
            raise ValueError(f"game variable {name!r}: ViZDoom has no such variable") from None
        return float(self._game.get_game_variable(variable))

    def render(self) -> np.ndarray:
        """The full 160x120 frame (for videos)."""
        return self._frame.copy()

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None
