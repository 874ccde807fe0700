"""The ensemble of M's: the first member dreams, the reward is the members' mean less λ × spread,
the end the first member's, the harshest member's or the members' mean (cmaes.ensemble_done)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_dream import FakeM, bias_params, starts_for, tiny_mdnrnn
from test_train_m import _run

from agents.controller import ControllerSpec
from envs.dream import DreamSettings, dream_rollouts, load_world_model
from worldmodel.ensemble import Ensemble
from worldmodel.errors import UserError
from worldmodel.io import read_jsonl
from worldmodel.torch_utils import resolve_precision
from worldmodel.train_m import train_m


class ScaledM(FakeM):
    """FakeM whose predicted reward is ``scale`` × a_0."""

    def __init__(self, scale: float, short: int = 3, long: int = 7):
        super().__init__(short=short, long=long)
        self.scale = scale

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        state, z_next, r, done = super().imagine_step(state, z, action, temperature, generator, noise)
        return state, z_next, self.scale * r, done


def test_one_member_dreams_exactly_as_the_member():
    m = tiny_mdnrnn()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))  # one action, as tiny_mdnrnn
    params = torch.randn(6, spec.num_params, generator=torch.Generator().manual_seed(0)) * 0.3
    z0 = starts_for(4, 6)[:, 0]
    settings = DreamSettings(max_steps=30, reward="model", done_threshold=0.5)
    alone = dream_rollouts(m, params, spec, z0, settings, torch.Generator().manual_seed(3))
    ensemble = dream_rollouts(Ensemble([m], disagreement=2.0), params, spec, z0, settings,
                              torch.Generator().manual_seed(3))
    assert torch.equal(alone.lengths, ensemble.lengths)
    torch.testing.assert_close(alone.returns, ensemble.returns)


def test_reward_is_mean_less_lambda_std_and_the_first_member_ends_the_dream():
    # rewards a and 3a: mean 2a, population std a; the second member alone would end every dream at step 2.
    members = [ScaledM(1.0, short=3, long=7), ScaledM(3.0, short=2, long=2)]
    ensemble = Ensemble(members, disagreement=0.5)
    spec = ControllerSpec.for_env("takecover", ensemble.feature_dim("zh"))
    params = bias_params(spec, [1.0, -1.0, 1.0])
    res = dream_rollouts(ensemble, params, spec, torch.zeros(3, 3), DreamSettings(max_steps=20, reward="model"))
    assert res.lengths.tolist() == [7, 3, 7]
    a = math.tanh(1.0)
    np.testing.assert_allclose(res.returns.numpy(), [7 * 1.5 * a, -3 * 2.5 * a, 7 * 1.5 * a], rtol=1e-6)
    # Each member's state shrinks with the batch as dreams end.
    assert members[0].batch_sizes == members[1].batch_sizes == [3] * 3 + [2] * 4


def test_features_and_noise_are_the_first_members():
    members = [tiny_mdnrnn(seed=0), tiny_mdnrnn(seed=1)]
    ensemble = Ensemble(members)
    state = ensemble.initial_state(2)
    z, a = torch.randn(2, 4), torch.zeros(2, 1)
    state = ensemble.observe(state, z, a)
    first = members[0].observe(members[0].initial_state(2), z, a)
    torch.testing.assert_close(ensemble.features(state, z, "zh"), members[0].features(first, z, "zh"))
    assert ensemble.feature_dim("zch") == members[0].feature_dim("zch")
    with pytest.raises(TypeError):
        ensemble.loss({})


def test_train_m_trains_every_member_and_the_dream_loads_them(tmp_path):
    run = _run(tmp_path, overrides=["model.ensemble=3", "model.epochs=1", "cmaes.disagreement=1.0",
                                    "model.predict_reward=true", "env.name=carracing"])
    train_m(run)
    paths = [run.member_path(k) for k in range(3)]
    assert [p.name for p in paths] == ["m.pt", "m1.pt", "m2.pt"] and all(p.exists() for p in paths)
    assert all((run.dir / name).exists() for name in ("m_ckpt.pt", "m1_ckpt.pt", "m2_ckpt.pt"))
    assert len(read_jsonl(run.metrics_path("m1"))) == 1 and len(read_jsonl(run.metrics_path("m"))) == 1
    weights = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    assert not torch.equal(weights[0]["head.weight"], weights[1]["head.weight"])  # different seeds
    m = load_world_model(run)
    assert isinstance(m, Ensemble) and len(m.members) == 3 and m.disagreement == 1.0 and m.done_rule == "first"
    precision = resolve_precision(run.cfg.system.precision, "cpu")
    assert all(member.dream_dtype == precision for member in m.members)
    run.cfg.system.precision = "bfloat16"
    assert all(member.dream_dtype == torch.bfloat16 for member in load_world_model(run).members)
    paths[2].unlink()
    with pytest.raises(UserError, match="m2.pt"):
        load_world_model(run)


def test_disagreement_needs_an_ensemble_with_a_reward_head(tmp_path):
    with pytest.raises(UserError, match="cmaes.disagreement"):
        _run(tmp_path, overrides=["cmaes.disagreement=1.0"])


def test_ensemble_done_needs_an_ensemble_and_reaches_the_dream(tmp_path):
    with pytest.raises(UserError, match="cmaes.ensemble_done: max needs model.ensemble >= 2"):
        _run(tmp_path / "one", overrides=["cmaes.ensemble_done=max"])
    run = _run(tmp_path / "two", overrides=["model.ensemble=2", "model.epochs=1", "cmaes.ensemble_done=max",
                                           "env.name=carracing"])  # _run's data has three actions
    train_m(run)
    assert load_world_model(run).done_rule == "max"


def test_export_copies_every_member(tmp_path):
    from worldmodel.export import export_run

    run = _run(tmp_path, overrides=["model.ensemble=2", "model.epochs=1"])
    train_m(run)
    run.controller_path.write_bytes(b"controller")  # export copies it as it is
    out = tmp_path / "agent"
    export_run(run, out, episodes=1)
    member = torch.load(out / "m1.pt", weights_only=True)["state_dict"]
    assert (out / "m.pt").exists() and member["head.weight"].dtype == torch.float16


def test_members_judge_by_default_through_imagine_step():
    m = ScaledM(2.0, short=1)
    state, z, a = m.initial_state(3), torch.zeros(3, 3), torch.tensor([[1.0], [0.5], [-1.0]])
    expected_state, _, expected_reward, expected_done = m.imagine_step(state, z, a, 0.0)
    new_state, reward, done = m.judge_step(state, z, a)
    torch.testing.assert_close(reward, expected_reward)
    assert done.tolist() == expected_done.tolist() == [0.0, 0.0, 1.0]
    assert all(torch.equal(x, y) for x, y in zip(new_state, expected_state))


@pytest.mark.parametrize("rule, threshold, lengths", [
    ("first", 0.5, [7, 3, 7]),   # the first member alone, as without the option
    ("max", 0.5, [2, 2, 2]),     # the harsher member ends every dream at step 2
    ("mean", 0.4, [2, 2, 2]),    # one of two members: a mean of 0.5
    ("mean", 0.6, [7, 3, 7]),    # both members must expect the end
])
def test_ensemble_done_rule_decides_who_ends_the_dream(rule, threshold, lengths):
    members = [ScaledM(1.0, short=3, long=7), ScaledM(3.0, short=2, long=2)]
    ensemble = Ensemble(members, done=rule)
    spec = ControllerSpec.for_env("takecover", ensemble.feature_dim("zh"))
    res = dream_rollouts(ensemble, bias_params(spec, [1.0, -1.0, 1.0]), spec, torch.zeros(3, 3),
                         DreamSettings(max_steps=20, reward="alive", done_threshold=threshold))
    assert res.lengths.tolist() == lengths
    assert res.terminated.all()


def test_unknown_done_rule_is_refused():
    with pytest.raises(ValueError, match="done rule"):
        Ensemble([ScaledM(1.0)], done="min")


def test_mdnrnn_members_judge_the_first_members_z():
    members = [tiny_mdnrnn(seed=0), tiny_mdnrnn(seed=1), tiny_mdnrnn(seed=2)]
    ensemble = Ensemble(members, disagreement=0.7)
    state, z = ensemble.initial_state(4), torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        a = torch.rand(4, 1, generator=torch.Generator().manual_seed(step)) * 2 - 1
        before, parts = state, ensemble._split(state)
        own = [m.imagine_step(part, z, a, 0.0) for m, part in zip(members, parts)]
        noise = members[0].sample_noise(4, torch.Generator().manual_seed(10 + step))
        first = members[0].imagine_step(parts[0], z, a, 1.0, noise=noise)
        state, z_next, reward, done = ensemble.imagine_step(state, z, a, 1.0, noise=noise)
        rewards = torch.stack([r for _, _, r, _ in own])
        dones = torch.stack([d for _, _, _, d in own])
        torch.testing.assert_close(reward, rewards.mean(0) - 0.7 * rewards.std(0, unbiased=False))
        torch.testing.assert_close(z_next, first[1])
        torch.testing.assert_close(done, first[3])
        for rule, expected in (("max", dones.amax(0)), ("mean", dones.mean(0))):
            judged = Ensemble(members, done=rule).imagine_step(before, z, a, 1.0, noise=noise)[3]
            torch.testing.assert_close(judged, expected)
        torch.testing.assert_close(state[2], own[1][0][0])  # member 1's h
        z = z_next.clone()


# ----------------------------------------------------------------- each member moves its streams

def test_each_member_moves_the_dreams_of_its_streams():
    members = [tiny_mdnrnn(seed=0), tiny_mdnrnn(seed=1), tiny_mdnrnn(seed=2)]
    each, first = Ensemble(members, moves="each"), Ensemble(members)
    noise = each.sample_noise(6, torch.Generator().manual_seed(5))
    baseline = first.sample_noise(6, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(noise, baseline))  # the same random numbers, and a mover
    assert noise[-1].tolist() == [0, 1, 2, 0, 1, 2]
    state, z = each.initial_state(6), torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    a = torch.linspace(-1, 1, 6).unsqueeze(1)
    parts = each._split(state)
    own = [m.imagine_step(part, z, a, 1.15, noise=noise[:-1]) for m, part in zip(members, parts)]
    new_state, z_next, _, done = each.imagine_step(state, z, a, 1.15, noise=noise)
    for row in range(6):
        torch.testing.assert_close(z_next[row], own[row % 3][1][row])
    torch.testing.assert_close(done, own[0][3])  # the first member still judges (ensemble_done: first)
    for k in range(3):  # every member steps its own state on the same z and a
        torch.testing.assert_close(new_state[2 * k], own[k][0][0])
    # C reads the first member's h' beside the mover's z'
    torch.testing.assert_close(each.features(new_state, z_next, "zh"), torch.cat([z_next, own[0][0][0]], 1))


class DriftM(FakeM):
    """z' = z + drift (every coordinate); a death where the z it reads has z_0 >= 5."""

    def __init__(self, drift: float):
        super().__init__(short=100, long=100)
        self.drift = drift

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        state, _, r, _ = super().imagine_step(state, z, action, temperature, generator, noise)
        return state, z + self.drift, r, (z[:, 0] >= 5).float()


