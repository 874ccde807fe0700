"""The dream: masking of finished dreams, common random numbers, DreamEnv = batched dream."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agents.controller import Controller, ControllerSpec
from envs.dream import (
    DreamEnv,
    DreamSettings,
    dream_rollouts,
    load_start_latents,
    make_dream_env,
    midway_starts,
    pick_midway_points,
    sample_start_z,
)
from worldmodel import config as config_lib
from worldmodel.errors import UserError
from worldmodel.latents import Latents
from worldmodel.m import WorldModel
from worldmodel.mdnrnn import MDNRNN
from worldmodel.vae import ConvVAE


class FakeM(WorldModel):
    """Deterministic toy M.  State (h (B, H), t (B, 1)); the dream ends at step ``short``
    when a_0 <= 0 and at step ``long`` otherwise; predicted reward r = a_0."""

    def __init__(self, z_dim: int = 3, action_dim: int = 1, hidden: int = 2, short: int = 3, long: int = 7):
        super().__init__()
        self.z_dim, self.action_dim, self.hidden = z_dim, action_dim, hidden
        self.short, self.long = short, long
        self.batch_sizes: list[int] = []

    @classmethod
    def from_config(cls, cfg, z_dim, action_dim):
        return cls(z_dim, action_dim)

    def initial_state(self, batch_size):
        return torch.zeros(batch_size, self.hidden), torch.zeros(batch_size, 1)

    def feature_dim(self, mode):
        return self.z_dim + self.hidden

    def features(self, state, z, mode):
        return torch.cat([z, state[0]], dim=1)

    def observe(self, state, z, action):
        return torch.tanh(z[:, : self.hidden] + action[:, :1]), state[1] + 1

    def sample_noise(self, n, generator):
        return (torch.randn(n, self.z_dim, generator=generator),)

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        self.batch_sizes.append(z.shape[0])
        eps = noise[0] if noise is not None else torch.randn(z.shape, generator=generator)
        h, t = self.observe(state, z, action)
        life = torch.where(action[:, 0] > 0, float(self.long), float(self.short))
        done = (t[:, 0] >= life).float()
        return (h, t), 0.5 * z + 0.1 * math.sqrt(temperature) * eps, action[:, 0].clone(), done

    def loss(self, batch):
        raise NotImplementedError


def tiny_mdnrnn(z_dim: int = 4, hidden: int = 8, done_bias: float = -3.0, seed: int = 0,
                mixture: str = "per_dim") -> MDNRNN:
    torch.manual_seed(seed)
    m = MDNRNN(z_dim, 1, hidden, 3, mixture=mixture).eval()
    with torch.no_grad():
        m.head.bias[-1] = done_bias  # P(done) ~ 5% a step: dreams of a few dozen steps
    return m


def starts_for(z_dim: int, episodes: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randn(episodes, z_dim, generator=g), torch.full((episodes, z_dim), -2.0)], 1)


def bias_params(spec: ControllerSpec, biases: list[float]) -> torch.Tensor:
    p = torch.zeros(len(biases), spec.num_params)
    p[:, -1] = torch.tensor(biases)
    return p


def test_finished_dreams_are_masked_out_with_known_returns():
    m = FakeM(short=3, long=7)
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    params = bias_params(spec, [1.0, -1.0, 1.0, -1.0, -1.0])  # a = tanh(b): long, short, ...
    z0 = torch.zeros(5, 3)
    res = dream_rollouts(m, params, spec, z0, DreamSettings(max_steps=5), torch.Generator().manual_seed(0))
    assert res.lengths.tolist() == [5, 3, 5, 3, 3]  # long ones hit the cap of 5
    assert res.returns.tolist() == [5.0, 3.0, 5.0, 3.0, 3.0]  # +1 per step alive
    assert res.terminated.tolist() == [False, True, False, True, True]
    assert m.batch_sizes == [5, 5, 5, 2, 2]  # dead dreams leave the batch

    m.batch_sizes.clear()
    res = dream_rollouts(m, params, spec, z0, DreamSettings(max_steps=20, reward="model"))
    a = math.tanh(1.0)
    np.testing.assert_allclose(res.returns.numpy(), [7 * a, -3 * a, 7 * a, -3 * a, -3 * a], rtol=1e-6)
    assert res.lengths.tolist() == [7, 3, 7, 3, 3] and bool(res.terminated.all())
    assert m.batch_sizes == [5] * 3 + [2] * 4


class StreamM(FakeM):
    """FakeM that keeps z (so z[:, 0] names the dream) and records the noise row each dream got.

    Row s of the k-th ``sample_noise`` call is 100 k + s, so a row says which draw and stream it is.
    """

    def __init__(self):
        super().__init__(short=3, long=7)
        self.draws, self.seen = 0, []

    def sample_noise(self, n, generator):
        self.draws += 1
        return (torch.arange(n, dtype=torch.float32)[:, None] + 100.0 * self.draws,)

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        self.seen.append((z[:, 0].long().tolist(), noise[0][:, 0].tolist()))
        state, _, r, done = super().imagine_step(state, z, action, temperature, noise=(torch.zeros_like(z),))
        return state, z, r, done


def test_each_dream_gets_its_streams_noise_row_as_the_batch_shrinks():
    m = StreamM()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    params = bias_params(spec, [1.0, -1.0, 1.0, -1.0, -1.0])  # dreams 1, 3, 4 end after 3 steps
    streams = [0, 1, 2, 0, 1]
    z0 = torch.zeros(5, 3)
    z0[:, 0] = torch.arange(5)
    res = dream_rollouts(m, params, spec, z0, DreamSettings(max_steps=6), None, torch.tensor(streams))
    assert res.lengths.tolist() == [6, 3, 6, 3, 3] and m.draws == 6
    assert [ids for ids, _ in m.seen] == [[0, 1, 2, 3, 4]] * 3 + [[0, 2]] * 3
    for k, (ids, rows) in enumerate(m.seen, start=1):
        assert rows == [100.0 * k + streams[i] for i in ids]


def recording(imagine_step, zs: list):
    """imagine_step that also appends each z_{t+1} it returns to ``zs``."""
    def step(*args, **kwargs):
        out = imagine_step(*args, **kwargs)
        zs.append(out[1].clone())
        return out
    return step


@pytest.mark.parametrize("done,reward,done_bias,dropout,mixture", [
    ("sample", "alive", -3.0, 0.0, "per_dim"), ("threshold", "model", 0.2, 0.0, "per_dim"),
    ("threshold", "alive", 0.2, 0.3, "per_dim"), ("threshold", "alive", 0.0, 0.0, "joint")])
def test_single_batched_dream_matches_dream_env(done, reward, done_bias, dropout, mixture, monkeypatch):
    m = tiny_mdnrnn(done_bias=done_bias, mixture=mixture)
    with torch.no_grad():
        m.head.weight[-1].zero_()
        m.head.weight[-1, 0] = 2.0  # P(done) follows h[0]: the threshold is crossed at some step
    settings = DreamSettings(temperature=1.2, max_steps=40, done=done, done_threshold=0.7, reward=reward,
                             dropout=dropout)
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    starts = starts_for(4)
    lengths = []
    for seed in (2, 3):
        params = torch.randn(1, spec.num_params, generator=torch.Generator().manual_seed(seed))
        env = DreamEnv(m, starts, "takecover", settings)
        obs, _ = env.reset(seed=seed)
        controller = Controller.from_flat(spec, params[0].numpy())
        env_zs, total, steps, terminated = [], 0.0, 0, False
        while True:
            obs, r, terminated, truncated, _ = env.step(controller.act(obs).numpy())
            env_zs.append(obs[:4])
            total, steps = total + r, steps + 1
            if terminated or truncated:
                break
        gen = torch.Generator().manual_seed(seed)
        z0 = sample_start_z(starts, 1, gen)
        zs = []
        with monkeypatch.context() as patch:
            patch.setattr(m, "imagine_step", recording(m.imagine_step, zs))
            res = dream_rollouts(m, params, spec, z0, settings, gen)
        assert int(res.lengths[0]) == steps and bool(res.terminated[0]) == terminated
        assert float(res.returns[0]) == pytest.approx(total, rel=1e-5)
        np.testing.assert_allclose(torch.cat(zs).numpy(), np.stack(env_zs), rtol=1e-5, atol=1e-6)
        lengths.append(steps)
    assert min(lengths) > 10  # long enough to compare many steps


def test_a_policy_acts_instead_of_the_controllers_as_in_dream_env():
    """``policy`` (the blind pacer of agents/policies.py) drives the batched dream as DreamEnv does."""
    from agents.policies import PacingPolicy

    m = tiny_mdnrnn(done_bias=0.2)
    with torch.no_grad():
        m.head.weight[-1].zero_()
        m.head.weight[-1, 0] = 2.0  # P(done) follows h[0], which the actions move
    settings = DreamSettings(temperature=1.2, max_steps=40, done_threshold=0.7)
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    pacer, starts, seen = PacingPolicy(3), starts_for(4), []

    def pace(t, features):
        seen.append(features.shape)
        return features.new_full((features.shape[0], 1), pacer.action_at(t))

    for seed in (2, 3):
        env = DreamEnv(m, starts, "takecover", settings)
        env.reset(seed=seed)
        pacer.reset()
        steps, terminated = 0, False
        while True:
            _, _, terminated, truncated, _ = env.step(pacer.act(None))
            steps += 1
            if terminated or truncated:
                break
        gen = torch.Generator().manual_seed(seed)
        seen.clear()
        res = dream_rollouts(m, torch.zeros(1, 0), spec, sample_start_z(starts, 1, gen), settings, gen, policy=pace)
        assert (int(res.lengths[0]), bool(res.terminated[0])) == (steps, terminated)
        assert seen == [(1, m.feature_dim("zh"))] * steps
        assert 3 < steps < 40  # the pacer's turns happen inside the dream


def test_common_random_numbers_across_candidates():
    """Rollout j of a candidate does not depend on which other candidates share the batch."""
    m = tiny_mdnrnn()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1, spec.num_params, generator=g) for _ in range(3))
    settings = DreamSettings(max_steps=60, done="sample")
    streams = torch.tensor([0, 1, 2, 0, 1, 2])

    def run(first, second):
        gen = torch.Generator().manual_seed(7)
        z0 = sample_start_z(starts_for(4), 3, gen).repeat(2, 1)
        params = torch.cat([first.expand(3, -1), second.expand(3, -1)])
        return dream_rollouts(m, params, spec, z0, settings, gen, streams)

    ab, ac, aa = run(a, b), run(a, c), run(a, a)
    assert ab.lengths[:3].tolist() == ac.lengths[:3].tolist()
    torch.testing.assert_close(ab.returns[:3], ac.returns[:3])
    assert aa.lengths[:3].tolist() == aa.lengths[3:].tolist()
    assert len(set(ab.lengths.tolist())) > 1  # the test is not vacuous: dreams end at different steps


def test_dream_dropout_is_one_mask_per_stream_for_the_whole_dream(monkeypatch):
    """Every dream runs in its stream's thinned M from start to end; candidates share the masks."""
    m = tiny_mdnrnn()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    params = torch.randn(1, spec.num_params, generator=torch.Generator().manual_seed(0)).expand(6, -1)
    streams = torch.tensor([0, 1, 2, 0, 1, 2])
    masks_seen = []

    def step(state, z, a, tau, generator=None, noise=None, dropout=None):
        masks_seen.append(dropout.clone())
        return MDNRNN.imagine_step(m, state, z, a, tau, generator, noise, dropout)

    def run(dropout, record=False):
        gen = torch.Generator().manual_seed(7)
        z0 = sample_start_z(starts_for(4), 3, gen).repeat(2, 1)
        with monkeypatch.context() as patch:
            if record:
                patch.setattr(m, "imagine_step", step)
            return dream_rollouts(m, params, spec, z0, DreamSettings(max_steps=60, done="sample", dropout=dropout),
                                  gen, streams)

    plain, thinned = run(0.0), run(0.5, record=True)
    first = masks_seen[0]
    assert first.shape == (6, 4 + 8)
    assert set(first.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - 0.5)
    torch.testing.assert_close(first[:3], first[3:])  # one mask per stream
    assert not torch.equal(first[0], first[1])
    # Each live dream keeps its mask: the rows of every later step are rows of the first.
    for later in masks_seen[1:]:
        assert all(any(torch.equal(row, f) for f in first) for row in later)
    assert thinned.lengths[:3].tolist() == thinned.lengths[3:].tolist()  # common random numbers hold
    assert thinned.lengths.tolist() != plain.lengths.tolist()


