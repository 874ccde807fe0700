"""The real environments: gymnasium's checker, frames, seeding, TakeCover's actions and step cap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.carracing import PLAYFIELD_ROWS, crop_resize
from envs.takecover import _LEFT, _RIGHT, _STAY, discretize
from worldmodel.errors import UserError

NAMES = ("takecover", "carracing")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=NAMES)
def env(request):
    e = envs.make(request.param, max_steps=100)
    yield e
    e.close()


def _play(env, seed: int, steps: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Frames (steps + 1, 64, 64, 3) and rewards of a fixed action sequence from ``seed``."""
    obs, _ = env.reset(seed=seed)
    frames, rewards = [obs], []
    for t in range(steps):
        action = np.full(env.action_space.shape, 0.8 if (t // 4) % 2 else -0.8, np.float32)
        if env.action_space.shape == (3,):
            action[1:] = (0.5, 0.0)  # CarRacing: some gas, no brake
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(obs)
        rewards.append(reward)
        assert not truncated
        if terminated:
            break
    return np.stack(frames), np.asarray(rewards)


@pytest.mark.filterwarnings("ignore::UserWarning")  # "no spec": our envs are made without gymnasium.make
def test_gymnasium_env_checker(env):
    check_env(env)


def test_observations_are_64x64_rgb_uint8(env):
    obs, _ = env.reset(seed=0)
    assert env.observation_space.shape == (64, 64, 3)
    assert env.observation_space.dtype == np.uint8
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    obs, *_ = env.step(env.action_space.sample())
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert obs.std() > 0  # a picture, not a blank


def test_same_seed_same_episode(env):
    frames_a, rewards_a = _play(env, seed=7)
    frames_b, rewards_b = _play(env, seed=7)
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(rewards_a, rewards_b)
    assert len({f.tobytes() for f in frames_a}) > 5  # the frames move


def test_other_seed_other_episode(env):
    # TakeCover's first fireballs come after ~30 steps.
    frames_a, _ = _play(env, seed=7, steps=45)
    frames_b, _ = _play(env, seed=8, steps=45)
    assert not np.array_equal(frames_a, frames_b)


@pytest.mark.parametrize("action, button", [
    (-1.0, _LEFT), (-0.34, _LEFT), (-1 / 3, _STAY), (0.0, _STAY), (1 / 3, _STAY), (0.34, _RIGHT), (1.0, _RIGHT),
])
def test_takecover_action_thirds(action, button):
    assert discretize(action) == button


def test_takecover_buttons_are_left_then_right():
    """The button lists in discretize assume take_cover.cfg's button order."""
    env = envs.make("takecover")
    try:
        env.reset(seed=0)
        names = [b.name for b in env._game.get_available_buttons()]
    finally:
        env.close()
    assert names == ["MOVE_LEFT", "MOVE_RIGHT"]
    assert _LEFT == [1, 0] and _RIGHT == [0, 1] and _STAY == [0, 0]


def test_takecover_truncates_at_max_steps():
    env = envs.make("takecover", max_steps=7)
    try:
        env.reset(seed=0)
        steps = [env.step(np.zeros(1, np.float32))[1:4] for _ in range(7)]
    finally:
        env.close()
    assert [s[1:] for s in steps[:-1]] == [(False, False)] * 6
    assert steps[-1][1:] == (False, True)  # truncated by the cap, not terminated by the game
    assert [s[0] for s in steps] == [1.0] * 7  # +1 per step survived


def test_takecover_engines_start_together_in_a_fresh_directory(tmp_path):
    # Each engine makes ./_vizdoom/ at start; on a fresh machine collect's workers used to race to
    # make it, and the loser exited ("worker process died").
    code = "import envs; e = envs.make('takecover'); e.reset(seed=0); e.step(e.action_space.sample()); e.close()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert (tmp_path / "_vizdoom").is_dir()


def test_takecover_game_variables_track_position_and_health():
    env = envs.make("takecover")
    try:
        with pytest.raises(RuntimeError, match="before reset"):
            env.game_variable("HEALTH")
        env.reset(seed=0)
        start = env.game_variable("POSITION_Y")
        assert env.game_variable("HEALTH") == 100.0
        for _ in range(40):  # the player stands still for the first steps, then speeds up
            env.step(np.array([-1.0], np.float32))  # facing the imps, left is +y
        left = env.game_variable("POSITION_Y")
        for _ in range(40):
            env.step(np.array([1.0], np.float32))
        assert left > start + 20 and env.game_variable("POSITION_Y") < left - 40
        with pytest.raises(ValueError, match="'NO_SUCH'"):
            env.game_variable("NO_SUCH")
    finally:
        env.close()


def test_takecover_render_is_the_full_frame():
    env = envs.make("takecover")
    try:
        obs, _ = env.reset(seed=0)
        frame = env.render()
    finally:
        env.close()
    assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
    assert frame.std() > 0


def test_carracing_render_is_the_full_frame():
    env = envs.make("carracing")
    try:
        env.reset(seed=0)
        frame = env.render()
    finally:
        env.close()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    assert frame.shape[0] > 96 and frame.shape[1] > 96  # not the 96x96 state, let alone 64x64
    assert frame.std() > 0


def test_carracing_frames_drop_the_indicator_bar():
    frame = np.zeros((96, 96, 3), np.uint8)
    frame[PLAYFIELD_ROWS:] = 255  # the bar
    assert crop_resize(frame).max() == 0
    frame[:PLAYFIELD_ROWS] = 100
    out = crop_resize(frame)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out == 100).all()


def test_unknown_env_is_a_user_error():
    with pytest.raises(UserError, match="pong"):
        envs.make("pong")
