"""The belief-state model with overshooting: target alignment and masks, its objective against a
position-by-position computation, the one-step case, the dream, noise, save -> load and train-rnn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SMOKE, linear_world_batch
from gymnasium.utils.env_checker import check_env
from torch.distributions import Categorical, MixtureSameFamily, Normal

from agents.controller import ControllerSpec
from envs.dream import DreamEnv, DreamSettings, dream_rollouts, sample_start_z
from worldmodel import config as config_lib
from worldmodel.belief import BeliefModel, overshoot_targets
from worldmodel.errors import UserError
from worldmodel.io import read_jsonl, save_checkpoint
from worldmodel.m import build_m
from worldmodel.runs import open_run
from worldmodel.train_m import load_m, save_m

Z, A, H, S, MIX = 4, 2, 12, 6, 3


def _model(overshoot: int = 3, seed: int = 0, **kw) -> BeliefModel:
    torch.manual_seed(seed)
    kw = {"predict_reward": True, "done_pos_weight": 4.0, **kw}
    return BeliefModel(Z, A, H, MIX, sim_hidden=S, overshoot=overshoot, **kw)


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Four windows of 7 steps: full; ends in a death at 4; 1 step, a death; 3 steps, truncated."""
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 7
    lengths = torch.tensor([7, 5, 1, 3])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    terminated = torch.zeros(b, t, dtype=torch.bool)
    terminated[1, 4] = terminated[2, 0] = True
    return {"z": torch.randn(b, t, Z, generator=g), "action": torch.rand(b, t, A, generator=g) * 2 - 1,
            "reward": torch.randn(b, t, generator=g), "terminated": terminated, "mask": mask}


def _live(mask: torch.Tensor, term: torch.Tensor, b: int, t: int, j: int) -> bool:
    """Is step t+j in the episode of step t?  Written out: mask at t..t+j, no death at t..t+j-1."""
    steps = mask.shape[1]
    return (t + j < steps and all(bool(mask[b, i]) for i in range(t, t + j + 1))
            and not any(bool(term[b, i]) for i in range(t, t + j)))


def test_overshoot_targets_align_with_future_steps_and_mask_ends_and_deaths():
    b, t, k_max = 3, 8, 3
    steps = torch.arange(t, dtype=torch.float32)
    z = (steps[None, :, None] + 100 * torch.arange(b)[:, None, None]).expand(b, t, Z).clone()  # z_t says t
    mask = torch.ones(b, t, dtype=torch.bool)
    term = torch.zeros(b, t, dtype=torch.bool)
    mask[1, 5:] = False
    term[1, 4] = True  # row 1 dies at step 4, the episode's last
    term[2, 3] = True  # row 2: a death at 3 with steps after it: the death alone must cut targets
    batch = {"z": z, "action": steps[None, :, None].expand(b, t, A).clone(), "reward": 10 + steps.expand(b, t),
             "terminated": term, "mask": mask}
    targets = overshoot_targets(batch, k_max)
    assert len(targets) == k_max
    for k, tgt in enumerate(targets, start=1):
        for r in range(b):
            for i in range(t):
                assert bool(tgt["z_mask"][r, i]) == _live(mask, term, r, i, k), (k, r, i)
                assert bool(tgt["rd_mask"][r, i]) == _live(mask, term, r, i, k - 1), (k, r, i)
                if tgt["z_mask"][r, i]:
                    assert tgt["z"][r, i, 0] == 100 * r + i + k  # z_{t+k}
                if tgt["rd_mask"][r, i]:
                    assert tgt["reward"][r, i] == 10 + i + k - 1  # r_{t+k} sits at step t+k-1
                    assert bool(tgt["done"][r, i]) == bool(term[r, i + k - 1])
                    assert tgt["action"][r, i, 0] == i + k - 1  # a_{t+k-1}
    # The cases spelled out: the death at 4 is a done target but nothing after it is a z target.
    assert targets[0]["z_mask"][1, 3] and not targets[1]["z_mask"][1, 3]
    assert targets[1]["rd_mask"][1, 3] and targets[1]["done"][1, 3]
    assert not targets[1]["z_mask"][2, 2] and targets[1]["z_mask"][2, 4]
    assert not targets[0]["z_mask"][0, t - 1] and targets[0]["rd_mask"][0, t - 1]  # beyond the window
    assert int(targets[2]["z_mask"][0].sum()) == t - 3