def test_dream_dropout_on_an_m_without_it_is_a_user_error():
    m = FakeM()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    with pytest.raises(UserError, match="cmaes.dream_dropout"):
        dream_rollouts(m, torch.zeros(2, spec.num_params), spec, torch.zeros(2, 3), DreamSettings(dropout=0.1))


@pytest.mark.parametrize("env_name", ["takecover", "carracing"])
def test_dream_env_passes_check_env(env_name):
    torch.manual_seed(0)
    m = MDNRNN(4, 1 if env_name == "takecover" else 3, 8, 3).eval()
    env = DreamEnv(m, starts_for(4), env_name, DreamSettings(max_steps=20), vae=ConvVAE(4),
                   render_mode="rgb_array")
    check_env(env)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert DreamEnv(m, starts_for(4), env_name).render() is None


def test_start_latents_and_make_dream_env_from_run(tmp_path):
    from worldmodel.train_m import save_m

    cfg = config_lib.Config()
    cfg.vae.z_dim, cfg.model.hidden, cfg.model.mixtures, cfg.cmaes.max_steps = 4, 8, 3, 9
    (tmp_path / "config.yaml").write_text(config_lib.dump(cfg))
    latents = tmp_path / "latents"
    latents.mkdir()
    mus = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
    for i, mu in enumerate(mus):
        np.savez(latents / f"ep_{i:06d}.npz", mu=mu, logvar=np.full_like(mu, -30.0),
                 action=np.zeros((5, 1), np.float32), reward=np.ones(5, np.float32),
                 done=np.zeros(5, bool), terminated=np.zeros(5, bool))
    starts = load_start_latents(tmp_path)
    assert starts.shape == (3, 2, 4)
    np.testing.assert_array_equal(starts[:, 0].numpy(), mus[:, 0])
    z = sample_start_z(starts, 10, torch.Generator().manual_seed(0))  # σ ≈ 0: z is some episode's mu
    assert all(any(np.allclose(row, mu0, atol=1e-5) for mu0 in mus[:, 0]) for row in z.numpy())

    save_m(tmp_path / "m.pt", tiny_mdnrnn(), config_lib.to_dict(cfg)["model"])
    env = make_dream_env(tmp_path, temperature=0.5)
    assert env.settings.temperature == 0.5 and env.settings.max_steps == 9
    obs, _ = env.reset(seed=1)
    assert obs.shape == (12,) and env.render() is None  # no vae.pt in this run
    for _ in range(9):
        obs, r, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            break
    assert term or trunc


