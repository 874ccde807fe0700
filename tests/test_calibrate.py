"""cmaes.done_calibration: one endless pass of pacer dreams gives each threshold's dream lengths,
the threshold found reaches the target, and a search uses it, records it and resumes with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cmaes import STARTS, LifeM, make_run
from test_dream import starts_for, tiny_mdnrnn

from agents.calibrate import CALIBRATION_FILE, dream_threshold, fit_threshold, lifetimes, pacer_done_trace
from agents.cmaes import train_controller, weights_fingerprint
from agents.controller import ControllerSpec
from agents.policies import PacingPolicy
from envs.dream import DreamSettings, dream_rollouts, sample_start_z
from worldmodel import config as config_lib
from worldmodel.errors import UserError
from worldmodel.runs import Run


def test_lifetimes_end_where_p_done_first_passes_the_threshold():
    trace = np.array([[0.1, 0.5, 0.0],
                      [0.3, 0.2, 0.0],
                      [0.9, 0.6, 0.0]], np.float32)  # (T = 3 steps, 3 dreams)
    assert lifetimes(trace, 0.25).tolist() == [2, 1, 3]  # the third never passes: the step cap
    assert lifetimes(trace, 0.55).tolist() == [3, 3, 3]
    assert lifetimes(trace, 0.05).tolist() == [1, 1, 3]


def test_fit_threshold_is_the_smallest_that_reaches_the_target():
    rng = np.random.default_rng(0)
    trace = rng.uniform(0, 1, (50, 200)).astype(np.float32) ** 4
    for target in (3.0, 10.0, 30.0):
        th = fit_threshold(trace, target)
        assert lifetimes(trace, th).mean() >= target
        assert lifetimes(trace, th - 1e-4).mean() < target
    assert fit_threshold(trace, 51.0) == 1.0  # past the cap: only a sure death ends a dream


@pytest.mark.parametrize("threshold", [0.6, 0.64, 0.7])
def test_one_endless_pass_gives_the_lengths_the_dream_would_have(threshold):
    """The pacer's dreams ended at a threshold last exactly as long as the trace says."""
    m = tiny_mdnrnn(done_bias=0.2)
    with torch.no_grad():
        m.head.weight[-1].zero_()
        m.head.weight[-1, 0] = 2.0  # P(done) follows h[0], which the actions move
    settings = DreamSettings(temperature=1.2, max_steps=40, done_threshold=threshold)
    starts = starts_for(4)
    trace = pacer_done_trace(m, settings, starts, dreams=6, seed=11, pacer_steps=3)
    assert trace.shape == (40, 6)
    pacer = PacingPolicy(3)
    gen = torch.Generator().manual_seed(11)
    z0 = sample_start_z(starts, 6, gen)
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    res = dream_rollouts(m, torch.zeros(6, 0), spec, z0, settings, gen,
                         policy=lambda t, f: f.new_full((f.shape[0], 1), pacer.action_at(t)))
    assert res.lengths.tolist() == lifetimes(trace, threshold).tolist()
    assert len(set(res.lengths.tolist())) > 1  # the dreams differ, so the comparison means something


class RampM(LifeM):
    """P(done) = t / 20 whatever the action: a dream under threshold θ lasts floor(20 θ) + 1 steps."""

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        (t,), z_next, reward, _ = super().imagine_step(state, z, action, temperature, generator, noise)
        return (t,), z_next, reward, (t[:, 0] / 20).clamp(max=1.0)


def calibrated_run(path, ratio=1.0):
    run = make_run(path, generations=2)
    flat = config_lib.to_flat(run.cfg)
    flat.update({"env.name": "takecover", "cmaes.calibration_pacer_steps": 3, "cmaes.done_calibration": ratio,
                 "cmaes.calibration_episodes": 8})
    return Run(dir=path, cfg=config_lib.from_flat(flat))


