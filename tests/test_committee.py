"""A committee of agents (agents/agent.py): one V, each member its own C and M, the median move played."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_evaluate
import torch
from test_evaluate import SEED
from test_select import FakeGame, P, _run_with_checks
from test_shield import FRAMES, ActionHazard, SpyM

from agents.agent import Agent, Committee, load_agent
from agents.cmaes import m_snapshot_path
from agents.controller import ControllerSpec, load_committee, save_committee
from agents.evaluate import evaluate_run, play_many
from agents.select import select_controller
from worldmodel.errors import UserError
from worldmodel.export import export_run
from worldmodel.m import build_m
from worldmodel.runs import open_run
from worldmodel.train_m import save_m
from worldmodel.vae import ConvVAE

Z = 3
tiny = test_evaluate.tiny  # the fixture: a run with random V, M and C, and real TakeCover episodes


def _member(bias: float, critic=None, shield: float = 0.0) -> tuple[Agent, SpyM]:
    """Two environments; C's bias alone sets its move (tanh 5 = right, tanh -5 = left, 0 = stay)."""
    m = SpyM()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    params = np.zeros(spec.num_params, np.float32)
    params[-1] = bias
    torch.manual_seed(0)
    return Agent(ConvVAE(Z).eval(), m, spec, params, "zh", critic=critic, shield=shield), m


@pytest.mark.parametrize("biases, expected", [
    ((5.0, -5.0, 5.0), np.tanh(5.0)),   # two right, one left: right
    ((-5.0, -5.0, 5.0), np.tanh(-5.0)),  # two left: left
    ((5.0, 0.0, -5.0), 0.0),             # right, stay, left: the middle one
])
def test_the_committee_plays_the_median_move_and_every_m_observes_it(biases, expected):
    members = [_member(b) for b in biases]
    committee = Committee([agent for agent, _ in members])
    committee.reset(2)
    actions = committee.act(FRAMES)
    assert actions.shape == (2, 1) and np.allclose(actions, expected)
    for _, m in members:  # each member's M moves with the move played, not its own
        assert torch.allclose(m.observed[-1], torch.as_tensor(actions))


def test_the_lead_shields_the_vote_and_counts_the_overrides():
    critic = ActionHazard()  # right 0.5, stay 0.3, left 0.1
    lead, m0 = _member(5.0, critic=critic, shield=0.3)
    other, m1 = _member(5.0)
    committee = Committee([lead, other])
    committee.reset(2)
    actions = committee.act(FRAMES)  # both vote right; the critic prefers left by 0.4 > 0.3
    assert np.allclose(actions, -1.0) and committee.overrides.tolist() == [1, 1]
    assert torch.allclose(m1.observed[-1], m0.observed[-1]) and torch.allclose(critic.observed[-1], m0.observed[-1])
    committee.keep([1])
    assert committee.act(FRAMES[:1]).shape == (1, 1) and all(len(a.generators) == 1 for a in committee.members)


def test_only_the_lead_may_shield():
    lead, _ = _member(5.0)
    shielded, _ = _member(5.0, critic=ActionHazard(), shield=0.3)
    with pytest.raises(ValueError, match="first agent"):
        Committee([lead, shielded])
    with pytest.raises(ValueError, match="at least one"):
        Committee([])


def test_a_committee_of_one_is_the_agent():
    alone, _ = _member(0.7)
    twin, _ = _member(0.7)
    committee = Committee([twin])
    alone.reset(2)
    committee.reset(2)
    assert np.array_equal(committee.act(FRAMES), alone.act(FRAMES))


# ----------------------------------------------------------------- select keeps a committee that wins

class CommitteeGame(FakeGame):
    """FakeGame, and a committee scores ``together`` whoever its members are; records its members."""

    def __init__(self, fresh_means: list[float], together: float):
        super().__init__(fresh_means)
        self.together, self.committees = together, []

    def __call__(self, params, episodes, seed, m_path=None, committee=None):
        if committee is None:
            return super().__call__(params, episodes, seed, m_path)
        self.committees.append([(int(p[0]), m) for p, m in committee])
        return [self.together] * episodes


def _select_run(make_run, checks=(300.0, 700.0, 900.0), ms=None):
    return _run_with_checks(make_run, list(checks), ["controller.committee=2"], ms=ms)


def test_select_keeps_the_committee_where_it_beats_the_best_alone(make_run):
    run = _select_run(make_run)
    game = CommitteeGame([0.0, 650.0, 500.0], together=700.0)
    summary = select_controller(run, game)
    assert game.committees == [[(1, None), (2, None)]]  # the best on fresh episodes leads
    assert summary["selected_generation"] == 20 and summary["committee"].startswith("kept")
    spec = ControllerSpec.for_env("takecover", P - 1)
    params, m_ids, meta = load_committee(run.committee_path, spec)
    np.testing.assert_array_equal(params, np.stack([np.full(P, 1.0), np.full(P, 2.0)]))
    assert m_ids == ["", ""] and meta["select_score"] == 700.0 and meta["members"] == ["20", "30"]
    before = run.committee_path.stat().st_mtime_ns
    again = CommitteeGame([0.0, 0.0, 0.0], together=0.0)  # cached: nothing played, nothing rewritten
    assert select_controller(run, again)["committee"].startswith("kept") and again.calls == again.committees == []
    assert run.committee_path.stat().st_mtime_ns == before


