"""controller.shield: the hazard critic overrides C's action in the real game where a hold is safer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_dream import FakeM
from test_train_m import A, _run, _write_latents
from test_train_m import Z as M_Z

from agents.agent import Agent, agent_critic_paths, shield_critic_paths
from agents.cmaes import m_snapshot_path
from agents.controller import ControllerSpec, load_controller, save_controller
from agents.select import _cache_key
from agents.shield import CriticAverage
from worldmodel.errors import UserError
from worldmodel.io import load_checkpoint, save_checkpoint
from worldmodel.train_m import load_m, train_m
from worldmodel.vae import ConvVAE

Z = 3


class ActionHazard(FakeM):
    """A critic whose P(death within H) depends on the action alone: right 0.5, stay 0.3, left 0.1;
    it counts the actions it observes."""

    def __init__(self):
        super().__init__(z_dim=Z)
        self.observed: list[torch.Tensor] = []

    def judge_step(self, state, z, action):
        a = action[:, 0]
        p = torch.where(a > 1 / 3, 0.5, torch.where(a < -1 / 3, 0.1, 0.3))
        return state, torch.zeros_like(p), p

    def observe(self, state, z, action):
        self.observed.append(action.clone())
        return state


class SpyM(FakeM):
    def __init__(self):
        super().__init__(z_dim=Z)
        self.observed: list[torch.Tensor] = []

    def observe(self, state, z, action):
        self.observed.append(action.clone())
        return state


def _agent(shield: float, bias: float = 5.0, critic=None):
    """Two environments; C's bias alone sets its action (tanh 5 = right, tanh -5 = left)."""
    torch.manual_seed(0)
    m = SpyM()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    params = np.zeros(spec.num_params, np.float32)
    params[-1] = bias
    critic = critic if critic is not None else ActionHazard()
    agent = Agent(ConvVAE(Z).eval(), m, spec, params, "zh", critic=critic, shield=shield)
    agent.reset(2)
    return agent, m, critic


FRAMES = np.zeros((2, 64, 64, 3), np.uint8)


@pytest.mark.parametrize("shield, expected", [(0.3, -1.0), (0.45, 1.0)])
def test_the_shield_takes_the_safest_hold_when_it_is_safer_by_more_than_the_margin(shield, expected):
    agent, m, critic = _agent(shield)
    actions = agent.act(FRAMES)
    assert actions.shape == (2, 1) and np.allclose(actions, expected, atol=1e-3)
    # M and the critic both observe the action played, not C's.
    assert torch.allclose(m.observed[-1], torch.as_tensor(actions)) and torch.allclose(critic.observed[-1], m.observed[-1])
    assert agent.overrides.tolist() == ([1, 1] if expected < 0 else [0, 0])  # per environment


def test_the_safest_action_already_is_left_alone():
    agent, m, _ = _agent(0.01, bias=-5.0)  # C goes left, the critic's safest
    assert np.allclose(agent.act(FRAMES), np.tanh(-5.0)) and agent.overrides.tolist() == [0, 0]


def test_without_a_shield_the_critic_is_not_asked():
    agent, _, critic = _agent(0.0)
    assert agent.critic is None
    assert np.allclose(agent.act(FRAMES), np.tanh(5.0)) and critic.observed == []


def test_a_shield_needs_a_critic():
    spec = ControllerSpec.for_env("takecover", FakeM(z_dim=Z).feature_dim("zh"))
    with pytest.raises(ValueError, match="hazard critic"):
        Agent(ConvVAE(Z), FakeM(z_dim=Z), spec, np.zeros(spec.num_params, np.float32), "zh", shield=0.1)


def test_keep_drops_the_critic_state_of_finished_episodes():
    agent, _, _ = _agent(0.3)
    agent.act(FRAMES)
    agent.keep([1])
    assert all(len(s) == 1 for s in agent.critic_state) and agent.overrides.tolist() == [1]
    assert agent.act(FRAMES[:1]).shape == (1, 1) and agent.overrides.tolist() == [2]


