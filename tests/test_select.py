"""agents/select.py: the best-checked controllers played again on fresh episodes; the winner kept."""

from __future__ import annotations

import numpy as np

from agents.cmaes import (
    STATE_FILE,
    _new_state,
    add_check,
    check_key,
    keep_m_snapshot,
    load_state,
    m_snapshot_path,
    save_state,
)
from agents.controller import load_controller, save_controller
from agents.select import SELECT_SEED_BASE, select_controller
from worldmodel.runs import open_run

P = 5


def _run_with_checks(make_run, check_scores: list[float], overrides=(), ms: list[str] | None = None):
    """A run whose CMA-ES state holds one real check per score; controller i's params are all i.

    ``ms``: the fingerprint of the M each check was played with (none: checks from before that)."""
    run = make_run(overrides=["cmaes.select_top=2", "cmaes.select_episodes=6", *overrides])
    state = _new_state(P, run.cfg.cmaes)
    state["checks"] = [{"params": np.full(P, i, np.float32), "generation": 10 * (i + 1), "dream_score": 0.0,
                        "real_score": score, **({"m": ms[i]} if ms else {})} for i, score in enumerate(check_scores)]
    save_state(run.path(STATE_FILE), state)
    best = int(np.argmax(check_scores))
    save_controller(run.controller_path, np.full(P, best, np.float32), {"source": "real"})
    return run


class FakeGame:
    """Controller i scores fresh_means[i] on the fresh episodes; records every call."""

    def __init__(self, fresh_means: list[float]):
        self.fresh_means, self.calls, self.m_paths = fresh_means, [], {}

    def __call__(self, params: np.ndarray, episodes: int, seed: int, m_path=None) -> list[float]:
        i = int(params[0])
        self.calls.append((i, episodes, seed))
        self.m_paths[i] = m_path
        return [self.fresh_means[i]] * episodes


def test_keeps_the_best_on_fresh_episodes_not_the_best_check(make_run):
    # Checks rank controller 2 first (luck on the check episodes); fresh episodes rank controller 1 first.
    run = _run_with_checks(make_run, [300.0, 700.0, 900.0])
    game = FakeGame([1000.0, 650.0, 500.0])
    summary = select_controller(run, game)
    seed = SELECT_SEED_BASE + run.cfg.cmaes.seed
    assert sorted(game.calls) == [(1, 6, seed), (2, 6, seed)]  # only the top 2 checks, 6 episodes each
    assert summary["selected_generation"] == 20 and summary["select_score"] == 650.0
    params, meta = load_controller(run.controller_path)
    np.testing.assert_array_equal(params, np.full(P, 1, np.float32))
    assert meta["source"] == "select" and meta["select_score"] == 650.0 and meta["real_score"] == 700.0


def test_rerun_plays_nothing_and_keeps_the_file(make_run):
    run = _run_with_checks(make_run, [300.0, 700.0, 900.0])
    select_controller(run, FakeGame([0.0, 650.0, 500.0]))
    before = run.controller_path.stat().st_mtime_ns
    again = FakeGame([0.0, 0.0, 0.0])
    summary = select_controller(run, again)
    assert again.calls == [] and summary["selected_generation"] == 20
    assert run.controller_path.stat().st_mtime_ns == before


def test_best_check_confirmed_leaves_controller_untouched(make_run):
    run = _run_with_checks(make_run, [300.0, 700.0, 900.0])
    before = run.controller_path.stat().st_mtime_ns
    summary = select_controller(run, FakeGame([0.0, 500.0, 800.0]))
    assert summary["selected_generation"] == 30
    assert run.controller_path.stat().st_mtime_ns == before


def test_off_when_no_fresh_episodes(make_run):
    run = _run_with_checks(make_run, [300.0, 700.0], overrides=["cmaes.select_episodes=0"])
    game = FakeGame([0.0, 0.0])
    assert select_controller(run, game)["selected"].startswith("off")
    assert game.calls == []


def test_scores_hold_only_for_the_same_way_of_acting(make_run):
    # A score played deterministically says nothing of the same controller with noisy actions.
    run = _run_with_checks(make_run, [300.0, 700.0, 900.0])
    select_controller(run, FakeGame([0.0, 650.0, 500.0]))
    noisy = open_run(run.dir, None, ["controller.action_noise=0.1"])
    game = FakeGame([0.0, 400.0, 600.0])
    summary = select_controller(noisy, game)
    assert sorted(i for i, _, _ in game.calls) == [1, 2] and summary["selected_generation"] == 30
    again = FakeGame([0.0, 0.0, 0.0])  # the deterministic scores are still there for a deterministic rerun
    assert select_controller(open_run(run.dir, None, ["controller.action_noise=0"]), again)["selected_generation"] == 20
    assert again.calls == []