@pytest.mark.parametrize("moves, lengths", [("first", [6, 6, 6, 6, 6]), ("each", [4, 6, 4, 6, 6])])
def test_a_streams_mover_holds_as_dreams_end_around_it(moves, lengths):
    # The first member drifts by 1 (z_0 reaches 5 at step 6), the second by 2 (reaches 6 at step 4).
    ensemble = Ensemble([DriftM(1.0), DriftM(2.0)], moves=moves)
    spec = ControllerSpec.for_env("takecover", ensemble.feature_dim("zh"))
    res = dream_rollouts(ensemble, bias_params(spec, [1.0] * 5), spec, torch.zeros(5, 3),
                         DreamSettings(max_steps=20, reward="alive"), torch.Generator().manual_seed(0),
                         streams=torch.tensor([1, 2, 3, 0, 2]))  # stream s: member s mod 2
    assert res.lengths.tolist() == lengths


def test_each_needs_an_ensemble_and_reaches_the_dream(tmp_path):
    with pytest.raises(UserError, match="cmaes.ensemble_moves: each needs model.ensemble >= 2"):
        _run(tmp_path / "one", overrides=["cmaes.ensemble_moves=each"])
    run = _run(tmp_path / "two", overrides=["model.ensemble=2", "model.epochs=1", "cmaes.ensemble_moves=each",
                                           "env.name=carracing"])
    train_m(run)
    assert load_world_model(run).moves_each
    with pytest.raises(ValueError, match="moves"):
        Ensemble([ScaledM(1.0)], moves="last")


