"""The agents shipped in pretrained/: they load (weights only, shapes checked), act in the real
game and in their dream, and were made by the preset the README names."""
import math
from pathlib import Path

import pytest

from agents.evaluate import dream_score, play_many
from worldmodel import config as config_lib
from worldmodel.runs import open_run

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(params=["takecover", "carracing"])
def shipped(request):
    folder = ROOT / "pretrained" / request.param
    before = sorted(p.name for p in folder.rglob("*"))
    # --set in memory only (create=False): a short episode, and nothing written to the folder.
    run = open_run(folder, None, [f"env.max_steps={STEPS}"], create=False)
    yield request.param, run
    assert sorted(p.name for p in folder.rglob("*")) == before


#: The preset's command with ``--set collect.seed=S --set vae.seed=S ...`` makes the same agent on other luck.
SEEDS = {"collect.seed", "vae.seed", "model.seed", "cmaes.seed"}


def test_shipped_agent_is_the_presets(shipped):
    name, run = shipped
    preset = config_lib.load(ROOT / "configs" / f"{name}-cpu.yaml")
    diff = config_lib.diff(run.cfg, preset)
    assert diff.pop("env.max_steps") == (STEPS, preset.env.max_steps)
    assert set(diff) <= SEEDS, f"the shipped {name} agent was made with other settings than the preset: {diff}"
    assert len({now for now, _ in diff.values()}) <= 1  # one seed for every stage, as the docs' commands set it


def test_shipped_agent_plays_the_real_game_and_its_dream(shipped):
    name, run = shipped
    [episode] = play_many(run, "agent", [10_000], workers=1)
    assert episode["seed"] == 10_000 and 0 < episode["steps"] <= STEPS
    if name == "takecover":  # one point per tic survived; the first fireballs land later
        assert episode["steps"] == STEPS and episode["return"] == STEPS * run.cfg.env.frame_skip
    else:  # tiles driven over outweigh the 0.1 a frame that standing still costs
        assert episode["return"] > 0
    dream = dream_score(run, episodes=2, seed=0, max_steps=STEPS)
    assert dream["episodes"] == 2 and dream["temperature"] == run.cfg.cmaes.temperature
    assert math.isfinite(dream["mean"]) and math.isfinite(dream["std"])
    if name == "takecover":
        assert 0 < dream["min"] <= dream["max"] <= STEPS
