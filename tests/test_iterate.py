"""`iterate`: collect with the current agent, retrain M, continue CMA-ES; cumulative and resumable."""

from __future__ import annotations

import shutil

import gymnasium
import numpy as np
import pytest
import torch

import envs
from agents.agent import Agent
from agents.cmaes import (
    STATE_FILE,
    current_m_id,
    load_state,
    m_snapshot_path,
    restart_search,
    save_state,
)
from agents.collect import run_agent_episodes
from agents.controller import load_controller
from agents.iterate import _collector_check, iterate, iteration_run
from agents.pipeline import dream
from worldmodel.episodes import list_episodes, load_episode
from worldmodel.errors import UserError
from worldmodel.io import load_checkpoint, read_jsonl
from worldmodel.latents import list_latents
from worldmodel.plots import plot_run
from worldmodel.runs import open_run
from worldmodel.train_m import train_m
from worldmodel.train_vae import train_vae
from worldmodel.vae import preprocess

ITERATE = ("iterate.iterations=2", "iterate.episodes=2", "iterate.m_epochs=1", "iterate.generations=1",
           "iterate.noise=0", "cmaes.eval_every=0")


def test_iteration_targets_are_cumulative(make_run):
    run = make_run(overrides=["iterate.episodes=5", "iterate.m_epochs=2", "iterate.generations=7",
                              "iterate.vae_epochs=1"])
    base, second = iteration_run(run, 0), iteration_run(run, 2)
    assert base.cfg == run.cfg
    assert second.cfg.collect.episodes == run.cfg.collect.episodes + 10
    assert second.cfg.model.epochs == run.cfg.model.epochs + 4
    assert second.cfg.cmaes.generations == run.cfg.cmaes.generations + 14
    assert second.cfg.vae.epochs == run.cfg.vae.epochs + 2
    assert second.dir == run.dir


def test_iterate_needs_a_trained_controller(make_run):
    run = make_run(overrides=["iterate.iterations=1"])
    with pytest.raises(UserError, match="cmaes.pkl: not found"):
        iterate(run, progress=False)


@pytest.fixture(scope="module")
def iterated(smoke_run, tmp_path_factory):
    """The smoke run trained through one dream, then iterated twice (2 agent episodes each)."""
    folder = tmp_path_factory.mktemp("iterate") / "run"
    shutil.copytree(smoke_run.dir, folder)
    run = open_run(folder, None, list(ITERATE))
    train_vae(run, progress=False)
    train_m(run)
    dream(run, workers=1, progress=False)
    before = folder.parent / "before"  # V, M and C that collect iteration 1's episodes
    shutil.copytree(folder, before, ignore=shutil.ignore_patterns("episodes", "latents", "cache"))
    summary = iterate(run, workers=1, progress=False)
    return run, summary, before


def test_iterate_adds_agent_episodes_and_trains_on(iterated):
    run, summary, _ = iterated
    base = run.cfg.collect.episodes
    assert len(list_episodes(run.episodes_dir)) == base + 4
    assert len(list_latents(run.latents_dir)) == base + 4
    assert load_checkpoint(run.path("m_ckpt.pt"))["epoch"] == run.cfg.model.epochs + 2
    history = read_jsonl(run.metrics_path("dream"))
    assert [h["generation"] for h in history] == list(range(1, run.cfg.cmaes.generations + 3))
    records = read_jsonl(run.metrics_path("iterate"))
    assert [r["iteration"] for r in records] == [1, 2]
    assert [r["episodes"] for r in records] == [base + 2, base + 4]
    assert summary["iterations"] == 2 and summary["generation"] == run.cfg.cmaes.generations + 2
    assert plot_run(run, stages=("dream",))["dream"].endswith("dream.png")


def test_agent_episodes_are_played_by_the_controller(iterated):
    """With noise 0 the recorded actions are what the agent (V, M, CMA-ES centre) picks from the frames."""
    run, _, before = iterated
    episode = load_episode(sorted(list_episodes(run.episodes_dir))[run.cfg.collect.episodes])
    centre = np.asarray(load_state(before / STATE_FILE)["es"].mean, np.float32)
    agent = Agent.from_run(before, run.cfg, centre)
    agent.reset(1)
    with torch.no_grad():
        replayed = np.concatenate([agent.act(frame[None]) for frame in episode["obs"]])
    np.testing.assert_allclose(replayed, episode["action"], atol=1e-5)
    with torch.no_grad():
        mu, _ = agent.vae.encode(preprocess(episode["obs"][-1:], agent.device))  # the z M observed last
    torch.testing.assert_close(agent.last_z, mu)
    held_random = load_episode(sorted(list_episodes(run.episodes_dir))[0])
    agent.reset(1)
    replayed = np.concatenate([agent.act(frame[None]) for frame in held_random["obs"]])
    assert not np.allclose(replayed, held_random["action"], atol=1e-5)  # the check can fail


