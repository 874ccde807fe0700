"""The MDN-RNN's maths against independent computations, and its M interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import linear_world_batch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from worldmodel.mdnrnn import MDNRNN
from worldmodel.mixture import joint_log_prob, mdn_log_prob, mdn_sample

Z, A, H, K = 5, 3, 16, 3


def _model(predict_reward: bool = True, **kw) -> MDNRNN:
    torch.manual_seed(0)
    return MDNRNN(Z, A, H, K, predict_reward=predict_reward, done_pos_weight=4.0, **kw)


def _batch(b: int = 4, t: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, t - 2, 1, 3])[:b]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    terminated = torch.zeros(b, t, dtype=torch.bool)
    terminated[0, t - 1] = True
    terminated[2, 0] = True
    return {
        "z": torch.randn(b, t, Z, generator=g),
        "action": torch.randn(b, t, A, generator=g),
        "reward": torch.randn(b, t, generator=g),
        "terminated": terminated,
        "mask": mask,
    }


def _mixture(logits: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> MixtureSameFamily:
    return MixtureSameFamily(Categorical(logits=logits), Normal(mu, log_sigma.exp()))


def test_mdn_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits, mu, log_sigma = (torch.randn(4, 6, Z, K, generator=g) for _ in range(3))
    x = 2 * torch.randn(4, 6, Z, generator=g)
    expected = _mixture(logits, mu, log_sigma).log_prob(x)
    torch.testing.assert_close(mdn_log_prob(logits, mu, log_sigma, x), expected)


def test_joint_log_prob_matches_torch_distributions():
    """One categorical over K diagonal Gaussians on the whole z, not one mixture per dimension."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, K, generator=g)
    mu, log_sigma = (torch.randn(4, 6, Z, K, generator=g) for _ in range(2))
    x = 2 * torch.randn(4, 6, Z, generator=g)
    expected = MixtureSameFamily(Categorical(logits=logits),
                                 Independent(Normal(mu.transpose(-1, -2), log_sigma.exp().transpose(-1, -2)), 1))
    torch.testing.assert_close(joint_log_prob(logits, mu, log_sigma, x), expected.log_prob(x))


def test_joint_loss_scores_the_whole_z_under_one_mixture():
    m, batch = _model(mixture="joint"), _batch()
    p, _ = m(batch["z"], batch["action"])
    assert p["logits"].shape == (4, 7, Z, K)
    assert torch.equal(p["logits"][..., 0, :], p["logits"][..., Z - 1, :])  # one set of logits for all of z
    mask = batch["mask"]
    z_mask = (mask[:, :-1] & mask[:, 1:]).float()
    mix = MixtureSameFamily(Categorical(logits=p["logits"][:, :-1, 0]),
                            Independent(Normal(p["mu"][:, :-1].transpose(-1, -2),
                                               p["log_sigma"][:, :-1].exp().transpose(-1, -2)), 1))
    z_nll = (-mix.log_prob(batch["z"][:, 1:]) / Z * z_mask).sum() / z_mask.sum()
    torch.testing.assert_close(m.loss(batch)["z_nll"], z_nll)
    assert m.head.out_features == K + 2 * Z * K + 2


def test_loss_terms_match_independent_computation():
    m, batch = _model(), _batch()
    terms = m.loss(batch)
    p, _ = m(batch["z"], batch["action"])
    mask = batch["mask"]
    z_mask = (mask[:, :-1] & mask[:, 1:]).float()
    logp = _mixture(p["logits"][:, :-1], p["mu"][:, :-1], p["log_sigma"][:, :-1]).log_prob(batch["z"][:, 1:])
    z_nll = (-logp.mean(-1) * z_mask).sum() / z_mask.sum()
    valid = mask.float()
    reward = (((p["reward"] - batch["reward"]) ** 2) * valid).sum() / valid.sum()
    y, q = batch["terminated"].float(), torch.sigmoid(p["done_logit"])
    bce = -(4.0 * y * torch.log(q) + (1 - y) * torch.log(1 - q))
    done = (bce * valid).sum() / valid.sum()
    torch.testing.assert_close(terms["z_nll"], z_nll)
    torch.testing.assert_close(terms["reward"], reward)
    torch.testing.assert_close(terms["done"], done)
    torch.testing.assert_close(terms["loss"], z_nll + reward + done)