# ----------------------------------------------------------------- the hazard critic

class HazardM(FakeM):
    """A toy critic: P(death within its horizon) is ``right`` while a_0 > 0, else ``left``; never ends a dream."""

    def __init__(self, right: float, left: float):
        super().__init__()
        self.right, self.left = right, left

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        state, z_next, _, _ = super().imagine_step(state, z, action, temperature, generator, noise)
        hazard = torch.where(action[:, 0] > 0, self.right, self.left)
        return state, z_next, torch.zeros_like(hazard), hazard


def _critic_dream(penalty: float, threshold: float = 1.0):
    ensemble = Ensemble([ScaledM(0.0, short=3, long=7)], critic=HazardM(right=0.3, left=0.05),
                        hazard_penalty=penalty, hazard_threshold=threshold)
    spec = ControllerSpec.for_env("takecover", ensemble.feature_dim("zh"))
    return dream_rollouts(ensemble, bias_params(spec, [1.0, -1.0, 1.0]), spec, torch.zeros(3, 3),
                          DreamSettings(max_steps=20, reward="alive+model"))


def test_hazard_penalty_makes_a_step_in_danger_pay_less():
    res = _critic_dream(penalty=2.0)
    assert res.lengths.tolist() == [7, 3, 7]  # the critic ends nothing: the member's rule alone
    # Right: 7 steps at 1 - 2 * 0.3; left: 3 steps at 1 - 2 * 0.05.
    np.testing.assert_allclose(res.returns.numpy(), [7 * 0.4, 3 * 0.9, 7 * 0.4], rtol=1e-6)
    # A step never pays less than nothing, so living on never costs.
    np.testing.assert_allclose(_critic_dream(penalty=5.0).returns.numpy(), [0.0, 3 * 0.75, 0.0], atol=1e-6)