def test_a_search_ends_its_dreams_where_the_pacer_lives_as_in_the_game(tmp_path):
    run = calibrated_run(tmp_path)
    pacer = {"mean_steps": 10.0}  # the game's pacer lives 10 steps: the dream must end at t = 10
    summary = train_controller(run, progress=False, m=RampM(), starts=STARTS, pacer=pacer)
    threshold = json.loads((tmp_path / CALIBRATION_FILE).read_text())["thresholds"][weights_fingerprint(RampM())]
    assert threshold["threshold"] == pytest.approx(0.45, abs=1e-6)  # floor(20 θ) + 1 >= 10
    assert threshold["pacer_dream_steps"] == 10.0
    history = [json.loads(line) for line in (tmp_path / "metrics" / "dream.jsonl").read_text().splitlines()]
    assert [h["done_threshold"] for h in history] == [threshold["threshold"]] * 2
    assert [h["dream_mean"] for h in history] == [10.0, 10.0]  # every dream, whatever C does
    assert summary["best_dream_score"] == 10.0
    assert dream_threshold(run, weights_fingerprint(RampM())) == threshold["threshold"]

    run.cfg.cmaes.generations = 3  # resumed with more generations: the cached threshold, kept
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(
        {"thresholds": {weights_fingerprint(RampM()): {**threshold, "threshold": 0.2}}}))
    train_controller(run, progress=False, m=RampM(), starts=STARTS, pacer=pacer)
    last = json.loads((tmp_path / "metrics" / "dream.jsonl").read_text().splitlines()[-1])
    assert last["done_threshold"] == 0.2 and last["dream_mean"] == 5.0


def test_twice_the_games_life_and_a_search_without_the_pacer(tmp_path):
    run = calibrated_run(tmp_path / "a", ratio=2.0)
    train_controller(run, progress=False, m=RampM(), starts=STARTS, pacer={"mean_steps": 7.0})
    last = json.loads((tmp_path / "a" / "metrics" / "dream.jsonl").read_text().splitlines()[-1])
    assert last["dream_mean"] == 14.0
    with pytest.raises(UserError, match="done_calibration"):
        train_controller(calibrated_run(tmp_path / "b"), progress=False, m=RampM(), starts=STARTS)


@pytest.mark.parametrize("flat, named", [
    ({"cmaes.done_calibration": 1.0, "env.name": "carracing"}, ["cmaes.done_calibration", "carracing"]),
    ({"cmaes.done_calibration": 1.0, "cmaes.done": "sample"}, ["cmaes.done: threshold"]),
], ids=["carracing", "sampled-done"])
def test_calibration_without_its_pacer_is_refused_by_name(flat, named):
    base = config_lib.to_flat(config_lib.Config())
    base["env.name"] = "takecover"
    with pytest.raises(UserError) as info:
        config_lib.validate(config_lib.from_flat({**base, **flat}))
    for text in named:
        assert text in str(info.value)


def test_the_real_pacer_plays_its_own_seeds_once_per_run(tmp_path, monkeypatch):
    from conftest import SMOKE

    import agents.evaluate
    from agents.calibrate import CALIBRATION_SEED_BASE, real_pacer
    from worldmodel.runs import open_run

    run = open_run(tmp_path / "run", SMOKE, ["env.name=takecover", "env.max_steps=60", "eval.pacer_steps=0",
                                             "cmaes.calibration_pacer_steps=10",
                                             "cmaes.done_calibration=1.0", "cmaes.calibration_episodes=2",
                                             "cmaes.seed=4", "eval.workers=1", "system.device=cpu"])
    pacer = real_pacer(run, workers=1)
    seeds = [CALIBRATION_SEED_BASE + 4, CALIBRATION_SEED_BASE + 5]
    assert pacer["seeds"] == seeds and pacer["pacer_steps"] == 10
    legs = open_run(tmp_path / "run", None, ["eval.pacer_steps=10"], create=False)
    by_hand = agents.evaluate.play_many(legs, "pacing", seeds, workers=1)
    assert pacer["mean_steps"] == np.mean([e["steps"] for e in by_hand])
    assert pacer["mean_return"] == np.mean([e["return"] for e in by_hand])
    assert 0 < pacer["mean_steps"] <= 60

    def no_replay(*args, **kwargs):
        raise AssertionError("the pacer's real episodes were played again")

    monkeypatch.setattr(agents.evaluate, "play_many", no_replay)
    assert real_pacer(run, workers=1) == pacer  # from calibration.json
