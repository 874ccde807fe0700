"""CMA-ES in the dream: it learns, it checkpoints every generation, a rerun resumes exactly."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from agents.cmaes import STATE_FILE, dream_fitness, load_state, train_controller, weights_fingerprint
from agents.controller import load_controller
from worldmodel import config as config_lib
from worldmodel.errors import UserError
from worldmodel.m import WorldModel
from worldmodel.runs import Run


class LifeM(WorldModel):
    """Toy M whose dream lasts longer the larger the action: it ends once t >= 2 + 18 (a_0 + 1) / 2.

    State (t (B, 1),); z drifts with the noise, so the controller sees changing features.
    """

    z_dim, action_dim = 3, 1

    @classmethod
    def from_config(cls, cfg, z_dim, action_dim):
        return cls()

    def initial_state(self, batch_size):
        return (torch.zeros(batch_size, 1),)

    def feature_dim(self, mode):
        return self.z_dim

    def features(self, state, z, mode):
        return z

    def observe(self, state, z, action):
        return (state[0] + 1,)

    def sample_noise(self, n, generator):
        return (torch.randn(n, self.z_dim, generator=generator),)

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        (t,) = self.observe(state, z, action)
        life = 2 + 18 * (action[:, 0] + 1) / 2
        done = (t[:, 0] >= life).float()
        return (t,), 0.8 * z + 0.3 * noise[0], torch.zeros(z.shape[0]), done

    def loss(self, batch):
        raise NotImplementedError


STARTS = torch.stack([torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.full((4, 3), -1.0)], 1)


def make_run(path, generations=2, population=6, eval_every=0) -> Run:
    cfg = config_lib.Config()
    cfg.system.device = "cpu"
    c = cfg.cmaes
    c.population, c.rollouts, c.generations, c.sigma0 = population, 3, generations, 0.5
    c.max_steps, c.eval_every, c.eval_episodes = 25, eval_every, 2
    return Run(dir=path, cfg=config_lib.from_flat(config_lib.to_flat(cfg)))


def train(run, **kw):
    return train_controller(run, progress=False, m=LifeM(), starts=STARTS, **kw)


def test_cmaes_improves_dream_fitness(tmp_path):
    summary = train(make_run(tmp_path, generations=8, population=8))
    history = [json.loads(line) for line in (tmp_path / "metrics" / "dream.jsonl").read_text().splitlines()]
    assert [h["generation"] for h in history] == list(range(1, 9))
    assert history[0]["dream_mean"] < 12  # a ~ 0 at the start: about 11 steps
    assert history[-1]["dream_mean"] > history[0]["dream_mean"] + 4
    assert summary["best_dream_score"] > 17 and summary["controller_source"] == "dream"
    params, meta = load_controller(tmp_path / "controller.pt", expected_params=4)
    assert meta["source"] == "dream" and params.shape == (4,)
    assert (tmp_path / "plots" / "dream.png").stat().st_size > 1000  # plots.py's, the one dream plot
    assert not (tmp_path / "plots" / "dream_curve.png").exists()


def test_controller_picked_by_real_score(tmp_path):
    calls, plotted = [], []

    def evaluate_fn(params, episodes, seed):
        calls.append((params.copy(), episodes, seed))
        plotted.append((tmp_path / "plots" / "dream.png").exists())
        return [100.0 - len(calls)] * episodes  # the first check scores best

    summary = train(make_run(tmp_path, generations=5, eval_every=2), evaluate_fn=evaluate_fn)
    history = [json.loads(line) for line in (tmp_path / "metrics" / "dream.jsonl").read_text().splitlines()]
    assert [h["generation"] for h in history if h["real_mean"] is not None] == [2, 4, 5]  # and the last
    assert len(calls) == 3 and all(e == 2 for _, e, _ in calls)
    assert plotted == [False, True, True]  # the dream plot is redrawn after each real check
    assert summary["controller_source"] == "real" and summary["best_real_generation"] == 2
    params, meta = load_controller(tmp_path / "controller.pt")
    np.testing.assert_allclose(params, calls[0][0], rtol=1e-6)
    assert meta["source"] == "real" and meta["real_score"] == 99.0
    _, dream_meta = load_controller(tmp_path / "controller_dream.pt")
    assert dream_meta["source"] == "dream"


def _comparable(state):
    es = state["es"]
    history = [{k: v for k, v in h.items() if k not in ("wall_s", "time", "dream_steps_per_s")}
               for h in state["history"]]
    return es.mean.copy(), es.sigma, es.C.copy(), history


def test_killed_dream_resumes_with_the_same_cmaes_state(tmp_path):
    straight = train(make_run(tmp_path / "a", generations=4))
    assert straight["resumed_from"] == 0

    train(make_run(tmp_path / "b", generations=2))  # "killed" after generation 2
    mid = load_state(tmp_path / "b" / STATE_FILE)
    assert mid["generation"] == 2 and mid["es"].countiter == 2
    resumed = train(make_run(tmp_path / "b", generations=4))
    assert resumed["resumed_from"] == 2 and resumed["generations"] == 4

    a, b = (_comparable(load_state(tmp_path / d / STATE_FILE)) for d in ("a", "b"))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    assert a[3] == b[3]
    lines = (tmp_path / "b" / "metrics" / "dream.jsonl").read_text().splitlines()
    assert [json.loads(x)["generation"] for x in lines] == [1, 2, 3, 4]
    # Already done: a rerun does nothing more.
    assert train(make_run(tmp_path / "b", generations=4))["resumed_from"] == 4


def test_dreams_that_start_midway_resume_exactly_and_start_in_m_s_filtered_state(tmp_path):
    from worldmodel.latents import Latents

    lengths = np.array([30, 8, 40])
    n = int(lengths.sum())
    data = Latents(np.zeros((n, 3), np.float32), np.full((n, 3), -1.0, np.float32), np.zeros((n, 1), np.float32),
                   np.zeros(n, np.float32), np.zeros(n, bool), np.array([0, 30, 38]), lengths, [])

    def run_with(path, generations, midway):
        run = make_run(path, generations=generations, population=6)
        run.cfg.cmaes.rollouts, run.cfg.cmaes.midway_starts = 4, midway
        return train(run, data=data)

    run_with(tmp_path / "a", 4, 0.5)
    run_with(tmp_path / "b", 2, 0.5)
    assert run_with(tmp_path / "b", 4, 0.5)["resumed_from"] == 2
    a, b = (_comparable(load_state(tmp_path / d / STATE_FILE)) for d in ("a", "b"))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[3] == b[3]
    # LifeM's state is its step count: half the dreams start 1-37 steps in, so they end sooner.
    run_with(tmp_path / "c", 4, 0.0)
    midway, plain = (load_state(tmp_path / d / STATE_FILE)["history"] for d in ("a", "c"))
    assert midway[0]["mean_length"] < plain[0]["mean_length"] - 2


def test_resume_refuses_other_population_and_pretrained(tmp_path):
    train(make_run(tmp_path / "r", generations=1))
    with pytest.raises(UserError, match="population"):
        train(make_run(tmp_path / "r", generations=2, population=8))
    bad = tmp_path / "pretrained" / "run"
    bad.mkdir(parents=True)
    (bad / STATE_FILE).write_bytes(pickle.dumps({"version": 1}))
    with pytest.raises(UserError, match="pretrained"):
        train(make_run(bad, generations=2))
    (tmp_path / "r" / STATE_FILE).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read"):
        train(make_run(tmp_path / "r", generations=2))


class CarLifeM(LifeM):
    action_dim = 3


def test_resume_refuses_another_brake(tmp_path):
    run = make_run(tmp_path / "r", generations=1)
    run.cfg.env.name = "carracing"
    train_controller(run, progress=False, m=CarLifeM(), starts=STARTS)
    assert load_state(run.path(STATE_FILE))["brake"] == "clip"
    run.cfg.controller.brake, run.cfg.cmaes.generations = "shift", 2
    with pytest.raises(UserError, match="was started with brake clip, now shift"):
        train_controller(run, progress=False, m=CarLifeM(), starts=STARTS)
    state = pickle.loads(run.path(STATE_FILE).read_bytes())  # a search from before the key: shift
    del state["brake"]
    run.path(STATE_FILE).write_bytes(pickle.dumps(state))
    assert train_controller(run, progress=False, m=CarLifeM(), starts=STARTS)["generations"] == 2


def test_train_controller_loads_m_and_latents_from_the_run(tmp_path):
    from worldmodel.mdnrnn import MDNRNN
    from worldmodel.train_m import save_m

    run = make_run(tmp_path, generations=2, population=4)
    cfg = run.cfg
    cfg.vae.z_dim, cfg.model.hidden, cfg.model.mixtures = 4, 8, 3
    torch.manual_seed(0)
    save_m(run.m_path, MDNRNN(4, 1, 8, 3), config_lib.to_dict(cfg)["model"])
    run.latents_dir.mkdir()
    for i in range(3):
        mu = np.random.default_rng(i).normal(size=(6, 4)).astype(np.float32)
        np.savez(run.latents_dir / f"ep_{i:06d}.npz", mu=mu, logvar=np.zeros_like(mu))
    summary = train_controller(run, progress=False)
    assert summary["generations"] == 2 and summary["num_params"] == (4 + 8) + 1
    load_controller(run.controller_path, expected_params=13)

    # Dreams inside real episodes need the whole episodes: a latent file without actions is named.
    cfg.cmaes.midway_starts, cfg.cmaes.generations = 0.5, 3
    with pytest.raises(UserError, match="ep_000000.npz: latent file lacks action"):
        train_controller(run, progress=False)
    for i in range(3):
        mu = np.random.default_rng(i).normal(size=(6, 4)).astype(np.float32)
        np.savez(run.latents_dir / f"ep_{i:06d}.npz", mu=mu, logvar=np.zeros_like(mu),
                 action=np.zeros((6, 1), np.float32), reward=np.zeros(6, np.float32),
                 done=np.zeros(6, bool), terminated=np.zeros(6, bool))
    assert train_controller(run, progress=False)["generations"] == 3

    cfg.env.name = "carracing"  # its dream reward comes from M, which here has no reward head
    cfg.model.predict_reward = False
    with pytest.raises(UserError, match="predict_reward"):
        train_controller(Run(dir=tmp_path / "cr", cfg=cfg), progress=False,
                         m=MDNRNN(4, 3, 8, 3, predict_reward=False), starts=torch.zeros(2, 2, 4))


class TaggedLifeM(LifeM):
    """LifeM with one weight, so that two of them are two different M's to weights_fingerprint."""

    def __init__(self, tag: float):
        super().__init__()
        self.tag = torch.nn.Parameter(torch.tensor([tag]))