def test_action_noise_is_drawn_per_stream_after_m_noise_and_clipped():
    m = FakeM(short=100, long=100)  # nothing ends early: reward = the noisy, clipped a_0
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    params = bias_params(spec, [0.5, 0.5, 2.0, 0.5])
    streams = torch.tensor([0, 0, 1, 1])
    settings = DreamSettings(max_steps=6, reward="model", done_threshold=0.5, action_noise=0.7)
    res = dream_rollouts(m, params, spec, torch.zeros(4, 3), settings, torch.Generator().manual_seed(5), streams)
    g = torch.Generator().manual_seed(5)
    expected = torch.zeros(4)
    for _ in range(6):
        torch.randn(2, 3, generator=g)  # M's noise for the 2 streams, then the action noise
        eps = torch.randn(2, 1, generator=g)[streams, 0]
        expected += torch.clamp(torch.tanh(torch.tensor([0.5, 0.5, 2.0, 0.5])) + 0.7 * eps, -1.0, 1.0)
    torch.testing.assert_close(res.returns, expected)
    assert res.returns[0] == res.returns[1] and res.returns[1] != res.returns[3]  # common random numbers
    quiet = dream_rollouts(m, params, spec, torch.zeros(4, 3), replace(settings, action_noise=0.0),
                           torch.Generator().manual_seed(5), streams)
    torch.testing.assert_close(quiet.returns, 6 * torch.tanh(torch.tensor([0.5, 0.5, 2.0, 0.5])))