def _mixture_nll(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return -MixtureSameFamily(Categorical(logits=p["logits"]), Normal(p["mu"], p["log_sigma"].exp())).log_prob(x)


@pytest.mark.parametrize("overshoot", [1, 3])
def test_loss_matches_position_by_position_rollout(overshoot):
    """Each position's core run step by step, masks from :func:`_live`, the objective written out."""
    rw, dw, ow = 0.5, 2.0, 0.3
    m, batch = _model(overshoot, reward_weight=rw, done_weight=dw, overshoot_weight=ow), _batch()
    terms = m.loss(batch)
    z, a, mask, term = batch["z"], batch["action"], batch["mask"], batch["terminated"]
    b, t = mask.shape
    with torch.no_grad():
        state, beliefs = m.initial_state(b), []
        for i in range(t):
            state = m.observe(state, z[:, i], a[:, i])
            beliefs.append(state[0])
        sums = {name: [0.0] * overshoot for name in ("z", "r", "d")}
        counts = {name: [0] * overshoot for name in ("z", "rd")}
        for r in range(b):
            for i in range(t):
                s = torch.tanh(m.sim_init(beliefs[i][r]))
                for k in range(1, overshoot + 1):
                    if k > 1 and i + k - 1 < t:
                        s = m.sim(a[r, i + k - 1][None], s[None])[0]
                    p = m.heads(s)
                    if _live(mask, term, r, i, k):
                        sums["z"][k - 1] += _mixture_nll(p, z[r, i + k]).mean().item()
                        counts["z"][k - 1] += 1
                    if _live(mask, term, r, i, k - 1):
                        y, q = float(term[r, i + k - 1]), torch.sigmoid(p["done_logit"]).item()
                        sums["d"][k - 1] += -(4.0 * y * math.log(q) + (1 - y) * math.log(1 - q))
                        sums["r"][k - 1] += (p["reward"].item() - batch["reward"][r, i + k - 1].item()) ** 2
                        counts["rd"][k - 1] += 1
    z_nll = [s / max(c, 1) for s, c in zip(sums["z"], counts["z"])]
    reward = [s / c for s, c in zip(sums["r"], counts["rd"])]
    done = [s / c for s, c in zip(sums["d"], counts["rd"])]
    assert counts["z"][-1] > 0  # the K-step term is not vacuous
    want = {"z_nll": z_nll[0], "z_nll_1": z_nll[0], f"z_nll_{overshoot}": z_nll[-1], "reward": reward[0],
            "done": done[0], "overshoot_nll": sum(z_nll[1:]), "overshoot_reward": sum(reward[1:]),
            "overshoot_done": sum(done[1:]),
            "loss": sum((1.0 if k == 0 else ow) * (z_nll[k] + rw * reward[k] + dw * done[k])
                        for k in range(overshoot))}
    assert set(terms) == set(want)
    for key, value in want.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_overshoot_one_is_a_one_step_model():
    """K = 1: the core never steps (no gradient reaches it) and the one-step terms are those of K = 3."""
    one, three = _model(overshoot=1), _model(overshoot=3)
    three.load_state_dict(one.state_dict())
    batch = _batch()
    t1, t3 = one.loss(batch), three.loss(batch)
    for key in ("z_nll", "reward", "done"):
        torch.testing.assert_close(t1[key], t3[key])
    assert t1["overshoot_nll"].item() == t1["overshoot_done"].item() == 0.0
    torch.testing.assert_close(t1["loss"], t1["z_nll"] + t1["reward"] + t1["done"])
    assert t3["loss"].item() > t1["loss"].item() + 1.0
    t1["loss"].backward()
    assert all(p.grad is None for p in one.sim.parameters())
    assert one.sim_init.weight.grad.abs().sum() > 0
    t3["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in three.sim.parameters())


def test_values_past_mask_do_not_affect_loss():
    m, batch = _model(), _batch()
    before = m.loss(batch)
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["mask"]
    noisy["z"][pad], noisy["action"][pad], noisy["reward"][pad], noisy["terminated"][pad] = 50.0, -9.0, 7.0, True
    after = m.loss(noisy)
    for key in before:
        torch.testing.assert_close(after[key], before[key])


def test_imagine_step_filters_then_predicts_one_step_with_calibrated_done():
    m, batch = _model(), _batch()
    b_h, _ = m.belief(torch.cat([batch["z"], batch["action"]], -1))
    state = m.initial_state(4)
    for i in range(4):
        state, z_next, reward, done = m.imagine_step(state, batch["z"][:, i], batch["action"][:, i], 0.0)
        torch.testing.assert_close(state[0], b_h[:, i])
        p = m.heads(torch.tanh(m.sim_init(b_h[:, i])))
        most_likely = p["mu"].gather(-1, p["logits"].argmax(-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(z_next, most_likely)
        torch.testing.assert_close(reward, p["reward"])
        torch.testing.assert_close(done, torch.sigmoid(p["done_logit"] - math.log(4.0)))
    again = m.observe(m.initial_state(4), batch["z"][:, 0], batch["action"][:, 0])
    torch.testing.assert_close(again[0], b_h[:, 0])


def test_features_show_the_belief():
    m = _model()
    state, z = (torch.randn(5, H), torch.randn(5, H)), torch.randn(5, Z)
    assert m.feature_dim("zh") == Z + H and m.feature_dim("zch") == Z + 2 * H
    torch.testing.assert_close(m.features(state, z, "zh"), torch.cat([z, state[0]], 1))
    torch.testing.assert_close(m.features(state, z, "zch"), torch.cat([z, state[1], state[0]], 1))
    with pytest.raises(ValueError):
        m.features(state, z, "hz")


def test_same_noise_gives_same_step_row_by_row():
    m, batch = _model(), _batch()
    state = (torch.randn(4, H), torch.randn(4, H))
    z, a = batch["z"][:, 0], batch["action"][:, 0]
    noise = m.sample_noise(4, torch.Generator().manual_seed(3))
    assert [tuple(x.shape) for x in noise] == [(4, MIX, Z), (4, Z)]
    first = m.imagine_step(state, z, a, 1.15, noise=noise)
    again = m.imagine_step(state, z, a, 1.15, noise=noise)
    for x, y in zip([*first[0], *first[1:]], [*again[0], *again[1:]]):
        assert torch.equal(x, y)
    drawn = m.imagine_step(state, z, a, 1.15, torch.Generator().manual_seed(3))[1]  # the same draws
    torch.testing.assert_close(drawn, first[1])
    rows = torch.tensor([2, 0, 3, 1])
    shuffled = m.imagine_step((state[0][rows], state[1][rows]), z[rows], a[rows], 1.15,
                              noise=tuple(x[rows] for x in noise))[1]
    torch.testing.assert_close(shuffled, first[1][rows])
    assert not torch.allclose(m.imagine_step(state, z, a, 1.15, noise=m.sample_noise(4, None))[1], first[1])


def _cfg(**model) -> config_lib.Config:
    cfg = config_lib.Config()
    cfg.vae.z_dim = Z
    cfg.model.m, cfg.model.hidden, cfg.model.mixtures, cfg.model.overshoot = "belief", H, MIX, 3
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_dream_rollouts_run_on_the_belief_with_common_random_numbers():
    m = build_m(_cfg(sim_hidden=None), Z, 1).eval()
    assert isinstance(m, BeliefModel) and m.sim_hidden == H // 2
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    settings = DreamSettings(max_steps=30, done="sample", temperature=1.15)
    starts = torch.stack([torch.randn(3, Z, generator=torch.Generator().manual_seed(0)),
                          torch.full((3, Z), -2.0)], 1)

    def run(params: torch.Tensor):
        gen = torch.Generator().manual_seed(7)
        z0 = sample_start_z(starts, 2, gen).repeat(3, 1)
        return dream_rollouts(m, params, spec, z0, settings, gen, torch.tensor([0, 1] * 3))

    params = torch.randn(6, spec.num_params, generator=torch.Generator().manual_seed(1))
    res = run(params)
    assert res.lengths.shape == (6,) and bool(((res.lengths >= 1) & (res.lengths <= 30)).all())
    torch.testing.assert_close(res.returns, res.lengths.float())
    assert bool(res.terminated.any())  # P(done) ≈ 0.1 a step: some dreams end before the cap
    again = run(params)
    assert torch.equal(again.lengths, res.lengths)
    same = run(params[:1].expand(6, -1))  # one controller: its rollouts on stream 0 (or 1) agree
    assert same.lengths[0::2].unique().numel() == 1 and same.lengths[1::2].unique().numel() == 1
    check_env(DreamEnv(m, starts, "takecover", DreamSettings(max_steps=20)))


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = _cfg(sim_hidden=5)
    torch.manual_seed(0)
    m = build_m(cfg, Z, A)
    path = tmp_path / "m.pt"
    save_m(path, m, config_lib.to_dict(cfg)["model"])
    loaded = load_m(path, cfg, Z, A)
    assert isinstance(loaded, BeliefModel) and loaded.sim_hidden == 5 and loaded.overshoot == 3
    m.eval()
    batch = _batch()
    with torch.no_grad():
        for key, value in m.loss(batch).items():
            assert torch.equal(value, loaded.loss(batch)[key]), key
    outs = [mod.imagine_step(mod.initial_state(4), batch["z"][:, 0], batch["action"][:, 0], 1.0,
                             torch.Generator().manual_seed(0)) for mod in (m, loaded)]
    for x, y in zip([*outs[0][0], *outs[0][1:]], [*outs[1][0], *outs[1][1:]]):
        assert torch.equal(x, y)
    with pytest.raises(UserError, match="holds M 'belief'"):
        load_m(path, config_lib.Config(), Z, A)


def test_training_drives_k_step_nll_down():
    """Adam on a tiny deterministic world, z_{t+1} = 0.8 z_t + a_t[0]: the K-step NLL falls too."""
    torch.manual_seed(0)
    batch = linear_world_batch(8, 10, Z, A, end_in_death=False)
    m = _model(overshoot=3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = {k: v.item() for k, v in m.loss(batch).items()}
    for _ in range(200):
        opt.zero_grad()
        m.loss(batch)["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in m.loss(batch).items()}
    assert last["z_nll_1"] < first["z_nll_1"] - 1.0
    assert last["z_nll_3"] < first["z_nll_3"] - 1.5
    assert last["loss"] < 0.1 * first["loss"]


def test_train_rnn_cli_with_belief(tmp_path, run_cli):
    """``python run.py train-rnn --set model.m=belief`` on synthetic latents: logs the 1- and K-step NLL."""
    run = open_run(tmp_path / "run", SMOKE, ["system.device=cpu"])
    rng = np.random.default_rng(0)
    run.latents_dir.mkdir(parents=True)
    for i, n in enumerate((30, 20, 25, 18)):
        terminated = np.zeros(n, dtype=bool)
        terminated[-1] = i % 2 == 0
        np.savez(run.latents_dir / f"ep_{i:06d}.npz", mu=rng.standard_normal((n, 8)).astype(np.float32),
                 logvar=np.full((n, 8), -2.0, np.float32), action=rng.uniform(-1, 1, (n, 1)).astype(np.float32),
                 reward=np.ones(n, np.float32), done=terminated | (np.arange(n) == n - 1), terminated=terminated)
    save_checkpoint(run.vae_path, {"z_dim": 8, "state_dict": {}})
    result = run_cli("train-rnn", "--run", run.dir, "--quiet", "--set", "model.m=belief",
                     "--set", "model.overshoot=3", "--set", "model.epochs=1")
    assert result.returncode == 0, result.stderr
    record = read_jsonl(run.metrics_path("m"))[-1]
    for key in ("train/loss", "val/z_nll_1", "val/z_nll_3", "val/overshoot_nll", "done_recall"):
        assert key in record, key
    assert np.isfinite(record["val/z_nll_3"]) and "val/z_nll_3" in result.stdout
    cfg = open_run(run.dir, None, create=False).cfg
    m = load_m(run.m_path, cfg, 8, 1)
    assert isinstance(m, BeliefModel) and m.overshoot == 3
    assert m.features(m.initial_state(2), torch.zeros(2, 8), "zh").shape == (2, m.feature_dim("zh")) == (2, 8 + 32)