@pytest.mark.parametrize("overrides, message", [
    (["controller.shield=0.1"], "controller.shield: 0.1 needs TakeCover .* and a hazard critic"),
    (["env.name=carracing", "model.hazard_horizon=8", "controller.shield=0.1"], "needs TakeCover"),
    (["controller.shield=1.5"], "controller.shield"),
    (["model.hazard_horizon=8", "cmaes.dream_shield=true"], "cmaes.dream_shield: true needs the shield's margin"),
])
def test_shield_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _run(tmp_path, overrides=overrides)


def test_from_run_loads_the_critic_and_names_a_missing_one(tmp_path):
    run = _run(tmp_path, overrides=["model.epochs=1", "model.hazard_horizon=4", "controller.shield=0.1",
                                    "env.name=takecover"])
    train_m(run)
    save_checkpoint(run.vae_path, {"z_dim": run.cfg.vae.z_dim, "state_dict": ConvVAE(run.cfg.vae.z_dim).state_dict()})
    spec = ControllerSpec.for_config(run.cfg, load_m(run.m_path, run.cfg))
    agent = Agent.from_run(run.dir, run.cfg, np.zeros(spec.num_params, np.float32))
    assert agent.critic is not None and agent.shield == 0.1
    assert "shield 0.1" in _cache_key(run, 0)  # select's scores hold for this way of acting only
    # A controller checked with an earlier M plays with that M's critic, kept beside it in m_history/.
    snapshot = m_snapshot_path(run, "abc")
    snapshot.parent.mkdir()
    shutil.copyfile(run.m_path, snapshot)
    with pytest.raises(UserError, match="abc.m1.pt: not found"):
        Agent.from_run(run.dir, run.cfg, np.zeros(spec.num_params, np.float32), m_path=snapshot)
    shutil.copyfile(run.member_path(1), m_snapshot_path(run, "abc", 1))
    assert Agent.from_run(run.dir, run.cfg, np.zeros(spec.num_params, np.float32), m_path=snapshot).critic is not None
    run.member_path(run.cfg.model.ensemble).unlink()
    with pytest.raises(UserError, match="m1.pt: not found; controller.shield needs the hazard critic"):
        Agent.from_run(run.dir, run.cfg, np.zeros(spec.num_params, np.float32))


def test_evaluate_reports_the_share_of_actions_the_shield_replaced():
    from agents.evaluate import scores

    detail = [{"seed": 0, "return": 100.0, "steps": 100, "shielded": 1},
              {"seed": 1, "return": 300.0, "steps": 300, "shielded": 3}]
    report = {"agent": {"mean": 200.0, "std": 100.0, "min": 100.0, "max": 300.0, "episodes": 2,
                        "episodes_detail": detail},
              "random": {"mean": 50.0, "std": 1.0, "episodes": 2}, "shield": 0.1}
    assert scores(report)["shield"] == "margin 0.1: the critic replaced 1.00 % of the agent's actions"
    assert "shield" not in scores({**report, "shield": 0.0})


def test_the_pipeline_ends_with_the_share_of_actions_the_shield_replaced():
    from agents.pipeline import score_lines

    result = {"agent": "200.0 ± 100.0", "random policy": "50.0 ± 1.0", "shield": "margin 0.1: 1.00 %",
              "agent in the dream": "30.0 ± 3.0"}
    assert score_lines("takecover", result) == [
        "real takecover: agent 200.0 ± 100.0", "real takecover: shield margin 0.1: 1.00 %",
        "real takecover: random policy 50.0 ± 1.0", "dream takecover: agent 30.0 ± 3.0"]
    del result["shield"]
    assert "shield" not in "".join(score_lines("takecover", result))


