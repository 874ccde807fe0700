"""TD-VAE: each term of the jumpy ELBO against torch.distributions, the (t1, t2) sampling, the
action block p_T sees, the dream step's noise contract, and the M interface end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import linear_world_batch
from torch.distributions import Normal

from agents.controller import ControllerSpec
from envs.dream import DreamSettings, dream_rollouts, sample_start_z
from worldmodel.errors import UserError
from worldmodel.io import read_jsonl, save_checkpoint
from worldmodel.runs import open_run
from worldmodel.tdvae import TDVAE, action_block, last_index, sample_pairs
from worldmodel.train_m import load_m, save_m, train_m

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
Z, A, H, S, D = 5, 2, 16, 3, 3
TERMS = ("decoder_log_prob", "belief_log_prob_t1", "transition_log_prob", "belief_log_prob_t2",
         "smoothing_log_prob")


def _model(layers: int = 1, action_dim: int = A, **kw) -> TDVAE:
    torch.manual_seed(0)
    return TDVAE(Z, action_dim, H, S, layers=layers, max_jump=D, pairs=8, done_pos_weight=4.0, **kw)


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """4 rows of 9 steps: full and dies at the end; 6 valid; 1 valid; dies at step 3 (valid to 6)."""
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 9
    mask = torch.arange(t)[None, :] < torch.tensor([9, 6, 1, 7])[:, None]
    terminated = torch.zeros(b, t, dtype=torch.bool)
    terminated[0, 8] = terminated[3, 3] = True
    action = torch.zeros(b, t, A)
    action[..., 0] = torch.arange(t) + 1.0  # a_t names its step (zero padding stays recognisable)
    action[..., 1] = torch.arange(b)[:, None] + 0.5
    return {"z": torch.randn(b, t, Z, generator=g), "action": action,
            "reward": torch.randn(b, t, generator=g),
            "terminated": terminated, "mask": mask}


def _gaussian(gauss, cond: torch.Tensor, eps: torch.Tensor | None = None, s: torch.Tensor | None = None):
    """Hand sampling and log-prob of a layered Gaussian net by net: (s, log p(s | cond))."""
    parts, logp = [], 0.0
    for i, net in enumerate(gauss.nets):
        mu, log_sigma = net(torch.cat([cond, *parts], -1)).chunk(2, -1)
        sigma = log_sigma.clamp(-7.0, 5.0).exp()
        x = mu + sigma * eps[..., i * gauss.size:(i + 1) * gauss.size] if s is None \
            else s[..., i * gauss.size:(i + 1) * gauss.size]
        logp = logp + Normal(mu, sigma).log_prob(x).sum(-1)
        parts.append(x)
    return torch.cat(parts, -1), logp


# ----------------------------------------------------------------- the loss, term by term

@pytest.mark.parametrize("layers", [1, 2])
def test_jumpy_terms_match_torch_distributions(layers):
    m, g = _model(layers), torch.Generator().manual_seed(2)
    n, ls = 6, layers * S
    b1, b2 = torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)
    z2 = torch.randn(n, Z, generator=g)
    delta = torch.tensor([1, 2, 3, 1, 2, 3])
    block = torch.randn(n, D, A, generator=g) * (torch.arange(D) < delta[:, None])[..., None]
    eps2, eps1 = torch.randn(n, ls, generator=g), torch.randn(n, ls, generator=g)
    terms = m.jumpy_terms(b1, b2, z2, block, delta, eps2, eps1)

    s2, logp_b2 = _gaussian(m.p_belief, b2, eps2)  # s_{t2} ~ p_B(b_{t2}) first
    s1, logp_q = _gaussian(m.q_smoothing, torch.cat([s2, b1, b2], -1), eps1)
    _, logp_b1 = _gaussian(m.p_belief, b1, s=s1)
    one_hot = torch.zeros(n, D)
    one_hot[torch.arange(n), delta - 1] = 1.0
    _, logp_t = _gaussian(m.p_transition, torch.cat([s1, block.reshape(n, D * A), one_hot], -1), s=s2)
    mu_z, log_sigma_z = m.p_decoder.nets[0](s2).chunk(2, -1)
    logp_d = Normal(mu_z, log_sigma_z.exp()).log_prob(z2).sum(-1)
    expected = dict(zip(TERMS, (logp_d, logp_b1, logp_t, logp_b2, logp_q), strict=True))
    for name in TERMS:
        torch.testing.assert_close(terms[name], expected[name], msg=name)


def test_loss_is_the_negated_elbo_plus_heads():
    m, batch = _model(), _batch()
    t1 = torch.tensor([[0, 7], [2, 4], [0, 0], [0, 2]])
    delta = torch.tensor([[3, 1], [3, 1], [1, 1], [2, 1]])
    out = m.loss(batch, torch.Generator().manual_seed(3), pairs=(t1, delta))
    eps = torch.randn((2, 4, 2, S), generator=torch.Generator().manual_seed(3))  # the loss's first draw
    h = m.beliefs(batch["z"], batch["action"])
    rows = torch.arange(4)[:, None]
    terms = m.jumpy_terms(h[rows, t1], h[rows, t1 + delta], batch["z"][rows, t1 + delta],
                          action_block(batch["action"], t1, delta, D), delta, eps[0], eps[1])
    for name in TERMS:
        torch.testing.assert_close(out[name], terms[name].mean(), msg=name)
    elbo = (terms["decoder_log_prob"] + terms["belief_log_prob_t1"] + terms["transition_log_prob"]
            - terms["belief_log_prob_t2"] - terms["smoothing_log_prob"]).mean()
    torch.testing.assert_close(out["loss"], -elbo + out["reward"] + out["done"])
    assert out["done"] > 0 and out["reward"] > 0 and out["z_nll"].isfinite()


def test_head_terms_match_hand_computation():
    m, g = _model(), torch.Generator().manual_seed(4)
    s, reward = torch.randn(10, S, generator=g), torch.randn(10, generator=g)
    ended = torch.rand(10, generator=g) < 0.5
    err, bce = m.head_terms(s, reward, ended)
    out = m.heads(s)
    q, y = torch.sigmoid(out[:, 1]), ended.float()
    torch.testing.assert_close(err, (out[:, 0] - reward) ** 2)
    torch.testing.assert_close(bce, -(4.0 * y * torch.log(q) + (1 - y) * torch.log(1 - q)))


def test_training_raises_the_elbo():
    """150 Adam steps on a tiny deterministic world: z_{t+1} = 0.8 z_t + a_t[0]."""
    torch.manual_seed(0)
    batch = linear_world_batch(16, 12, Z, A)
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def evaluate() -> dict[str, float]:
        out = {k: v.item() for k, v in m.loss(batch, torch.Generator().manual_seed(0)).items()}
        return {**out, "neg_elbo": out["loss"] - out["reward"] - out["done"]}

    first = evaluate()
    for _ in range(150):
        opt.zero_grad()
        m.loss(batch)["loss"].backward()
        opt.step()
    last = evaluate()
    assert last["loss"] < 0.3 * first["loss"] and last["reward"] < 0.1 * first["reward"]
    assert last["neg_elbo"] < first["neg_elbo"] - 1.0
    assert last["decoder_log_prob"] > first["decoder_log_prob"] + 3.0


# ----------------------------------------------------------------- which (t1, t2) and which actions

def test_last_index_stops_at_the_mask_and_the_first_death():
    batch = _batch()
    assert last_index(batch["mask"], batch["terminated"]).tolist() == [8, 5, 0, 3]


def test_sampled_pairs_stay_inside_and_cover_every_jump():
    end = torch.tensor([8, 5, 0, 3, 1, 2])
    t1, delta, ok = sample_pairs(end, 4000, D, torch.Generator().manual_seed(0))
    assert ok.tolist() == [[e >= 1] * 4000 for e in end.tolist()]
    assert (delta >= 1).all() and (delta <= D).all() and (t1 >= 0).all()
    assert (t1 + delta <= end[:, None])[ok].all()
    assert set(delta[0].tolist()) == {1, 2, 3} and set(t1[0].tolist()) == set(range(8))
    assert set(delta[4].tolist()) == {1} and set(t1[3].tolist()) == {0, 1, 2}


def test_p_t_sees_exactly_the_block_and_heads_the_sums_over_it(monkeypatch):
    m, batch = _model(), _batch()
    last = last_index(batch["mask"], batch["terminated"])
    calls, targets = [], []
    real_input, real_heads = m.transition_input, m.head_terms
    monkeypatch.setattr(m, "transition_input", lambda s, block, delta: calls.append((block, delta))
                        or real_input(s, block, delta))
    monkeypatch.setattr(m, "head_terms", lambda s, reward, ended: targets.append((reward, ended))
                        or real_heads(s, reward, ended))
    m.loss(batch, torch.Generator().manual_seed(5))
    assert len(calls) == 3  # the ELBO's p_T, the heads' jumps, the one-step z_nll
    for kind, ((block, delta), reach) in enumerate(zip(calls[:2], (last, last + 1), strict=True)):
        t1 = block[..., 0, 0].long() - 1  # a_t[0] = t + 1
        for b in range(4):
            if reach[b] < 1:
                continue
            for i in range(block.shape[1]):
                lo, d = int(t1[b, i]), int(delta[b, i])
                assert 1 <= d <= D and lo + d <= reach[b]
                want = torch.zeros(D, A)
                want[:d] = batch["action"][b, lo:lo + d]
                torch.testing.assert_close(block[b, i], want)
                if kind == 1:  # the heads' targets: Σ r and "ended" over a_{t1} … a_{t2-1}
                    reward, ended = targets[0][0][b, i], targets[0][1][b, i]
                    torch.testing.assert_close(reward, batch["reward"][b, lo:lo + d].sum())
                    assert bool(ended) == bool(batch["terminated"][b, lo:lo + d].any())
    assert targets[0][1].any()  # some jump ends in a death
    block, delta = calls[2]
    assert (delta == 1).all() and torch.equal(block[:, :, 0], batch["action"]) and not block[:, :, 1:].any()


def test_values_past_the_mask_do_not_affect_loss():
    m, batch = _model(), _batch()
    before = m.loss(batch, torch.Generator().manual_seed(6))
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["mask"]
    noisy["z"][pad], noisy["action"][pad] = 50.0, -9.0
    noisy["reward"][pad], noisy["terminated"][pad] = 7.0, True
    after = m.loss(noisy, torch.Generator().manual_seed(6))
    for key in (*TERMS, "loss", "reward", "done", "z_nll"):
        torch.testing.assert_close(after[key], before[key], msg=key)


# ----------------------------------------------------------------- stepping and dreaming

def test_observe_filters_the_papers_belief():
    """observe(state_t, z_t, a_t) completes b_t = LSTM(b_{t-1}, [z_t, a_{t-1}]), as beliefs() does."""
    m, batch = _model(), _batch()
    h = m.beliefs(batch["z"], batch["action"])
    state = m.initial_state(4)
    for t in range(5):
        z = batch["z"][:, t]
        torch.testing.assert_close(m.features(state, z, "zh"), torch.cat([z, h[:, t]], 1))
        assert m.features(state, z, "zch").shape == (4, m.feature_dim("zch")) == (4, Z + 2 * H)
        state = m.observe(state, z, batch["action"][:, t])
        torch.testing.assert_close(state[0], h[:, t])
    with pytest.raises(ValueError):
        m.features(state, z, "hz")
    later = batch["action"].clone()
    later[:, 4] += 1.0  # a_4 first enters b_5: no belief before it may change
    moved = m.beliefs(batch["z"], later)
    torch.testing.assert_close(moved[:, :5], h[:, :5])
    assert not torch.allclose(moved[:, 5], h[:, 5])


def test_imagine_step_matches_hand_sampling_and_calibrates_done():
    m, g = _model(), torch.Generator().manual_seed(7)
    z, a, tau = torch.randn(5, Z, generator=g), torch.randn(5, A, generator=g), 1.3
    noise = m.sample_noise(5, g)
    assert [tuple(x.shape) for x in noise] == [(5, S), (5, S), (5, Z)]
    state, z1, r, d = m.imagine_step(m.initial_state(5), z, a, tau, noise=noise)
    h = m.beliefs(z[:, None], a[:, None])[:, 0]
    mu, log_sigma = m.p_belief.nets[0](h).chunk(2, -1)
    s = mu + log_sigma.exp() * tau**0.5 * noise[0]  # first step: s_t ~ p_B(b_t) at τ
    x = torch.cat([s, a, torch.zeros(5, (D - 1) * A), F.one_hot(torch.zeros(5, dtype=torch.long), D)], 1)
    mu, log_sigma = m.p_transition.nets[0](x).chunk(2, -1)
    s1 = mu + log_sigma.exp() * tau**0.5 * noise[1]
    mu, log_sigma = m.p_decoder.nets[0](s1).chunk(2, -1)
    torch.testing.assert_close(z1, mu + log_sigma.exp() * tau**0.5 * noise[2])
    torch.testing.assert_close(state[3], s1)
    reward, logit = m.heads(s1).unbind(-1)
    torch.testing.assert_close(r, reward)
    torch.testing.assert_close(d, torch.sigmoid(logit - torch.log(torch.tensor(4.0))))


def test_dream_carries_s_and_real_z_reanchors_it():
    m, g = _model(), torch.Generator().manual_seed(8)
    z, a = torch.randn(4, Z, generator=g), torch.randn(4, A, generator=g)
    state, z1, _, _ = m.imagine_step(m.initial_state(4), z, a, 1.0, g)
    noise = m.sample_noise(4, g)
    other = (torch.randn(4, S, generator=g), *noise[1:])  # only p_B's ε differs
    carried = [m.imagine_step(state, z1, a, 1.0, noise=n)[1] for n in (noise, other)]
    torch.testing.assert_close(carried[0], carried[1])  # z_1 is M's own: s_1 from p_T, p_B unused
    real = [m.imagine_step(state, z1 + 0.1, a, 1.0, noise=n)[1] for n in (noise, other)]
    assert not torch.allclose(real[0], real[1])  # a z from outside: s_1 ~ p_B(b_1)
    assert not torch.allclose(real[0], carried[0])


def test_same_noise_same_step_row_by_row():
    m, g = _model(), torch.Generator().manual_seed(9)
    z, a = torch.randn(4, Z, generator=g), torch.randn(4, A, generator=g)
    state = m.imagine_step(m.initial_state(4), z, a, 1.0, g)[0]
    state = (*state[:4], torch.where(torch.tensor([[True], [False], [True], [False]]), state[4], 0.0))
    z = torch.where(torch.tensor([[True], [False], [True], [False]]), state[4], z)  # rows 0, 2 carry s
    noise = m.sample_noise(4, torch.Generator().manual_seed(3))
    first = m.imagine_step(state, z, a, 1.15, noise=noise)
    again = m.imagine_step(state, z, a, 1.15, noise=noise)
    for x, y in zip([*again[0], *again[1:]], [*first[0], *first[1:]], strict=True):
        torch.testing.assert_close(x, y)
    drawn = m.imagine_step(state, z, a, 1.15, torch.Generator().manual_seed(3))  # draws the same noise
    torch.testing.assert_close(drawn[1], first[1])
    rows = torch.tensor([2, 0, 3, 1])
    shuffled = m.imagine_step(tuple(s[rows] for s in state), z[rows], a[rows], 1.15,
                              noise=tuple(x[rows] for x in noise))
    torch.testing.assert_close(shuffled[1], first[1][rows])
    assert not torch.allclose(m.imagine_step(state, z, a, 1.15, noise=m.sample_noise(4, None))[1], first[1])
    zero = [m.imagine_step(state, z, a, 0.0, torch.Generator().manual_seed(s))[1] for s in (1, 2)]
    torch.testing.assert_close(zero[0], zero[1])  # τ = 0: the means, no noise


def test_imagine_jump_uses_the_padded_block():
    m, g = _model(), torch.Generator().manual_seed(10)
    z, actions = torch.randn(3, Z, generator=g), torch.randn(3, 2, A, generator=g)
    seen = []
    real_input = m.transition_input
    m.transition_input = lambda s, block, delta: seen.append((block, delta)) or real_input(s, block, delta)
    state, z2, r, d = m.imagine_jump(m.initial_state(3), z, actions, 1.0, g)
    assert z2.shape == (3, Z) and r.shape == d.shape == (3,) and torch.equal(state[2], actions[:, -1])
    block, delta = seen[0]
    assert (delta == 2).all() and torch.equal(block[:, :2], actions) and not block[:, 2:].any()
    with pytest.raises(ValueError, match="1 .. 3"):
        m.imagine_jump(state, z2, torch.zeros(3, D + 1, A), 1.0, g)


def test_dream_rollouts_run_and_share_luck():
    m = _model(action_dim=1).eval()
    with torch.no_grad():
        m.heads[-1].bias[1] = -1.5  # P(done) of a few % a step: dreams of some dozen steps
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    starts = torch.stack([torch.randn(3, Z), torch.full((3, Z), -2.0)], 1)
    params = torch.randn(6, spec.num_params, generator=torch.Generator().manual_seed(0))
    settings = DreamSettings(max_steps=40, done="sample", temperature=1.15)

    def run(p):
        gen = torch.Generator().manual_seed(11)
        return dream_rollouts(m, p, spec, sample_start_z(starts, 6, gen), settings, gen, torch.arange(6) % 3)

    res = run(params)
    assert res.lengths.min() >= 1 and bool(res.terminated.any()) and len(set(res.lengths.tolist())) > 1
    again = run(torch.cat([params[:3], torch.randn(3, spec.num_params)]))
    assert res.lengths[:3].tolist() == again.lengths[:3].tolist()  # rows 0-2 unaffected by 3-5


# ----------------------------------------------------------------- through the repo's own plumbing

def _write_latents(folder: Path, lengths=(30, 22, 41, 17)) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        terminated = np.zeros(n, dtype=bool)
        terminated[-1] = i % 2 == 0
        np.savez_compressed(folder / f"ep_{i:06d}.npz", mu=rng.standard_normal((n, 8)).astype(np.float32),
                            logvar=np.full((n, 8), -2.0, np.float32),
                            action=rng.uniform(-1, 1, (n, 1)).astype(np.float32),
                            reward=np.ones(n, np.float32), done=terminated.copy(), terminated=terminated)


def test_train_rnn_with_tdvae_then_save_load_round_trip(tmp_path):
    overrides = ["system.device=cpu", "model.m=tdvae", "model.epochs=1", "model.hidden=16",
                 "model.tdvae_layers=2", "model.tdvae_max_jump=4"]
    run = open_run(tmp_path / "run", SMOKE, overrides=overrides)
    _write_latents(run.latents_dir)
    save_checkpoint(run.vae_path, {"z_dim": 8, "state_dict": {}})
    summary = train_m(run)
    record = read_jsonl(run.metrics_path("m"))[-1]
    for key in ("train/loss", "val/z_nll", "val/transition_log_prob", "val/smoothing_log_prob", "val/done"):
        assert np.isfinite(record[key]), key
    assert 0.0 <= summary["false_early_death_rate"] <= 1.0
    m = load_m(run.m_path, run.cfg, 8, 1)
    assert isinstance(m, TDVAE) and m.state_dim == 2 * run.cfg.model.tdvae_state
    path = tmp_path / "again.pt"
    save_m(path, m, {"m": "tdvae"})
    loaded = load_m(path, run.cfg, 8, 1)
    z, a = torch.randn(5, 8), torch.rand(5, 1)
    outs = [mod.imagine_step(mod.initial_state(5), z, a, 1.0, torch.Generator().manual_seed(0))
            for mod in (m, loaded)]
    for x, y in zip(outs[0][1:], outs[1][1:], strict=True):
        assert torch.equal(x, y)
    with pytest.raises(UserError, match="shape"):
        load_m(path, open_run(run.dir, None, overrides=["model.tdvae_state=4"]).cfg, 8, 1)


def test_config_rejects_three_layers(tmp_path):
    with pytest.raises(UserError, match="tdvae_layers"):
        open_run(tmp_path / "run", SMOKE, overrides=["model.tdvae_layers=3"])


# ----------------------------------------------------------------- jumpy dreams in watch

def test_watch_dreams_in_jumps_and_refuses_a_one_step_m():
    from agents.watch import compare_episode
    from worldmodel.mdnrnn import MDNRNN
    from worldmodel.vae import ConvVAE

    torch.manual_seed(0)
    vae, z_dim = ConvVAE(4), 4
    m = TDVAE(z_dim, 1, 16, 3, max_jump=3).eval()
    obs = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    actions = np.zeros((8, 1), np.float32)
    cmp = compare_episode(vae, m, obs, actions, 1.0, torch.Generator().manual_seed(0), jump=3)
    assert len(cmp.dream) == len(obs) == len(cmp.done_prob)
    # jumps land on steps 3, 6 and 7 (the last one short): frames in between are held
    np.testing.assert_array_equal(cmp.dream[1], cmp.dream[0])
    np.testing.assert_array_equal(cmp.dream[2], cmp.dream[0])
    np.testing.assert_array_equal(cmp.dream[5], cmp.dream[4])
    assert not np.array_equal(cmp.dream[3], cmp.dream[2])
    assert not np.array_equal(cmp.dream[7], cmp.dream[6])
    with pytest.raises(UserError, match="jumpy dreams need model.m: tdvae"):
        compare_episode(vae, MDNRNN(z_dim, 1, 8, 2), obs, actions, 1.0, jump=3)