def test_only_checks_played_with_the_current_m_are_candidates(make_run):
    run = _run_with_checks(make_run, [300.0, 700.0, 900.0], ms=["old", "new", "new"])
    game = FakeGame([1000.0, 650.0, 500.0])
    summary = select_controller(run, game, m_id="new")
    assert sorted(i for i, _, _ in game.calls) == [1, 2]  # controller 0 was checked with another M
    assert summary["selected_generation"] == 20
    later = FakeGame([0.0, 0.0, 0.0])
    assert select_controller(run, later, m_id="newer")["selected"].startswith("skipped")
    assert later.calls == []


def test_checks_of_an_earlier_m_play_with_that_m_and_the_winner_brings_it_back(make_run):
    # Iteration 1's M ("old", kept in m_history/) checked controller 0; the current M ("new") the others.
    run = _run_with_checks(make_run, [900.0, 700.0, 300.0], ms=["old", "new", "new"])
    m_snapshot_path(run, "old").parent.mkdir()
    m_snapshot_path(run, "old").write_bytes(b"iteration 1's M")
    run.m_path.write_bytes(b"the last M")
    save_controller(run.controller_path, np.full(P, 1, np.float32), {"source": "real"})  # the last M's best
    game = FakeGame([1000.0, 650.0, 500.0])
    summary = select_controller(run, game, m_id="new")
    assert sorted(i for i, _, _ in game.calls) == [0, 1]
    assert game.m_paths == {0: m_snapshot_path(run, "old"), 1: None}  # each with the M it was checked with
    assert summary["selected_generation"] == 10 and summary["m"] == "old"
    assert run.m_path.read_bytes() == b"iteration 1's M"  # the agent plays with its own M
    params, meta = load_controller(run.controller_path)
    np.testing.assert_array_equal(params, np.zeros(P, np.float32))
    assert meta["m"] == "old" and meta["select_score"] == 1000.0
    # Run again, now that m.pt is the old M: nothing is played, nothing changes.
    again = FakeGame([0.0, 0.0, 0.0])
    assert select_controller(run, again, m_id="old")["selected_generation"] == 10 and again.calls == []
    assert run.m_path.read_bytes() == b"iteration 1's M"


def test_an_ensembles_members_are_kept_and_brought_back_together(make_run):
    # The dream plays with every member, so a controller's M is all of them: kept and restored whole.
    run = _run_with_checks(make_run, [900.0, 700.0], overrides=["model.ensemble=2"], ms=["old", "new"])
    run.m_path.write_bytes(b"first member, iteration 1")
    run.member_path(1).write_bytes(b"second member, iteration 1")
    keep_m_snapshot(run, "old")
    run.m_path.write_bytes(b"first member, now")
    run.member_path(1).write_bytes(b"second member, now")
    keep_m_snapshot(run, "old")  # kept once: a later call does not overwrite the copy
    assert m_snapshot_path(run, "old", 1).read_bytes() == b"second member, iteration 1"
    game = FakeGame([1000.0, 650.0])
    summary = select_controller(run, game, m_id="new")
    assert game.m_paths == {0: m_snapshot_path(run, "old"), 1: None}  # the real game needs the first alone
    assert summary["m"] == "old"
    assert run.m_path.read_bytes() == b"first member, iteration 1"
    assert run.member_path(1).read_bytes() == b"second member, iteration 1"


def test_real_game_noise_is_another_way_of_acting(make_run):
    run = _run_with_checks(make_run, [300.0, 700.0, 900.0])
    select_controller(run, FakeGame([0.0, 650.0, 500.0]))
    noisy = open_run(run.dir, None, ["controller.real_noise=0.1"])
    game = FakeGame([0.0, 400.0, 600.0])
    assert select_controller(noisy, game)["selected_generation"] == 30
    assert sorted(i for i, _, _ in game.calls) == [1, 2]  # played again, not read from the noiseless scores


def test_a_collector_is_a_candidate_beside_the_check_of_its_generation(make_run):
    # iterate's collector is the centre after generation 20's update: not the centre checked at 20.
    run = _run_with_checks(make_run, [300.0, 700.0])
    collector = {"key": "collector 1", "params": np.full(P, 2, np.float32), "generation": 20,
                 "real_score": 800.0, "m": None}
    assert add_check(run, collector) and not add_check(run, dict(collector, real_score=0.0))  # once per key
    assert [check_key(ch) for ch in load_state(run.path(STATE_FILE))["checks"]] == ["10", "20", "collector 1"]
    game = FakeGame([0.0, 650.0, 900.0])
    summary = select_controller(run, game)
    assert sorted(i for i, _, _ in game.calls) == [1, 2]  # both generation-20 controllers played
    assert summary["selected"] == "collector 1" and summary["candidates"] == {"collector 1": 900.0, "20": 650.0}
    params, meta = load_controller(run.controller_path)
    np.testing.assert_array_equal(params, np.full(P, 2, np.float32))
    assert meta["check"] == "collector 1" and meta["dream_score"] is None and meta["generation"] == 20
    again = FakeGame([0.0, 0.0, 0.0])
    assert select_controller(run, again)["selected"] == "collector 1" and again.calls == []  # cached by key