class _EndsBySeed(gymnasium.Wrapper):
    """A real game whose episode with seed s ends after 3 + s % 11 steps: lengths that differ."""

    def reset(self, *, seed=None, options=None):
        self.left = 3 + seed % 11
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.left -= 1
        return obs, reward, terminated or self.left == 0, truncated, info


def test_the_agent_collects_in_lockstep_as_it_plays_each_episode_alone(iterated):
    """Three games at a time, each refilled as its episode ends, play every seed's episode (noise
    included) as a game of its own does: the rows of V, M and the noise stay with their episodes."""
    run, _, before = iterated
    centre = np.asarray(load_state(before / STATE_FILE)["es"].mean, np.float32)
    agent = Agent.from_run(before, run.cfg, centre)
    seeds = [20, 5, 31, 9, 14, 2, 27]
    games = [_EndsBySeed(envs.make_from_config(run.cfg.env)) for _ in range(3)]
    try:
        together = {k: (episode, seconds) for k, episode, seconds in run_agent_episodes(games, agent, 0.3, seeds, 60)}
        alone = {k: next(run_agent_episodes(games[:1], agent, 0.3, [s], 60))[1] for k, s in enumerate(seeds)}
    finally:
        for game in games:
            game.close()
    assert sorted(together) == list(range(len(seeds)))
    for k, s in enumerate(seeds):
        episode, seconds = together[k]
        assert len(episode["action"]) == 3 + s % 11 and seconds > 0
        np.testing.assert_array_equal(episode["obs"], alone[k]["obs"])
        np.testing.assert_allclose(episode["action"], alone[k]["action"], atol=1e-5)
        np.testing.assert_array_equal(episode["terminated"], alone[k]["terminated"])


def test_each_collector_is_a_check_scored_by_its_episodes(iterated):
    """The centre that collects joins the real checks (``select`` may keep it), with the M it played with."""
    run, _, before = iterated
    records = read_jsonl(run.metrics_path("iterate"))
    checks = {ch["key"]: ch for ch in load_state(run.path(STATE_FILE))["checks"] if "key" in ch}
    assert sorted(checks) == [f"collector {r['iteration']}" for r in records]
    for r in records:
        check = checks[f"collector {r['iteration']}"]
        params, meta = load_controller(run.dir / "collectors" / f"iteration_{r['iteration']}.pt")
        np.testing.assert_array_equal(check["params"], params)
        assert check["real_score"] == pytest.approx(r["collect_return"])
        assert check["generation"] == r["collected_by"]["generation"] and check["m"] == meta["m"]
        assert m_snapshot_path(run, check["m"]).exists()
    first_m = current_m_id(open_run(before, None, []))
    assert checks["collector 1"]["m"] == first_m != checks["collector 2"]["m"]  # M was retrained in between


def test_a_collector_with_more_noise_than_play_is_no_candidate(iterated, tmp_path):
    run, _, _ = iterated
    shutil.copytree(run.dir, tmp_path / "run", ignore=shutil.ignore_patterns("episodes", "latents", "cache"))
    noisy = open_run(tmp_path / "run", None, ["iterate.noise=0.1"])
    before = len(load_state(noisy.path(STATE_FILE))["checks"])
    params, meta = load_controller(noisy.dir / "collectors" / "iteration_1.pt")
    _collector_check(noisy, 9, params, meta, {"mean_return": 1000.0})  # its return scores another policy
    assert len(load_state(noisy.path(STATE_FILE))["checks"]) == before
    _collector_check(open_run(noisy.dir, None, ["iterate.noise=0"]), 9, params, meta, {"mean_return": 1000.0})
    assert len(load_state(noisy.path(STATE_FILE))["checks"]) == before + 1  # the check can fail


def test_rerun_does_nothing_and_more_iterations_continue(iterated):
    run, _, _ = iterated
    before = sorted(p.name for p in list_episodes(run.episodes_dir))
    iterate(run, workers=1, progress=False)
    assert sorted(p.name for p in list_episodes(run.episodes_dir)) == before
    assert len(read_jsonl(run.metrics_path("iterate"))) == 2

    more = open_run(run.dir, None, ["iterate.iterations=3"])
    iterate(more, workers=1, progress=False)
    assert len(list_episodes(run.episodes_dir)) == len(before) + 2
    assert [r["iteration"] for r in read_jsonl(run.metrics_path("iterate"))] == [1, 2, 3]