def test_hazard_threshold_ends_the_dream_like_a_death():
    res = _critic_dream(penalty=0.0, threshold=0.2)
    assert res.lengths.tolist() == [1, 3, 1] and res.terminated.all()
    np.testing.assert_allclose(res.returns.numpy(), [1.0, 3.0, 1.0])  # no penalty: 1 a step


def test_a_critic_the_dream_does_not_read_is_not_stepped(monkeypatch):
    """A critic kept only for the real game's shield: the dream is the critic-free one, and cheaper."""
    critic = HazardM(right=0.3, left=0.05)
    monkeypatch.setattr(critic, "judge_step", lambda *a, **k: pytest.fail("the dream stepped an unread critic"))
    spec = ControllerSpec.for_env("takecover", ScaledM(0.0).feature_dim("zh"))
    params, starts = bias_params(spec, [1.0, -1.0, 1.0]), torch.zeros(3, 3)
    settings = DreamSettings(max_steps=20, reward="alive+model")
    with_critic = dream_rollouts(Ensemble([ScaledM(0.0, short=3, long=7)], critic=critic), params, spec,
                                 starts, settings)
    without = dream_rollouts(Ensemble([ScaledM(0.0, short=3, long=7)]), params, spec, starts, settings)
    assert with_critic.lengths.tolist() == without.lengths.tolist() == [7, 3, 7]
    np.testing.assert_allclose(with_critic.returns.numpy(), without.returns.numpy())


def test_a_penalty_needs_a_critic():
    with pytest.raises(ValueError, match="hazard critic"):
        Ensemble([ScaledM(0.0)], hazard_penalty=1.0)
    with pytest.raises(ValueError, match="hazard critic"):
        Ensemble([ScaledM(0.0)], dream_shield=0.1)