# ----------------------------------------------------------------- dreams that start inside real episodes

def latents_of(lengths: list[int], z_dim: int = 4, seed: int = 0) -> Latents:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return Latents(rng.standard_normal((n, z_dim), dtype=np.float32), np.full((n, z_dim), -40.0, np.float32),
                   rng.uniform(-1, 1, (n, 1)).astype(np.float32), np.zeros(n, np.float32),
                   np.zeros(n, bool), starts, lengths, [])


def test_midway_points_are_uniform_over_game_time_and_inside_living_episodes():
    lengths = np.array([10, 400, 30, 1000])
    episodes, t0 = pick_midway_points(lengths, 4000, np.random.default_rng(0))
    assert (t0 >= 1).all() and (t0 <= 998).all() and (np.diff(t0) <= 0).all()  # sorted, longest first
    assert (lengths[episodes] >= t0 + 2).all()  # the episode was alive at t0 and one step more
    assert (episodes[t0 > 398] == 3).all()  # only the longest episode reaches the late game
    assert abs(np.mean(t0 > 499) - 0.5) < 0.05  # half the starts in the second half of the game
    assert set(episodes[t0 < 8].tolist()) == {0, 1, 2, 3}
    again = pick_midway_points(lengths, 4000, np.random.default_rng(0))
    np.testing.assert_array_equal(again[0], episodes)
    with pytest.raises(UserError, match="cmaes.midway_starts"):
        pick_midway_points(np.array([2, 1]), 5, np.random.default_rng(0))


