"""Config: presets load, bad keys and values are refused by name, overrides, dump -> load."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import ROOT

import envs
from worldmodel import config as config_lib
from worldmodel.config import Config
from worldmodel.errors import UserError

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_presets():
    names = {p.stem for p in PRESETS}
    assert {"smoke", "takecover", "carracing"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads(path):
    raw = yaml.safe_load(path.read_text())
    cfg = config_lib.load(path)
    assert cfg.name == raw.get("name", path.stem)
    assert cfg.env.name in envs.REAL_ENVS
    # Every value the file sets is the value the config holds.
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, f"{path.name}: {section}.{key}"


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, named", [
    ({"vae": {"zdim": 3}}, ["vae.zdim"]),
    ({"optimiser": {"lr": 0.1}}, ["optimiser"]),
    ({"vae": {"z_dim": "big"}}, ["vae.z_dim", "'big'"]),
    ({"vae": {"z_dim": 2.5}}, ["vae.z_dim", "2.5"]),
    ({"model": {"predict_reward": "yes"}}, ["model.predict_reward", "'yes'"]),
    ({"vae": {"z_dim": -3}}, ["vae.z_dim", "-3"]),
    ({"vae": {"val_fraction": 0.9}}, ["vae.val_fraction", "0.9"]),
    ({"env": {"name": "pong"}}, ["env.name", "pong"]),
    ({"collect": {"policy": "greedy"}}, ["collect.policy", "greedy"]),
    ({"vae": 3}, ["vae", "3"]),
    ({"collect": {"hold_min": 5, "hold_max": 2}}, ["collect.hold_min", "5"]),
    ({"env": {"name": "carracing"}, "eval": {"pacer_steps": 110}}, ["eval.pacer_steps", "110", "carracing"]),
    ({"model": {"m": "belief", "mixture": "joint"}}, ["model.mixture", "joint", "belief"]),
    ({"model": {"m": "tdvae", "carry_state": True}}, ["model.carry_state", "tdvae"]),
    ({"model": {"m": "belief", "time_input": True}}, ["model.time_input", "belief"]),
], ids=["unknown-key", "unknown-section", "wrong-type", "float-for-int", "str-for-bool", "below-min",
        "above-max", "bad-env", "bad-choice", "section-not-mapping", "cross-field", "pacer-outside-takecover",
        "joint-mixture-outside-mdnrnn", "carry-state-outside-mdnrnn", "time-input-outside-mdnrnn"])
def test_bad_file_is_refused_by_name(tmp_path, data, named):
    with pytest.raises(UserError) as info:
        config_lib.load(_write(tmp_path, data))
    for text in named:
        assert text in str(info.value)


@pytest.mark.parametrize("override, named", [
    ("vae.zdim=3", ["vae.zdim"]),
    ("optimiser.lr=0.1", ["optimiser.lr"]),
    ("vae.z_dim=-3", ["vae.z_dim", "-3"]),
    ("vae.z_dim=big", ["vae.z_dim", "'big'"]),
    ("vae.lr=nan", ["vae.lr", "nan"]),
    ("env.name=pong", ["env.name", "pong"]),
    ("vae.z_dim", ["vae.z_dim"]),
])
def test_bad_override_is_refused_by_name(override, named):
    with pytest.raises(UserError) as info:
        config_lib.apply_overrides(Config(), [override])
    for text in named:
        assert text in str(info.value)


def test_overrides_read_yaml_values():
    cfg = config_lib.apply_overrides(Config(), [
        "collect.workers=null", "vae.lr=1e-3", "model.lr=2.5E-4", "model.predict_reward=false",
        "vae.max_frames=1000", "name=my run", "cmaes.temperature=1",
    ])
    assert cfg.collect.workers is None
    assert cfg.vae.lr == 1e-3 and isinstance(cfg.vae.lr, float)
    assert cfg.model.lr == 2.5e-4
    assert cfg.model.predict_reward is False
    assert cfg.vae.max_frames == 1000
    assert cfg.name == "my run"
    assert cfg.cmaes.temperature == 1.0 and isinstance(cfg.cmaes.temperature, float)
    # The input is untouched and the last of two overrides wins.
    assert Config().collect.workers is None and Config().vae.max_frames is None
    assert config_lib.apply_overrides(Config(), ["vae.z_dim=3", "vae.z_dim=5"]).vae.z_dim == 5


def test_exponent_in_a_file_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vae:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert config_lib.load(path).vae.lr == 1e-4


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_dump_load_round_trip(tmp_path, path):
    cfg = config_lib.apply_overrides(config_lib.load(path), ["collect.workers=3", "vae.lr=3e-5"])
    out = tmp_path / "config.yaml"
    out.write_text(config_lib.dump(cfg))
    back = config_lib.from_dict(config_lib.load_yaml(out))
    assert back == cfg
    assert config_lib.diff(back, cfg) == {}


def test_every_field_has_a_typed_default():
    cfg = Config()
    flat = config_lib.to_flat(cfg)
    assert config_lib.from_flat(flat) == cfg
    for section in config_lib.SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f.default is not dataclasses.MISSING, f"{section}.{f.name}"