def _shielded_dream(margin: float):
    # The critic rates right (P 0.3) riskier than left or stay (0.05): a shield with a margin under
    # 0.25 turns the right-runners left, where the member ends the dream at step 3 instead of 7.
    ensemble = Ensemble([ScaledM(0.0, short=3, long=7)], critic=HazardM(right=0.3, left=0.05), dream_shield=margin)
    spec = ControllerSpec.for_env("takecover", ensemble.feature_dim("zh"))
    return ensemble, spec, dream_rollouts(ensemble, bias_params(spec, [1.0, -1.0, 1.0]), spec, torch.zeros(3, 3),
                                          DreamSettings(max_steps=20, reward="alive"))


@pytest.mark.parametrize("margin, lengths", [(0.1, [3, 3, 3]), (0.3, [7, 3, 7])])
def test_the_dream_shield_replaces_the_moves_its_critic_rates_riskier_by_more_than_the_margin(margin, lengths):
    ensemble, _, res = _shielded_dream(margin)
    assert ensemble.dreams_critic and res.lengths.tolist() == lengths


def test_the_dream_env_plays_the_same_shield():
    from envs.dream import DreamEnv

    ensemble, _, _ = _shielded_dream(0.1)
    env = DreamEnv(ensemble, starts_for(3), "takecover", DreamSettings(max_steps=20, reward="alive"))
    env.reset(seed=0)
    steps, terminated = 0, False
    while not terminated:
        _, _, terminated, _, _ = env.step(np.array([1.0], np.float32))  # always right: held left
        steps += 1
    assert steps == 3


def test_train_m_trains_the_critic_on_deaths_within_its_horizon(tmp_path, monkeypatch):
    import worldmodel.train_m as train_m_module

    run = _run(tmp_path, overrides=["model.ensemble=2", "model.epochs=1", "model.hazard_horizon=4",
                                    "cmaes.hazard_threshold=0.9", "env.name=carracing",  # three actions
                                    "model.workers=1"])  # in this process, where the spy is
    assert run.m_files == 3
    seen = {}
    real = train_m_module._train_member

    def spy(run, member, train, val, *args):
        seen[member] = train
        return real(run, member, train, val, *args)

    monkeypatch.setattr(train_m_module, "_train_member", spy)
    train_m(run)
    assert sorted(seen) == [0, 1, 2] and all(run.member_path(k).exists() for k in range(3))
    assert len(read_jsonl(run.metrics_path("m2"))) == 1
    deaths = np.flatnonzero(seen[0].terminated)
    assert deaths.size and np.array_equal(seen[1].terminated, seen[0].terminated)
    expected = np.zeros_like(seen[0].terminated)
    for death in deaths:  # the step that kills and the 3 before it, inside the episode
        start = seen[0].starts[np.searchsorted(seen[0].starts, death, side="right") - 1]
        expected[max(start, death - 3): death + 1] = True
    assert np.array_equal(seen[2].terminated, expected) and expected.sum() > deaths.size
    m = load_world_model(run)
    assert isinstance(m, Ensemble) and m.n_members == 2 and m.has_critic and len(m.members) == 3
    assert (m.hazard_penalty, m.hazard_threshold) == (0.0, 0.9)
    assert DreamSettings.from_config(run.cfg).reward == "model"


def test_a_takecover_dream_with_a_hazard_penalty_pays_alive_plus_the_penalty(tmp_path):
    run = _run(tmp_path, overrides=["model.hazard_horizon=8", "cmaes.hazard_penalty=3.0"], latents=False)
    assert DreamSettings.from_config(run.cfg).reward == "alive+model"
    assert DreamSettings.from_config(_run(tmp_path, latents=False, name="plain").cfg).reward == "alive"


@pytest.mark.parametrize("overrides, message", [
    (["cmaes.hazard_penalty=1.0"], "cmaes.hazard_penalty: 1.0 needs a hazard critic"),
    (["cmaes.hazard_threshold=0.5"], "cmaes.hazard_threshold: 0.5 needs a hazard critic"),
    (["env.name=carracing", "model.hazard_horizon=8", "cmaes.hazard_penalty=1.0"], "is for TakeCover"),
])
def test_hazard_settings_need_a_critic_and_takecover(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _run(tmp_path, overrides=overrides)
