"""The linear controller: known weights give known actions; batched = one by one; save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.controller import (
    Controller,
    ControllerSpec,
    act_batched,
    action_space,
    load_controller,
    save_controller,
)
from worldmodel.errors import UserError


def test_layout_and_known_actions_takecover():
    spec = ControllerSpec.for_env("takecover", feature_dim=3)
    assert spec.num_params == 4  # W (1, 3) then b (1,)
    c = Controller.from_flat(spec, [1.0, 2.0, 3.0, 0.5])
    f = np.array([0.1, 0.2, -0.3], np.float32)
    expected = np.tanh(0.1 * 1 + 0.2 * 2 - 0.3 * 3 + 0.5)
    np.testing.assert_allclose(c.act(f).numpy(), [expected], rtol=1e-6)
    assert action_space("takecover").contains(c.act(f).numpy())


@pytest.mark.parametrize("brake", ["clip", "shift"])
def test_known_actions_carracing(brake):
    spec = ControllerSpec.for_env("carracing", feature_dim=2, brake=brake)
    w = np.array([[1.0, -1.0], [0.5, 0.0], [0.0, -2.0]])
    b = np.array([0.1, -0.2, 0.3])
    c = Controller.from_flat(spec, np.concatenate([w.reshape(-1), b]))
    f = np.array([[0.3, 0.7], [-1.0, 2.0], [0.0, -1.0]], np.float32)
    y = f @ w.T + b  # brake outputs y2 = -1.1, -3.7, 2.3: off, off, on
    brake_of = {"clip": np.clip(np.tanh(y[:, 2]), 0, 1), "shift": (np.tanh(y[:, 2]) + 1) / 2}[brake]
    expected = np.stack([np.tanh(y[:, 0]), (np.tanh(y[:, 1]) + 1) / 2, brake_of], 1)
    got = c.act(f).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert all(action_space("carracing").contains(a) for a in got)
    if brake == "clip":  # the paper's: no brake at all for y2 <= 0
        assert got[0, 2] == 0.0 and got[1, 2] == 0.0 and got[2, 2] > 0.9


def test_a_controller_evolved_with_another_brake_is_refused(tmp_path):
    clip = ControllerSpec.for_env("carracing", feature_dim=2)
    shift = ControllerSpec.for_env("carracing", feature_dim=2, brake="shift")
    flat = np.zeros(clip.num_params, np.float32)
    save_controller(tmp_path / "new.pt", flat, clip.to_dict())
    save_controller(tmp_path / "old.pt", flat, {"env": "carracing", "feature_dim": 2, "action_dim": 3})
    assert load_controller(tmp_path / "new.pt", spec=clip)[1]["brake"] == "clip"
    load_controller(tmp_path / "old.pt", spec=shift)  # a file from before the key: shift
    with pytest.raises(UserError, match="evolved with controller.brake 'clip'.*says 'shift'"):
        load_controller(tmp_path / "new.pt", spec=shift)
    with pytest.raises(UserError, match="evolved with controller.brake 'shift'"):
        load_controller(tmp_path / "old.pt", spec=clip)


def test_an_unknown_brake_squash_is_named():
    with pytest.raises(UserError, match="controller.brake: 'soft'"):
        ControllerSpec.for_env("carracing", feature_dim=2, brake="soft")


@pytest.mark.parametrize("env", ["takecover", "carracing"])
def test_batched_equals_per_candidate(env):
    spec = ControllerSpec.for_env(env, feature_dim=5)
    g = torch.Generator().manual_seed(0)
    params = torch.randn(7, spec.num_params, generator=g)
    feats = torch.randn(7, 5, generator=g)
    batched = act_batched(spec, params, feats)
    assert batched.shape == (7, spec.action_dim)
    for i in range(7):
        one = Controller.from_flat(spec, params[i].numpy()).act(feats[i])
        torch.testing.assert_close(batched[i], one, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_and_size_check(tmp_path):
    spec = ControllerSpec.for_env("takecover", feature_dim=3)
    flat = np.arange(4, dtype=np.float32)
    path = tmp_path / "controller.pt"
    save_controller(path, flat, {"env": "takecover", "generation": 3})
    params, meta = load_controller(path, expected_params=spec.num_params)
    np.testing.assert_array_equal(params, flat)
    assert meta["generation"] == 3
    with pytest.raises(UserError) as err:
        load_controller(path, expected_params=9)
    assert str(path) in str(err.value) and "4" in str(err.value) and "9" in str(err.value)
    with pytest.raises(UserError):
        Controller(spec, np.zeros(5))


def test_load_rejects_non_controller(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="not a controller"):
        load_controller(path)