def test_midway_state_is_m_filtered_over_the_real_steps_before_t0():
    m = tiny_mdnrnn()
    data = latents_of([12, 40, 25])  # logvar -40: z is mu, so the filter can be replayed exactly
    pool = midway_starts(m, data, 16, np.random.default_rng(3))
    episodes, t0 = pick_midway_points(data.lengths, 16, np.random.default_rng(3))
    np.testing.assert_array_equal(pool.elapsed.numpy(), t0)
    for k in range(16):
        row = data.starts[episodes[k]]
        state = m.initial_state(1)
        for t in range(t0[k]):
            state = m.observe(state, torch.from_numpy(data.mu[row + t][None]),
                              torch.from_numpy(data.action[row + t][None]))
        for got, want in zip(pool.state, state):
            torch.testing.assert_close(got[k:k + 1], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(pool.latents[k, 0].numpy(), data.mu[row + t0[k]])


def test_a_dream_that_starts_at_t0_lasts_at_most_max_steps_minus_t0():
    m = FakeM(short=3, long=50)
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    params = bias_params(spec, [1.0, 1.0, -1.0, 1.0])  # long, long, short, long
    state0 = (torch.zeros(4, 2), torch.tensor([[0.0], [0.0], [0.0], [45.0]]))  # the last dream's M is 45 steps in
    res = dream_rollouts(m, params, spec, torch.zeros(4, 3), DreamSettings(max_steps=20),
                         torch.Generator().manual_seed(0), state0=state0, elapsed=torch.tensor([0, 16, 8, 5]))
    assert res.lengths.tolist() == [20, 4, 3, 5]  # cap, cap 20 - 16, died, M's clock ends it at 50
    assert res.terminated.tolist() == [False, False, True, True]
    assert res.returns.tolist() == [20.0, 4.0, 3.0, 5.0]