def test_the_critic_script_trains_a_critic_of_another_horizon_beside_the_agent(tmp_path):
    """scripts/takecover_critic.py: the run's V, M's and controller linked, and the critic that
    train-rnn would train for the new horizon on the same latents; a folder of another horizon is refused."""
    common = ["model.epochs=1", "env.name=takecover", "controller.shield=0.1", "system.precision=float32"]
    run = _run(tmp_path, overrides=[*common, "model.hazard_horizon=1"])
    train_m(run)
    save_controller(run.controller_path, np.zeros(4, np.float32), {"env": "takecover"})
    out = tmp_path / "out"
    script = [sys.executable, str(ROOT / "scripts" / "takecover_critic.py"), "--run", str(run.dir), "--out", str(out)]
    result = subprocess.run([*script, "--horizon", "3"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    k = run.cfg.model.ensemble
    assert os.path.samefile(out / "m.pt", run.m_path) and os.path.samefile(out / "controller.pt", run.controller_path)
    reference = _run(tmp_path, overrides=[*common, "model.hazard_horizon=3"], name="reference")
    train_m(reference)
    new, same, old = (load_m(p, reference.cfg, M_Z, A).state_dict()
                      for p in (out / f"m{k}.pt", reference.member_path(k), run.member_path(k)))
    assert all(torch.allclose(new[name], same[name], atol=1e-5) for name in new)
    assert not all(torch.allclose(new[name], old[name], atol=1e-5) for name in new)  # the horizon changed it
    again = subprocess.run([*script, "--horizon", "4"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "model.hazard_horizon is 3, not --horizon 4" in again.stderr
    assert "Traceback" not in again.stderr


class ConstantHazard(ActionHazard):
    """A critic that rates right at ``right`` and the other moves as ActionHazard does; its state
    counts the steps it observed."""

    def __init__(self, right: float):
        super().__init__()
        self.right = right

    def initial_state(self, batch_size):
        return (torch.zeros(batch_size, 1),)

    def judge_step(self, state, z, action):
        next_state, r, p = super().judge_step(state, z, action)
        return next_state, r, torch.where(action[:, 0] > 1 / 3, torch.tensor(self.right), p)

    def observe(self, state, z, action):
        super().observe(state, z, action)
        return (state[0] + 1,)


@pytest.mark.parametrize("rights, replaced", [((0.5, 0.1), True), ((0.3, 0.1), False)])
def test_averaged_critics_shield_on_their_mean_hazard(rights, replaced):
    # Left is rated 0.1 by both: C's right is replaced where the critics' mean P for it (0.3 or
    # 0.2) is above 0.1 by more than the margin 0.15, though the first critic alone would say so both times.
    critics = [ConstantHazard(r) for r in rights]
    agent, m, _ = _agent(0.15, critic=CriticAverage(critics))
    actions = agent.act(FRAMES)
    assert np.allclose(actions, -1.0 if replaced else np.tanh(5.0), atol=1e-3)
    assert agent.overrides.tolist() == ([1, 1] if replaced else [0, 0])
    assert all(torch.allclose(c.observed[-1], m.observed[-1]) for c in critics)  # each observes the move played
    # The state is each critic's in turn, and cut, extended and carried as one.
    agent.keep([1])
    agent.add([7])
    assert [s.flatten().tolist() for s in agent.critic_state] == [[1.0, 0.0], [1.0, 0.0]]
    agent.act(FRAMES)
    assert [s.flatten().tolist() for s in agent.critic_state] == [[2.0, 1.0], [2.0, 1.0]]


def _shielded_run(tmp_path, critics: int):
    """A TakeCover run with trained M's (one member and the critic), a V, and a zero controller's params."""
    run = _run(tmp_path, overrides=["model.epochs=1", "model.hazard_horizon=4", "controller.shield=0.1",
                                    "env.name=takecover", f"controller.shield_critics={critics}"], latents=False)
    _write_latents(run.latents_dir, action_dim=1)  # TakeCover's one action
    train_m(run)
    save_checkpoint(run.vae_path, {"z_dim": run.cfg.vae.z_dim, "state_dict": ConvVAE(run.cfg.vae.z_dim).state_dict()})
    spec = ControllerSpec.for_config(run.cfg, load_m(run.m_path, run.cfg))
    return run, np.zeros(spec.num_params, np.float32)


def test_the_shield_averages_its_own_critic_and_the_latest_others(tmp_path):
    run, params = _shielded_run(tmp_path, critics=3)
    assert not isinstance(Agent.from_run(run.dir, run.cfg, params).critic, CriticAverage)  # no other M yet
    for m_id in ("a1", "b2", "c3"):  # three earlier M's, oldest first, with copies of the critic
        m_snapshot_path(run, m_id).parent.mkdir(exist_ok=True)
        shutil.copyfile(run.m_path, m_snapshot_path(run, m_id))
        shutil.copyfile(run.member_path(1), m_snapshot_path(run, m_id, 1))
    with pytest.raises(UserError, match="index.json: not found; controller.shield_critics: 3 needs the order"):
        Agent.from_run(run.dir, run.cfg, params)
    for m_id in ("a1", "b2", "c3"):
        run.record_m_snapshot(m_id)
    run.record_m_snapshot("b2")  # once only
    assert run.m_snapshot_ids() == ["a1", "b2", "c3"]
    own = run.member_path(1)
    assert shield_critic_paths(run, "none", own) == [own, m_snapshot_path(run, "c3", 1), m_snapshot_path(run, "b2", 1)]
    # An agent with c3's M: its own critic, then the latest others (b2, a1).
    assert shield_critic_paths(run, "c3", m_snapshot_path(run, "c3", 1)) == [
        m_snapshot_path(run, m_id, 1) for m_id in ("c3", "b2", "a1")]
    agent = Agent.from_run(run.dir, run.cfg, params, m_path=m_snapshot_path(run, "c3"))
    assert isinstance(agent.critic, CriticAverage) and len(agent.critic.critics) == 3
    assert "shield 0.1 over 3 critics" in _cache_key(run, 0)
    run.m_history_index.write_text('{"a": 1}')
    with pytest.raises(UserError, match="index.json: not a list of M fingerprints"):
        Agent.from_run(run.dir, run.cfg, params)


def test_averaged_critics_need_the_shield(tmp_path):
    with pytest.raises(UserError, match="controller.shield_critics: 2 needs the shield"):
        _run(tmp_path, overrides=["controller.shield_critics=2"])


def _next_iteration(run):
    """Change every M file, as an iteration's training does."""
    for k in range(run.m_files):
        checkpoint = load_checkpoint(run.member_path(k))
        checkpoint["state_dict"] = {name: w + 0.01 for name, w in checkpoint["state_dict"].items()}
        save_checkpoint(run.member_path(k), checkpoint)


def test_snapshots_are_indexed_and_export_carries_the_other_critics(tmp_path):
    from agents.cmaes import current_m_id, keep_m_snapshot
    from worldmodel.export import export_run

    run, params = _shielded_run(tmp_path, critics=2)
    run.controller_path.write_bytes(b"controller")  # export copies it as it is
    first = current_m_id(run)  # the ids iterate gives its snapshots: all the M files' fingerprint
    keep_m_snapshot(run, first)
    _next_iteration(run)
    second = current_m_id(run)
    keep_m_snapshot(run, second)
    keep_m_snapshot(run, first)  # kept already: the order stands
    assert first != second and run.m_snapshot_ids() == [first, second]
    # The run's M is the newest snapshot: it is not one of "the others" (it once was, twice over).
    assert agent_critic_paths(run) == [run.member_path(1), run.m_snapshot_path(first, 1)]
    assert agent_critic_paths(run)[1:] == agent_critic_paths(run, run.m_snapshot_path(second))[1:]  # as select
    out = tmp_path / "agent"
    export_run(run, out, episodes=1)
    assert sorted(p.name for p in (out / "m_history").iterdir()) == sorted(["index.json", f"{first}.m1.pt"])
    copied = torch.load(out / "m_history" / f"{first}.m1.pt", weights_only=True)["state_dict"]
    assert next(iter(copied.values())).dtype == torch.float16
    critic = Agent.from_run(out, run.cfg, params).critic
    assert isinstance(critic, CriticAverage) and len(critic.critics) == 2


def test_first_dream_screen_cuts_a_run_back_to_its_first_dream(tmp_path):
    """scripts/first_dream_screen.py: the first M as the run's M, only its checks, no iterations;
    --critics first keeps that M alone for the shield, --critics all every M the run kept."""
    from agents.cmaes import (
        STATE_FILE,
        _new_state,
        current_m_id,
        keep_m_snapshot,
        load_state,
        save_state,
    )
    from worldmodel.runs import open_run

    run, params = _shielded_run(tmp_path, critics=3)
    save_controller(run.controller_path, params, {})
    first = current_m_id(run)
    keep_m_snapshot(run, first)
    first_files = [run.member_path(k).read_bytes() for k in range(run.m_files)]
    _next_iteration(run)
    second = current_m_id(run)
    keep_m_snapshot(run, second)
    state = _new_state(params.size, run.cfg.cmaes)
    state["checks"] = [{"params": params, "generation": 20, "real_score": 1.0, "m": first},
                       {"params": params, "generation": 40, "real_score": 2.0, "m": second},
                       {"params": params, "generation": 40, "real_score": 3.0, "m": first, "key": "collector 1"}]
    save_state(run.path(STATE_FILE), state)

    def screen(out, *flags):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "first_dream_screen.py"), "--run", str(run.dir),
                               "--out", str(out), "--no-select", *flags], capture_output=True, text=True)

    result = screen(tmp_path / "ni")
    assert result.returncode == 0, result.stderr
    cut = open_run(tmp_path / "ni", None, create=False)
    assert cut.cfg.iterate.iterations == 0 and cut.m_snapshot_ids() == [first]
    assert [cut.member_path(k).read_bytes() for k in range(run.m_files)] == first_files
    assert [(ch["generation"], ch["m"]) for ch in load_state(cut.path(STATE_FILE))["checks"]] == [(20, first)]
    assert not isinstance(Agent.from_run(cut.dir, cut.cfg, params).critic, CriticAverage)  # its one critic

    assert screen(tmp_path / "fd", "--critics", "all").returncode == 0
    cut = open_run(tmp_path / "fd", None, create=False)
    assert cut.m_snapshot_ids() == [first, second]
    assert len(Agent.from_run(cut.dir, cut.cfg, params).critic.critics) == 2  # its own and the iteration's

    # The latents of episodes the first dream did not have (an iteration's) stay behind.
    assert len(list(run.latents_dir.glob("ep_*.npz"))) > run.cfg.collect.episodes
    assert sorted(p.name for p in cut.latents_dir.glob("ep_*.npz")) == [
        f"ep_{i:06d}.npz" for i in range(run.cfg.collect.episodes)]
    assert "iteration_1.pt: not found" in screen(tmp_path / "ci0", "--critic-iterations", "2").stderr
    assert not (tmp_path / "ci0").exists()
    collector = np.arange(params.size, dtype=np.float32)  # the first dream's last centre, as iterate keeps it
    (run.dir / "collectors").mkdir()
    save_controller(run.dir / "collectors" / "iteration_1.pt", collector, {"iteration": 1, "generation": 40, "m": first})
    assert screen(tmp_path / "ci", "--critic-iterations", "2").returncode == 0
    ci = open_run(tmp_path / "ci", None, create=False)
    assert ci.cfg.iterate.iterations == 2 and ci.cfg.iterate.search is False
    for i in (1, 2):  # each iteration collects with it
        kept, meta = load_controller(ci.dir / "collectors" / f"iteration_{i}.pt")
        assert np.array_equal(kept, collector) and meta == {"iteration": i, "generation": 40, "m": first}
    critic_state = load_checkpoint(ci.dir / "m1_ckpt.pt")  # the first critic, to train on from
    assert critic_state["epoch"] == ci.cfg.model.epochs
    assert all(torch.equal(w, load_checkpoint(ci.member_path(1))["state_dict"][k])
               for k, w in critic_state["model"].items())
    assert "use it with --critics first" in screen(tmp_path / "ci2", "--critic-iterations", "2",
                                                   "--critics", "all").stderr

    again = screen(tmp_path / "fd")
    assert again.returncode != 0 and again.stderr.strip() == f"error: {tmp_path / 'fd'}: already exists (choose a new --out)"
    assert cut.m_snapshot_ids() == [first, second]  # nothing overwritten