def test_select_drops_a_committee_that_does_not_beat_the_best_alone(make_run):
    run = _select_run(make_run)
    run.committee_path.write_bytes(b"an earlier committee")
    summary = select_controller(run, CommitteeGame([0.0, 650.0, 500.0], together=650.0))
    assert summary["committee"].startswith("not kept") and not run.committee_path.exists()
    alone = open_run(run.dir, None, ["controller.committee=1"])
    run.committee_path.write_bytes(b"an earlier committee")
    game = CommitteeGame([0.0, 650.0, 500.0], together=900.0)
    assert "committee" not in select_controller(alone, game) and game.committees == []
    assert not run.committee_path.exists()


def test_each_member_of_the_committee_plays_with_the_m_it_was_checked_with(make_run):
    run = _select_run(make_run, checks=(900.0, 700.0, 300.0), ms=["old", "new", "new"])
    m_snapshot_path(run, "old").parent.mkdir()
    m_snapshot_path(run, "old").write_bytes(b"iteration 1's M")
    game = CommitteeGame([1000.0, 650.0, 500.0], together=2000.0)
    select_controller(run, game, m_id="new")
    assert game.committees == [[(0, m_snapshot_path(run, "old")), (1, None)]]
    _, m_ids, _ = load_committee(run.committee_path, ControllerSpec.for_env("takecover", P - 1))
    assert m_ids == ["old", "new"]


@pytest.mark.parametrize("overrides, message", [
    (["controller.committee=3"], r"cmaes.select_top >= 3, is 2"),
    (["controller.committee=2", "cmaes.select_episodes=0"], r"cmaes.select_episodes > 0, is 0"),
    (["controller.committee=0"], "controller.committee"),
])
def test_committee_settings_are_checked(make_run, overrides, message):
    with pytest.raises(UserError, match=message):
        make_run(overrides=["cmaes.select_top=2", "cmaes.select_episodes=6", *overrides])


# ----------------------------------------------------------------- the committee in the real game

def _committee_run(tiny, tmp_path, members: int = 2):
    """tiny's run copied, with controller.committee and a second M kept in m_history/."""
    shutil.copytree(tiny["run"].dir, tmp_path / "run")
    run = open_run(tmp_path / "run", None, [f"controller.committee={members}", "cmaes.select_top=3",
                                            "cmaes.select_episodes=2"])
    torch.manual_seed(1)
    other = build_m(run.cfg, run.cfg.vae.z_dim, 1).eval()
    run.m_snapshot_path("other").parent.mkdir(exist_ok=True)
    save_m(run.m_snapshot_path("other"), other, dataclasses.asdict(run.cfg.model))
    return run


def test_a_committee_of_twins_plays_as_the_agent_alone(tiny, tmp_path):
    run = _committee_run(tiny, tmp_path)
    alone = play_many(run, "agent", [SEED, SEED + 1], workers=1)
    save_committee(run.committee_path, np.stack([tiny["params"]] * 2), ["mine", "mine"], {})
    assert isinstance(load_agent(run.dir, run.cfg), Committee)
    assert play_many(run, "agent", [SEED, SEED + 1], workers=1) == alone


def test_evaluate_and_export_play_the_committee(tiny, tmp_path):
    run = _committee_run(tiny, tmp_path)
    rng = np.random.default_rng(2)
    second = 3.0 * rng.standard_normal(tiny["params"].shape).astype(np.float32)
    save_committee(run.committee_path, np.stack([tiny["params"], second]), ["mine", "other"], {})
    agent = load_agent(run.dir, run.cfg)
    assert len(agent.members) == 2 and agent.members[1].m is not agent.lead.m
    summary = evaluate_run(run, episodes=2, workers=1, progress=False)
    report = json.loads(Path(summary["report"]).read_text())
    assert report["committee"] == 2 and summary["committee"].startswith("select's 2 best controllers")
    out = tmp_path / "exported"
    export_run(run, out, episodes=1)
    assert (out / "committee.pt").exists() and (out / "m_history" / "other.pt").exists()
    weights = torch.load(out / "m_history" / "other.pt", weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float16 for t in weights.values() if t.is_floating_point())
    exported = open_run(out, None, [], create=False)
    assert len(load_agent(exported.dir, exported.cfg).members) == 2
    assert len(play_many(exported, "agent", [SEED, SEED + 1], workers=1)) == 2


def test_a_stale_or_broken_committee_is_named(tiny, tmp_path):
    run = _committee_run(tiny, tmp_path)
    other = np.zeros_like(tiny["params"])
    save_committee(run.committee_path, np.stack([other, tiny["params"]]), ["mine", "mine"], {})
    with pytest.raises(UserError, match="committee.pt: leads with another controller than controller.pt"):
        load_agent(run.dir, run.cfg)
    save_committee(run.committee_path, np.stack([tiny["params"], other]), ["mine", "gone"], {})
    with pytest.raises(UserError, match="gone.pt: not found"):
        load_agent(run.dir, run.cfg)
    with pytest.raises(UserError, match="has 2 controllers, controller.committee is 3"):
        load_agent(run.dir, open_run(run.dir, None, ["controller.committee=3"], create=False).cfg)
    assert isinstance(load_agent(run.dir, open_run(run.dir, None, ["controller.committee=1"], create=False).cfg), Agent)
    run.committee_path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="committee.pt: cannot load"):
        load_agent(run.dir, run.cfg)