def test_reward_off_gives_zero_reward_term_and_prediction():
    m, batch = _model(predict_reward=False), _batch()
    assert m.loss(batch)["reward"].item() == 0.0
    state = m.initial_state(4)
    _, _, reward, _ = m.imagine_step(state, batch["z"][:, 0], batch["action"][:, 0], 1.0)
    assert reward.shape == (4,) and torch.all(reward == 0)


def test_values_past_mask_do_not_affect_loss():
    m, batch = _model(), _batch()
    before = m.loss(batch)
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["mask"]
    noisy["z"][pad] = 100.0
    noisy["action"][pad] = -50.0
    noisy["reward"][pad] = 7.0
    noisy["terminated"][pad] = True
    after = m.loss(noisy)
    for key in ("loss", "z_nll", "reward", "done"):
        torch.testing.assert_close(after[key], before[key])


def test_temperature_zero_returns_most_likely_mean():
    g = torch.Generator().manual_seed(0)
    logits, mu, log_sigma = (torch.randn(50, Z, K, generator=g) for _ in range(3))
    expected = mu.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(mdn_sample(logits, mu, log_sigma, 0.0), expected)
    near = mdn_sample(logits, mu, log_sigma, 1e-10, torch.Generator().manual_seed(1))
    torch.testing.assert_close(near, expected, atol=1e-2, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_sample_statistics_match_tempered_mixture(tau):
    logits = torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.0, 0.5]])
    mu = torch.tensor([[-2.0, 0.5, 3.0], [1.0, -1.0, 4.0]])
    log_sigma = torch.log(torch.tensor([[0.5, 1.0, 0.3], [0.2, 0.7, 1.5]]))
    n = 200_000
    samples = mdn_sample(logits.expand(n, 2, 3), mu.expand(n, 2, 3), log_sigma.expand(n, 2, 3), tau,
                         torch.Generator().manual_seed(0))
    pi = F.softmax(logits / tau, dim=-1)
    var_k = tau * log_sigma.exp() ** 2
    mean = (pi * mu).sum(-1)
    var = (pi * (var_k + mu**2)).sum(-1) - mean**2
    torch.testing.assert_close(samples.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(samples.var(0), var, atol=0.0, rtol=0.03)


def test_features_shapes():
    m = _model()
    state, z = m.initial_state(6), torch.randn(6, Z)
    assert m.features(state, z, "zh").shape == (6, m.feature_dim("zh")) == (6, Z + H)
    assert m.features(state, z, "zch").shape == (6, m.feature_dim("zch")) == (6, Z + 2 * H)
    torch.testing.assert_close(m.features(state, z, "z"), z)  # the paper's ablation: C on z alone
    assert m.feature_dim("z") == Z
    with pytest.raises(ValueError):
        m.features(state, z, "hz")


@pytest.mark.parametrize("mixture,clock", [("per_dim", 0), ("joint", 0), ("per_dim", 50)])
def test_stepping_matches_sequence_forward(mixture, clock):
    m, batch = _model(mixture=mixture, clock=clock), _batch(t=5)
    p, (h_seq, c_seq, *t_seq) = m(batch["z"], batch["action"])
    state = m.initial_state(4)
    assert len(state) == (3 if clock else 2)
    for t in range(5):
        state, z0, reward, done = m.imagine_step(state, batch["z"][:, t], batch["action"][:, t], 0.0)
        assert state[0].shape == (4, H) and z0.shape == (4, Z) and reward.shape == done.shape == (4,)
        torch.testing.assert_close(done, torch.sigmoid(p["done_logit"][:, t] - torch.log(m.done_pos_weight)))
        torch.testing.assert_close(reward, p["reward"][:, t])
        most_likely = p["mu"][:, t].gather(-1, p["logits"][:, t].argmax(-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(z0, most_likely)
    torch.testing.assert_close(state[0], h_seq)
    if clock:  # the state counts the steps; the sequence's steps default to 0, 1, ...
        assert torch.equal(state[2], torch.full((4, 1), 5.0)) and torch.equal(t_seq[0], state[2])
        p_step, _ = m(batch["z"], batch["action"], step=torch.arange(5).expand(4, 5))
        torch.testing.assert_close(p_step["done_logit"], p["done_logit"])
    torch.testing.assert_close(m.observe(m.initial_state(4), batch["z"][:, 0], batch["action"][:, 0])[1],
                               m(batch["z"][:, :1], batch["action"][:, :1])[1][1])


def _reference_step(m: MDNRNN, state, z, action, temperature, noise):
    """nn.LSTM (``forward``) and Gumbel-max by argmax + gather: what imagine_step must compute."""
    p, state = m(z[:, None], action[:, None], state)
    logits, mu, log_sigma = (p[k][:, 0] for k in ("logits", "mu", "log_sigma"))  # (B, Z, K)
    gumbel, eps = noise  # (B, K, Z), (B, Z)
    k = (logits / temperature + gumbel.transpose(1, 2)).argmax(-1, keepdim=True)
    z_next = mu.gather(-1, k)[..., 0] + log_sigma.gather(-1, k)[..., 0].exp() * temperature**0.5 * eps
    return state, z_next, p["reward"][:, 0], torch.sigmoid(p["done_logit"][:, 0] - torch.log(m.done_pos_weight))


@pytest.mark.parametrize("mixture,clock", [("per_dim", 0), ("joint", 0), ("per_dim", 50)])
@pytest.mark.parametrize("tau", [1.15, 1.0])
def test_imagine_step_with_noise_matches_lstm_and_gumbel_max(tau, mixture, clock):
    """Three chained steps (the later ones reuse the row buffer) against an independent computation."""
    m, g = _model(mixture=mixture, clock=clock), torch.Generator().manual_seed(5)
    z, a = torch.randn(6, Z, generator=g), torch.rand(6, 3, A, generator=g) * 2 - 1
    state = ref_state = (torch.randn(6, H, generator=g), torch.randn(6, H, generator=g),
                         *([torch.randint(0, 50, (6, 1), generator=g).float()] if clock else []))
    ref_z = z
    for t in range(3):
        noise = m.sample_noise(6, g)
        assert [tuple(x.shape) for x in noise] == [(6, K, 1 if mixture == "joint" else Z), (6, Z)]
        state, z, reward, done = m.imagine_step(state, z, a[:, t], tau, noise=noise)
        ref_state, ref_z, ref_reward, ref_done = _reference_step(m, ref_state, ref_z, a[:, t], tau, noise)
        for got, want in zip([*state, z, reward, done], [*ref_state, ref_z, ref_reward, ref_done]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.features(state, z, "zh"), torch.cat([ref_z, ref_state[0]], 1),
                                   rtol=1e-5, atol=1e-5)


def test_done_probability_undoes_the_positive_class_weight():
    """Trained with pos_weight w, the done logit converges to logit(p) + log w; the dream must see p."""
    m = _model()
    labels = (torch.arange(1000) < 200).float()  # P(death) = 0.2
    logit = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([logit], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(logit.expand(1000), labels, pos_weight=m.done_pos_weight).backward()
        opt.step()
    assert torch.sigmoid(logit).item() > 0.4  # the weighted optimum is far from 0.2 ...
    with torch.no_grad():
        m.head.weight[-1].zero_()
        m.head.bias[-1] = logit[0]
    _, _, _, done = m.imagine_step(m.initial_state(3), torch.zeros(3, Z), torch.zeros(3, A), 0.0)
    torch.testing.assert_close(done, torch.full((3,), 0.2), atol=2e-3, rtol=0)  # ... the step's P is not


def test_same_noise_gives_same_sample_row_by_row():
    m, batch = _model(), _batch()
    state, z, a = m.initial_state(4), batch["z"][:, 0], batch["action"][:, 0]
    noise = m.sample_noise(4, torch.Generator().manual_seed(3))
    first = m.imagine_step(state, z, a, 1.15, noise=noise)[1]
    torch.testing.assert_close(m.imagine_step(state, z, a, 1.15, noise=noise)[1], first)
    # Without noise, imagine_step draws sample_noise(B, generator): the same step.
    drawn = m.imagine_step(state, z, a, 1.15, torch.Generator().manual_seed(3))[1]
    torch.testing.assert_close(drawn, first)
    # Row i of the noise drives row i of the batch.
    rows = torch.tensor([2, 0, 3, 1])
    shuffled = m.imagine_step((state[0][rows], state[1][rows]), z[rows], a[rows], 1.15,
                              noise=tuple(x[rows] for x in noise))[1]
    torch.testing.assert_close(shuffled, first[rows])
    assert not torch.allclose(m.imagine_step(state, z, a, 1.15, noise=m.sample_noise(4, None))[1], first)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_noise_path_statistics_match_tempered_mixture(tau):
    """imagine_step's z_{t+1} with sample_noise against MixtureSameFamily at logits / τ, σ √τ."""
    m, g = _model(), torch.Generator().manual_seed(0)
    logits, mu = torch.randn(Z, K, generator=g), 2 * torch.randn(Z, K, generator=g)
    log_sigma = 0.5 * torch.randn(Z, K, generator=g)
    with torch.no_grad():  # heads that ignore h: the same mixture for every row
        m.head.weight.zero_()
        m.head.bias[: 3 * Z * K] = torch.stack([logits, mu, log_sigma]).flatten()
    n = 100_000
    z, a = torch.randn(n, Z, generator=g), torch.randn(n, A, generator=g)
    samples = m.imagine_step(m.initial_state(n), z, a, tau, noise=m.sample_noise(n, g))[1]
    expected = MixtureSameFamily(Categorical(logits=logits / tau), Normal(mu, log_sigma.exp() * tau**0.5))
    torch.testing.assert_close(samples.mean(0), expected.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(samples.var(0), expected.variance, atol=0.0, rtol=0.03)


def test_joint_mixture_moves_every_dimension_with_one_component():
    """Two components at +3 and -3 on every dimension: a joint sample sits wholly in one of them,
    while per-dimension sampling mixes signs across dimensions."""
    n, g = 4000, torch.Generator().manual_seed(0)
    z, a = torch.randn(n, Z, generator=g), torch.randn(n, A, generator=g)
    same_sign = {}
    for mixture in ("per_dim", "joint"):
        m = MDNRNN(Z, A, H, 2, mixture=mixture)
        with torch.no_grad():  # heads that ignore h: equal weights, means ±3, σ = e^-2
            m.head.weight.zero_()
            m.head.bias.zero_()
            nl = m.n_logits
            m.head.bias[nl: nl + 2 * Z * 2].view(2, Z, 2)[0] = torch.tensor([3.0, -3.0])
            m.head.bias[nl: nl + 2 * Z * 2].view(2, Z, 2)[1] = -2.0
        samples = m.imagine_step(m.initial_state(n), z, a, 1.0, noise=m.sample_noise(n, g))[1]
        signs = samples.sign()
        same_sign[mixture] = (signs == signs[:, :1]).all(1).float().mean().item()
        assert abs((samples[:, 0] > 0).float().mean().item() - 0.5) < 0.05  # both components drawn
    assert same_sign["joint"] == 1.0
    assert same_sign["per_dim"] < 0.2  # 2 / 2^5 expected


def test_stepping_follows_changed_weights():
    """The fused step weights are rebuilt when the parameters change in place or move."""
    m, batch = _model(), _batch()
    state, z, a = m.initial_state(4), batch["z"][:, 0], batch["action"][:, 0]
    m.imagine_step(state, z, a, 0.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.loss(batch)["loss"].backward()
    opt.step()
    for dtype in (torch.float32, torch.float64):  # in place (the step), then moved (.to)
        m.to(dtype)
        args = (m.initial_state(4), z.to(dtype), a.to(dtype))
        _, _, reward, done = m.imagine_step(*args, 0.0)
        p, _ = m(args[1][:, None], args[2][:, None])
        torch.testing.assert_close(done, torch.sigmoid(p["done_logit"][:, 0] - torch.log(m.done_pos_weight)))
        torch.testing.assert_close(reward, p["reward"][:, 0])


def test_imagine_step_is_reproducible_with_generator():
    m, batch = _model(), _batch()
    state = m.initial_state(4)
    outs = [m.imagine_step(state, batch["z"][:, 0], batch["action"][:, 0], 1.15,
                           torch.Generator().manual_seed(3))[1] for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("mixture", ["per_dim", "joint"])
def test_training_drives_loss_down(mixture):
    """Two hundred Adam steps on a tiny deterministic world: z_{t+1} = 0.8 z_t + a_t[0]."""
    torch.manual_seed(0)
    batch = linear_world_batch(16, 12, Z, A)
    m = _model(mixture=mixture)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = {k: v.item() for k, v in m.loss(batch).items()}
    for _ in range(200):
        terms = m.loss(batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in m.loss(batch).items()}
    assert last["loss"] < 0.1 * first["loss"]
    assert last["z_nll"] < first["z_nll"] - 1.5
    assert last["reward"] < 0.1 * first["reward"]
    assert last["done"] < 0.5 * first["done"]


@pytest.mark.parametrize("predict_reward", [True, False])
def test_judge_step_matches_imagine_step(predict_reward):
    torch.manual_seed(0)
    m = MDNRNN(4, 2, 8, 3, predict_reward=predict_reward).eval()
    state = (torch.randn(5, 8), torch.randn(5, 8))
    z, a = torch.randn(5, 4), torch.randn(5, 2)
    (h, c), _, reward, done = m.imagine_step(state, z, a, 1.3, torch.Generator().manual_seed(1))
    (h2, c2), reward2, done2 = m.judge_step(state, z, a)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(c2, c)
    torch.testing.assert_close(reward2, reward)
    torch.testing.assert_close(done2, done)
    assert predict_reward or not reward2.any()


def test_bfloat16_dream_step_stays_close_and_observe_stays_float32():
    torch.manual_seed(0)
    m = MDNRNN(8, 2, 32, 3, predict_reward=True).eval()
    state = (torch.randn(64, 32) * 0.5, torch.randn(64, 32))
    z, a = torch.randn(64, 8), torch.rand(64, 2) * 2 - 1
    noise = m.sample_noise(64, torch.Generator().manual_seed(1))
    full = m.imagine_step(state, z, a, 1.15, noise=noise)
    full_judged = m.judge_step(state, z, a)
    observed = m.observe(state, z, a)
    m.set_dream_precision(torch.bfloat16)
    low = m.imagine_step(state, z, a, 1.15, noise=noise)
    assert all(t.dtype == torch.float32 for t in (*low[0], low[1], low[2], low[3]))
    for x, y in ((low[0][0], full[0][0]), (low[0][1], full[0][1]), (low[2], full[2]), (low[3], full[3])):
        torch.testing.assert_close(x, y, atol=0.03, rtol=0.03)
        assert not torch.equal(x, y)  # it did multiply in bfloat16
    # The sampled component can flip where two are nearly tied; nearly all rows agree.
    assert (low[1] - full[1]).abs().amax(1).lt(0.1).float().mean() > 0.9
    for k in (1, 2):  # reward and P(done), as the bfloat16 dream step gives them
        torch.testing.assert_close(m.judge_step(state, z, a)[k], low[k + 1])
        torch.testing.assert_close(m.judge_step(state, z, a)[k], full_judged[k], atol=0.03, rtol=0.03)
    for x, y in zip(m.observe(state, z, a), observed):  # the real game: exact float32
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    m.set_dream_precision(None)
    torch.testing.assert_close(m.imagine_step(state, z, a, 1.15, noise=noise)[1], full[1], atol=0, rtol=0)


def test_dream_dropout_thins_the_cells_z_and_h_input_only():
    """A mask multiplies the [z, h] the cell reads; c, the heads and the controller's features are untouched."""
    m, g = _model(), torch.Generator().manual_seed(3)
    z, a = torch.randn(6, Z, generator=g), torch.rand(6, A, generator=g) * 2 - 1
    state = (torch.randn(6, H, generator=g), torch.randn(6, H, generator=g))
    masks = m.dropout_masks(6, 0.4, g)
    assert masks.shape == (6, Z + H)
    noise = m.sample_noise(6, g)
    got = m.imagine_step(state, z, a, 1.15, noise=noise, dropout=masks)
    want = m.imagine_step((state[0] * masks[:, Z:], state[1]), z * masks[:, :Z], a, 1.15, noise=noise)
    for x, y in zip([*got[0], *got[1:]], [*want[0], *want[1:]]):
        torch.testing.assert_close(x, y)
    ones = m.imagine_step(state, z, a, 1.15, noise=noise, dropout=torch.ones(6, Z + H))
    plain = m.imagine_step(state, z, a, 1.15, noise=noise)
    for x, y in zip([*ones[0], *ones[1:]], [*plain[0], *plain[1:]]):
        torch.testing.assert_close(x, y)
    # Chained from the row buffer, the mask still leaves the features (the buffer itself) alone.
    s1, z1, _, _ = m.imagine_step(state, z, a, 1.15, noise=noise)
    before = m.features(s1, z1, "zh").clone()
    m.imagine_step(s1, z1, a, 1.15, noise=noise, dropout=masks)
    torch.testing.assert_close(torch.cat([z1, s1[0]], 1), before)


def test_dropout_masks_drop_about_the_rate_and_rescale_the_rest():
    m = _model()
    masks = m.dropout_masks(4000, 0.2, torch.Generator().manual_seed(0))
    assert set(masks.unique().tolist()) == {0.0, 1.25}
    assert (masks == 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    with pytest.raises(ValueError):
        m.dropout_masks(2, 1.0, None)


def test_training_dropout_is_random_in_train_mode_and_off_in_eval():
    torch.manual_seed(0)
    m = MDNRNN(Z, A, H, K, dropout=0.3)
    plain = MDNRNN(Z, A, H, K)
    plain.load_state_dict(m.state_dict())
    batch = _batch(t=6)
    m.train()
    first, second = m.loss(batch)["loss"], m.loss(batch)["loss"]
    assert not torch.equal(first, second)
    first.backward()
    assert m.lstm.weight_hh_l0.grad is not None and m.lstm.weight_hh_l0.grad.abs().sum() > 0
    m.eval(), plain.eval()
    torch.testing.assert_close(m.loss(batch)["loss"], plain.loss(batch)["loss"])
    with pytest.raises(ValueError):
        MDNRNN(Z, A, H, K, dropout=1.0)



@pytest.mark.parametrize("clock", [0, 50])
def test_windows_with_a_carried_state_make_one_sequence(clock):
    """loss_and_state over consecutive windows, each starting where the last one ended, gives the
    same predictions as one pass over the whole sequence (``model.carry_state``)."""
    m, batch = _model(clock=clock), _batch(t=7)
    full = {k: v[:2] for k, v in batch.items()}  # the two rows that run past step 3
    whole, _ = m.loss_and_state(full)
    first, state = m.loss_and_state({k: v[:, :4] for k, v in full.items()})
    second, _ = m.loss_and_state({k: v[:, 4:] for k, v in full.items()}, state)
    p_whole, _ = m(full["z"], full["action"])
    p_first, state = m(full["z"][:, :4], full["action"][:, :4])
    p_second, _ = m(full["z"][:, 4:], full["action"][:, 4:], state)
    torch.testing.assert_close(torch.cat([p_first["done_logit"], p_second["done_logit"]], 1), p_whole["done_logit"])
    torch.testing.assert_close(torch.cat([p_first["mu"], p_second["mu"]], 1), p_whole["mu"])
    steps = int(full["mask"].sum())
    n_first, n_second = int(full["mask"][:, :4].sum()), int(full["mask"][:, 4:].sum())
    torch.testing.assert_close((first["done"] * n_first + second["done"] * n_second) / steps, whole["done"])
    fresh, _ = m(full["z"][:, 4:], full["action"][:, 4:])  # not what a zero state predicts
    assert not torch.allclose(fresh["done_logit"], p_second["done_logit"])


@pytest.mark.parametrize("segment,dropout", [(16, 0.0), (2, 0.0), (3, 0.2)])
def test_loss_gradients_match_the_model_on_every_row_masked(segment, dropout):
    """The loss runs the LSTM in segments over the rows not yet padding, and the heads on the
    real steps only; its gradients are those of the whole B x T batch with the padding masked."""
    batch = _batch()
    fast = _model(dropout=dropout)
    fast.segment = segment
    torch.manual_seed(5)  # the same dropout masks
    fast.loss(batch)["loss"].backward()
    full = _model(dropout=dropout)
    torch.manual_seed(5)
    p, _ = full(batch["z"], batch["action"])
    mask = batch["mask"]
    z_mask = (mask[:, :-1] & mask[:, 1:]).float()
    logp = full.z_log_prob({k: v[:, :-1] for k, v in p.items()}, batch["z"][:, 1:])
    valid = mask.float()
    bce = F.binary_cross_entropy_with_logits(p["done_logit"], batch["terminated"].float(),
                                             pos_weight=torch.tensor(4.0), reduction="none")
    loss = ((-logp / Z * z_mask).sum() / z_mask.sum()
            + (((p["reward"] - batch["reward"]) ** 2) * valid).sum() / valid.sum()
            + (bce * valid).sum() / valid.sum())
    loss.backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), full.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_loss_of_windows_with_no_real_step_is_zero():
    m, batch = _model(), _batch()
    batch["mask"][:] = False
    terms = m.loss(batch)
    for key in ("loss", "z_nll", "reward", "done"):
        assert terms[key].item() == 0.0