def test_weights_fingerprint_follows_the_weights_only():
    a, b = TaggedLifeM(1.0), TaggedLifeM(1.0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.tag += 1e-6
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_a_retrained_m_starts_the_best_real_check_afresh(tmp_path):
    # C reads M's features, so a check played with an earlier M says little of C with the new one.
    scores = iter([90.0, 80.0, 70.0, 60.0])

    def evaluate_fn(params, episodes, seed):
        return [next(scores)] * episodes

    old, new = TaggedLifeM(1.0), TaggedLifeM(2.0)
    train_controller(make_run(tmp_path, generations=2, eval_every=1), progress=False, m=old, starts=STARTS,
                     evaluate_fn=evaluate_fn)
    summary = train_controller(make_run(tmp_path, generations=4, eval_every=1), progress=False, m=new,
                               starts=STARTS, evaluate_fn=evaluate_fn)
    assert summary["best_real_generation"] == 3 and summary["best_real_score"] == 70.0
    checks = load_state(tmp_path / STATE_FILE)["checks"]
    assert [ch["m"] for ch in checks] == [weights_fingerprint(old)] * 2 + [weights_fingerprint(new)] * 2
    params, meta = load_controller(tmp_path / "controller.pt")
    assert meta["generation"] == 3
    np.testing.assert_array_equal(params, checks[2]["params"])


def test_dream_workers_rule():
    from agents.dream_workers import MIN_DREAMS_PER_WORKER, dream_workers

    cpu = torch.device("cpu")
    assert dream_workers(3, 10, cpu) == 3  # cmaes.workers as given
    assert dream_workers(None, MIN_DREAMS_PER_WORKER - 1, cpu) == 1  # too few dreams to split
    assert 1 <= dream_workers(None, 100 * MIN_DREAMS_PER_WORKER, cpu) <= torch.multiprocessing.cpu_count()
    assert dream_workers(4, 10_000, torch.device("cuda")) == 1  # a GPU dreams the whole batch


def _random_mdnrnn():
    """An MDN-RNN whose dreams end at different steps: P(done) about 0.1 a step, moved by z and h."""
    from worldmodel.mdnrnn import MDNRNN

    torch.manual_seed(0)
    m = MDNRNN(3, 1, 16, 3)
    with torch.no_grad():
        m.head.bias[-1] = -2.5
    return m.eval()


def test_a_dream_worker_dreams_its_share_as_one_thread_here_would():
    """The pool's fitness is each share's fitness from :func:`dream_fitness` in one thread,
    from the generation's seed, candidates in order (midway starts included)."""
    from agents.controller import ControllerSpec
    from agents.dream_workers import DreamPool
    from envs.dream import DreamSettings, midway_starts

    m, data = _random_mdnrnn(), _latents_with_actions(5, 12, 3)
    cfg = make_run(None).cfg
    cfg.cmaes.done = "sample"
    settings, spec = DreamSettings.from_config(cfg), ControllerSpec.for_config(cfg, m)
    midway = midway_starts(m, data, 8, np.random.default_rng(0))
    candidates = np.random.default_rng(1).normal(0, 0.5, size=(7, spec.num_params))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shares = [dream_fitness(m, share, spec, settings, STARTS, 4, torch.Generator().manual_seed(seed), midway, 2)
                  for seed in (11, 12) for share in (candidates[:4], candidates[4:])]
    finally:
        torch.set_num_threads(threads)
    with DreamPool(2, m, spec, STARTS, midway, 2, 60.0) as pool:
        split = [pool.fitness(candidates, settings, 4, seed) for seed in (11, 12)]
    for k, (fitness, mean_length, steps) in enumerate(split):
        (a, la, sa), (b, lb, sb) = shares[2 * k], shares[2 * k + 1]
        np.testing.assert_array_equal(fitness, np.concatenate([a, b]))
        assert steps == sa + sb and mean_length == pytest.approx((la * 16 + lb * 12) / 28)
        assert 1 < mean_length < 25  # dreams ended at many steps
    assert not np.array_equal(split[0][0], split[1][0])  # each generation its own noise


def test_a_search_dreamt_by_worker_processes_resumes_exactly(tmp_path):
    m = _random_mdnrnn()

    def search(d, generations):
        run = make_run(tmp_path / d, generations=generations, population=7)
        run.cfg.cmaes.workers, run.cfg.cmaes.done = 2, "sample"
        train_controller(run, progress=False, m=m, starts=STARTS)
        return load_state(tmp_path / d / STATE_FILE)

    straight = search("a", 3)
    search("b", 2)  # "killed" after generation 2
    resumed = search("b", 3)
    assert [h["dream_workers"] for h in straight["history"]] == [2, 2, 2]
    a, b = _comparable(straight), _comparable(resumed)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    assert a[1] == b[1] and a[3] == b[3]
    assert a[3][-1]["dream_mean"] != a[3][0]["dream_mean"]


def _latents_with_actions(episodes: int, length: int, z_dim: int):
    """Real-looking episodes for midway starts: random z and actions, ``length`` steps each."""
    from worldmodel.latents import Latents

    rng = np.random.default_rng(0)
    n = episodes * length
    return Latents(rng.normal(size=(n, z_dim)).astype(np.float32), np.full((n, z_dim), -2.0, np.float32),
                   rng.uniform(-1, 1, size=(n, 1)).astype(np.float32), np.zeros(n, np.float32), np.zeros(n, bool),
                   np.arange(episodes) * length, np.full(episodes, length), [])