def test_restart_search_recentres_once_per_tag_and_keeps_the_rest(iterated, tmp_path):
    _, _, before = iterated  # the run after its first dream: a CMA-ES that has moved off 0
    folder = tmp_path / "run"
    shutil.copytree(before, folder)
    run = open_run(folder, None, [])
    old = load_state(run.path(STATE_FILE))
    assert np.abs(old["es"].mean).max() > 0
    assert restart_search(run, 1)
    new = load_state(run.path(STATE_FILE))
    assert np.all(new["es"].mean == 0) and new["es"].sigma == pytest.approx(run.cfg.cmaes.sigma0)
    assert new["restarts"] == [1]
    for key in ("generation", "history", "wall_s"):
        assert new[key] == old[key]
    assert len(new["checks"]) == len(old["checks"])
    assert new["best_dream"]["generation"] == old["best_dream"]["generation"]
    new["es"].tell(new["es"].ask(), list(range(run.cfg.cmaes.population)))  # resumed later: moved on
    moved = new["es"].mean.copy()
    save_state(run.path(STATE_FILE), new)
    assert not restart_search(run, 1)  # the same iteration again: nothing thrown away
    np.testing.assert_array_equal(load_state(run.path(STATE_FILE))["es"].mean, moved)
    assert restart_search(run, 2) and load_state(run.path(STATE_FILE))["restarts"] == [1, 2]


def test_restart_search_from_best_centres_on_the_best_real_check(iterated, tmp_path):
    _, _, before = iterated
    folder = tmp_path / "run"
    shutil.copytree(before, folder)
    run = open_run(folder, None, [])
    state = load_state(run.path(STATE_FILE))
    rng = np.random.default_rng(0)
    state["checks"] = [{"generation": g, "real_score": s, "params": rng.normal(size=state["num_params"])}
                       for g, s in ((2, 100.0), (4, 300.0), (6, 200.0))]
    save_state(run.path(STATE_FILE), state)
    assert restart_search(run, 1, best_above=250.0)
    new = load_state(run.path(STATE_FILE))
    np.testing.assert_allclose(new["es"].mean, state["checks"][1]["params"])
    assert new["es"].sigma == pytest.approx(run.cfg.cmaes.sigma0)
    assert restart_search(run, 2, best_above=300.0)  # no check beats the data's policy: from zero
    assert np.all(load_state(run.path(STATE_FILE))["es"].mean == 0)
    new = load_state(run.path(STATE_FILE))
    new["checks"] = []  # no real check yet: from zero too
    save_state(run.path(STATE_FILE), new)
    assert restart_search(run, 3, best_above=float("-inf"))
    assert np.all(load_state(run.path(STATE_FILE))["es"].mean == 0)


@pytest.mark.parametrize("start", ["zero", "best"])
def test_iterate_with_restart_starts_the_new_dream_from_zero_or_the_best_check(iterated, tmp_path, monkeypatch,
                                                                              start):
    run, _, _ = iterated
    folder = tmp_path / "run"
    shutil.copytree(run.dir, folder)
    done = len(read_jsonl(open_run(folder, None, []).metrics_path("iterate")))
    more = open_run(folder, None, [f"iterate.iterations={done + 1}", "iterate.restart=true",
                                   f"iterate.restart_from={start}"])
    state = load_state(more.path(STATE_FILE))
    assert state["checks"]  # the fixture's dream checked in the real game
    best = np.random.default_rng(1).normal(size=state["num_params"]).astype(np.float32)
    state["checks"].append({"generation": state["generation"], "key": "planted", "real_score": 1e9, "params": best})
    save_state(more.path(STATE_FILE), state)  # a check far above the random data's return
    import agents.pipeline as pipeline

    seen = []
    real_dream = pipeline.dream

    def dream_spy(r, **kw):
        seen.append(load_state(r.path(STATE_FILE))["es"].mean.copy())
        return real_dream(r, **kw)

    monkeypatch.setattr(pipeline, "dream", dream_spy)
    iterate(more, workers=1, progress=False)
    assert len(seen) == 1
    if start == "zero":
        assert np.all(seen[0] == 0)
    else:
        np.testing.assert_allclose(seen[0], best, rtol=1e-6)
    assert load_state(more.path(STATE_FILE))["restarts"] == [done + 1]
    record = read_jsonl(more.metrics_path("iterate"))[-1]
    assert record["restarted"] is True and record["restarted_from"] == start


def test_a_resumed_iteration_reports_the_controller_that_collected(iterated, tmp_path, monkeypatch):
    run, _, _ = iterated
    folder = tmp_path / "run"
    shutil.copytree(run.dir, folder)
    done = len(read_jsonl(open_run(folder, None, []).metrics_path("iterate")))
    more = open_run(folder, None, [f"iterate.iterations={done + 1}"])
    began = load_state(more.path(STATE_FILE))["generation"]
    import agents.pipeline as pipeline

    real_dream = pipeline.dream

    def killed_after_dreaming(r, **kw):
        real_dream(r, **kw)  # the dream moves the centre on ...
        raise KeyboardInterrupt  # ... and the process dies before the iteration is recorded

    monkeypatch.setattr(pipeline, "dream", killed_after_dreaming)
    with pytest.raises(KeyboardInterrupt):
        iterate(more, workers=1, progress=False)
    assert load_state(more.path(STATE_FILE))["generation"] > began
    monkeypatch.setattr(pipeline, "dream", real_dream)
    iterate(more, workers=1, progress=False)
    record = read_jsonl(more.metrics_path("iterate"))[-1]
    assert record["iteration"] == done + 1 and record["collected_by"]["generation"] == began
    params, meta = load_controller(folder / "collectors" / f"iteration_{done + 1}.pt")
    assert meta["generation"] == began


def test_critic_only_iterations_train_the_critic_alone_for_the_shield(smoke_run, tmp_path):
    """iterate.search: false: the first dream's agent collects, only the hazard critic trains on,
    each iteration's critic is kept in m_history/, and the shield averages them with the agent's."""
    from agents.agent import agent_critic_paths
    from agents.shield import CriticAverage

    folder = tmp_path / "run"
    shutil.copytree(smoke_run.dir, folder)
    run = open_run(folder, None, [*ITERATE, "iterate.search=false", "model.hazard_horizon=3",
                                  "controller.shield=0.1", "controller.shield_critics=3"])
    train_vae(run, progress=False)
    train_m(run)
    dream(run, workers=1, progress=False)
    first = current_m_id(run)
    dream_m, critic = run.member_path(0).read_bytes(), run.member_path(1).read_bytes()
    state, generations = load_state(run.path(STATE_FILE)), len(read_jsonl(run.metrics_path("dream")))

    summary = iterate(run, workers=1, progress=False)
    assert summary["iterations"] == 2 and summary["generation"] == state["generation"]
    assert len(list_latents(run.latents_dir)) == run.cfg.collect.episodes + 4
    assert run.member_path(0).read_bytes() == dream_m and run.member_path(1).read_bytes() != critic
    assert load_checkpoint(run.path("m_ckpt.pt"))["epoch"] == run.cfg.model.epochs  # the dream's M stays
    assert load_checkpoint(run.path("m1_ckpt.pt"))["epoch"] == run.cfg.model.epochs + 2  # the critic trains on
    assert len(read_jsonl(run.metrics_path("dream"))) == generations  # no new search
    after = load_state(run.path(STATE_FILE))
    assert after["generation"] == state["generation"] and np.array_equal(after["es"].mean, state["es"].mean)
    records = read_jsonl(run.metrics_path("iterate"))
    assert [(r["iteration"], r["search"]) for r in records] == [(1, False), (2, False)]
    assert all(np.isfinite(r["critic_val_loss"]) and "train_critic" in r["seconds"] for r in records)

    ids = run.m_snapshot_ids()
    assert len(ids) == 3 and ids[0] == first and ids[-1] == current_m_id(run)
    # The first dream's agent, as select plays it: its own critic, then the two iterations' (newest first).
    own = m_snapshot_path(run, first)
    assert agent_critic_paths(run, own) == [m_snapshot_path(run, m_id, 1) for m_id in (first, ids[2], ids[1])]
    assert isinstance(Agent.from_run(run.dir, run.cfg, np.asarray(state["es"].mean, np.float32), m_path=own).critic,
                      CriticAverage)
    assert iterate(run, workers=1, progress=False)["iterations"] == 2  # a rerun has nothing left to do
    assert len(read_jsonl(run.metrics_path("iterate"))) == 2


def test_critic_only_iterations_need_a_critic_to_train(make_run):
    with pytest.raises(UserError, match="iterate.search: false trains only the hazard critic"):
        make_run(overrides=["iterate.search=false"])
