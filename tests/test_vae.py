"""V: shapes, the loss against torch.distributions, training, weights files, train-vae end to end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from worldmodel.episodes import episode_path, load_episode, save_episode
from worldmodel.errors import UserError
from worldmodel.frames import cache_paths, load_frames
from worldmodel.io import load_checkpoint, read_jsonl
from worldmodel.runs import open_run
from worldmodel.train_vae import checkpoint_path, split_frames, train_vae
from worldmodel.vae import (
    ConvVAE,
    VectorConvTranspose2d,
    colour_bins,
    colour_weights,
    load_vae,
    pixel_weights,
    preprocess,
    save_vae,
    vae_loss,
)

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
Z = 8


def patterns() -> np.ndarray:
    """Four simple frames: (4, 64, 64, 3) uint8."""
    p = np.zeros((4, 64, 64, 3), np.uint8)
    p[0, :32] = 255
    p[1, :, :32] = 255
    p[2, ..., 0] = 255
    p[3, 16:48, 16:48] = 200
    return p


# ----------------------------------------------------------------- network and loss

def test_shapes():
    vae = ConvVAE(Z)
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    x = preprocess(frames)
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[2, 1], torch.from_numpy(frames[2, :, :, 1]).float() / 255)
    assert vae.encoder(x).shape == (5, 1024)
    recon, mu, logvar = vae(x)
    assert recon.shape == (5, 3, 64, 64) and mu.shape == (5, Z) and logvar.shape == (5, Z)
    assert vae.decode(mu).shape == (5, 3, 64, 64)
    assert 0.0 <= recon.min() and recon.max() <= 1.0


def test_vector_conv_transpose_is_the_convolution():
    torch.manual_seed(0)
    layer = VectorConvTranspose2d(16, 4, 5, stride=2)
    x = torch.randn(3, 16, 1, 1, requires_grad=True)
    ours = layer(x)
    theirs = F.conv_transpose2d(x, layer.weight, layer.bias, stride=2)
    assert ours.shape == theirs.shape == (3, 4, 5, 5)
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.autograd.grad(ours.square().sum(), (x, layer.weight, layer.bias))
    g_theirs = torch.autograd.grad(theirs.square().sum(), (x, layer.weight, layer.bias))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)
    big = torch.randn(2, 16, 3, 3)  # not 1×1: the ordinary convolution
    torch.testing.assert_close(layer(big), F.conv_transpose2d(big, layer.weight, layer.bias, stride=2))


def test_loss_terms_match_independent_computation():
    torch.manual_seed(0)
    x, recon = torch.rand(6, 3, 64, 64), torch.rand(6, 3, 64, 64)
    mu, logvar = torch.randn(6, Z), torch.randn(6, Z)
    terms = vae_loss(x, recon, mu, logvar, kl_tolerance=0.0, beta=2.5)
    expected_recon = F.mse_loss(recon, x, reduction="sum") / 6
    expected_kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(terms["recon"], expected_recon)
    torch.testing.assert_close(terms["kl"], expected_kl)
    torch.testing.assert_close(terms["kl_raw"], expected_kl)
    torch.testing.assert_close(terms["loss"], expected_recon + 2.5 * expected_kl)


def test_free_bits_floor_per_image():
    x = torch.zeros(2, 3, 64, 64)
    mu = torch.zeros(2, Z)
    mu[1] = 3.0  # image 1: KL = Z * 9 / 2 = 36, above the floor; image 0: KL = 0, below it
    logvar = torch.zeros(2, Z)
    terms = vae_loss(x, x, mu, logvar, kl_tolerance=0.5, beta=1.0)
    floor = 0.5 * Z
    torch.testing.assert_close(terms["kl_raw"], torch.tensor(36.0 / 2))
    torch.testing.assert_close(terms["kl"], torch.tensor((floor + 36.0) / 2))
    torch.testing.assert_close(terms["loss"], terms["kl"])  # recon of x by x is 0
    # the floor passes no gradient to mu of the image below it
    mu.requires_grad_(True)
    vae_loss(x, x, mu, logvar, 0.5, 1.0)["loss"].backward()
    assert torch.all(mu.grad[0] == 0) and torch.all(mu.grad[1] != 0)


def test_weighted_recon_is_the_weighted_squared_error():
    torch.manual_seed(0)
    x, recon = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    mu, logvar = torch.randn(3, Z), torch.randn(3, Z)
    weight = torch.rand(3, 1, 64, 64) * 5
    terms = vae_loss(x, recon, mu, logvar, kl_tolerance=0.0, beta=1.0, weight=weight)
    per_image = [(weight[i] * (x[i] - recon[i]) ** 2).sum() for i in range(3)]
    torch.testing.assert_close(terms["recon"], torch.stack(per_image).mean())
    torch.testing.assert_close(terms["recon_raw"], F.mse_loss(recon, x, reduction="sum") / 3)
    torch.testing.assert_close(terms["loss"], terms["recon"] + terms["kl"])
    plain = vae_loss(x, recon, mu, logvar, kl_tolerance=0.0, beta=1.0)
    torch.testing.assert_close(plain["recon"], plain["recon_raw"])


def test_colour_weights_favour_rare_colours():
    frames = np.zeros((10, 64, 64, 3), np.uint8)
    frames[...] = (128, 128, 128)  # a grey room ...
    frames[:, 30:32, 40:42] = (255, 230, 60)  # ... and a small bright fireball: 4 of 4096 pixels
    frames[:5, :16] = (120, 80, 40)  # half of the frames have a brown wall on top
    bins = colour_bins(frames)
    assert bins.shape == (10, 64, 64) and bins.max() < 512
    assert bins[0, 30, 40] == (7 * 8 + 7) * 8 + 1  # 255, 230, 60 >> 5 = 7, 7, 1

    flat = colour_weights(frames, gamma=0.0, max_weight=20.0)
    np.testing.assert_array_equal(flat, np.ones(512, np.float32))  # gamma 0: the paper's loss

    w = colour_weights(frames, gamma=0.5, max_weight=20.0)
    grey, brown, fire = w[bins[9, 0, 0]], w[bins[0, 0, 0]], w[bins[0, 30, 40]]
    assert fire > brown > grey
    per_pixel = w[bins]
    assert abs(per_pixel.mean() - 1.0) < 1e-5  # the mean weight over the pixels is 1
    share = np.bincount(bins.ravel(), minlength=512) / bins.size
    np.testing.assert_allclose(brown / grey, (share[bins[0, 0, 0]] / share[bins[9, 0, 0]]) ** -0.5, rtol=1e-5)
    capped = colour_weights(frames, gamma=0.5, max_weight=4.0)
    assert capped[bins[0, 30, 40]] / capped[bins[9, 0, 0]] == pytest.approx(4.0)
    assert capped.max() == pytest.approx(capped[bins[0, 30, 40]])  # unseen colours get the cap too

    table = torch.from_numpy(w)
    pw = pixel_weights(torch.from_numpy(frames[:2]), table)
    assert pw.shape == (2, 1, 64, 64)
    torch.testing.assert_close(pw[:, 0], table[torch.from_numpy(bins[:2])])
    torch.testing.assert_close(pixel_weights(frames[:2], table), pw)  # numpy frames alike


def test_training_drives_loss_down():
    torch.manual_seed(0)
    x = preprocess(patterns())
    vae = ConvVAE(4)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        terms = vae_loss(x, *vae(x), kl_tolerance=0.0, beta=1.0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert np.mean(losses[-10:]) < 0.1 * losses[0]


# ----------------------------------------------------------------- weights file

def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = ConvVAE(Z).eval()
    save_vae(tmp_path / "vae.pt", vae)
    loaded = load_vae(tmp_path / "vae.pt", Z, "cpu")
    x = preprocess(patterns())
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        mu2, logvar2 = loaded.encode(x)
        assert torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
        assert torch.equal(vae.decode(mu), loaded.decode(mu))
    assert set(torch.load(tmp_path / "vae.pt", weights_only=True)) == {"z_dim", "state_dict"}


def test_load_vae_wrong_z_dim_names_file(tmp_path):
    save_vae(tmp_path / "vae.pt", ConvVAE(Z))
    with pytest.raises(UserError, match=r"vae\.pt.*z_dim 8.*vae\.z_dim=16"):
        load_vae(tmp_path / "vae.pt", 16)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        load_vae(tmp_path / "junk.pt", Z)


# ----------------------------------------------------------------- train-vae on a run folder

def make_run(tmp_path: Path, episodes: int = 4, steps: int = 12, overrides: tuple[str, ...] = ()):
    run = open_run(tmp_path / "run", SMOKE, ["vae.batch_size=8", "vae.threads=1", "system.device=cpu",
                                             *overrides])
    rng = np.random.default_rng(1)
    for i in range(episodes):
        frames = patterns()[rng.integers(0, 4, steps)]
        done = np.zeros(steps, bool)
        done[-1] = True
        save_episode(episode_path(run.episodes_dir, i), {
            "obs": frames,
            "action": rng.standard_normal((steps, 3)).astype(np.float32),
            "reward": np.ones(steps, np.float32),
            "done": done,
            "terminated": done.copy(),
        })
    return run


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_vae_end_to_end(tmp_path, precision):
    run = make_run(tmp_path, overrides=(f"system.precision={precision}",))
    summary = train_vae(run, progress=False)
    assert summary["epochs_trained"] == 1 and summary["frames"] == 48
    assert summary["train_frames"] + summary["val_frames"] == 48 and summary["val_frames"] > 0
    assert summary["latents_written"] == 4 and np.isfinite(summary["val_loss"])

    vae = load_vae(run.vae_path, Z)
    for i in range(4):
        lat = np.load(episode_path(run.latents_dir, i))
        ep = load_episode(episode_path(run.episodes_dir, i))
        assert set(lat.files) == {"mu", "logvar", "action", "reward", "done", "terminated"}
        assert lat["mu"].shape == lat["logvar"].shape == (12, Z) and lat["mu"].dtype == np.float32
        for key in ("action", "reward", "done", "terminated"):
            np.testing.assert_array_equal(lat[key], ep[key])
        with torch.no_grad():
            mu, _ = vae.encode(preprocess(ep["obs"]))
        np.testing.assert_allclose(lat["mu"], mu.numpy(), rtol=1e-5, atol=1e-5)

    (record,) = read_jsonl(run.metrics_path("vae"))
    assert record["epoch"] == 1
    for key in ("train_recon", "train_kl", "train_loss", "val_recon", "val_kl", "val_loss", "img_per_s"):
        assert np.isfinite(record[key])
    assert (run.dir / "plots" / "vae_recon_epoch1.png").stat().st_size > 0
    ckpt = load_checkpoint(checkpoint_path(run))  # weights_only=True
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "torch_rng", "numpy_rng"} <= set(ckpt)

    again = train_vae(run, progress=False)  # everything done: nothing trained or re-encoded
    assert again["epochs_trained"] == 0 and again["latents_kept"] == 4 and again["latents_written"] == 0

    episode_path(run.episodes_dir, 3).unlink()  # its latents must not outlive it
    third = train_vae(run, progress=False)
    assert third["latents_removed"] == 1 and third["frames"] == 36
    assert not episode_path(run.latents_dir, 3).exists()


def test_resume_trains_only_new_epochs(tmp_path):
    run = make_run(tmp_path, episodes=2, steps=8)
    train_vae(run, progress=False)
    first_weights = run.vae_path.read_bytes()
    run2 = open_run(tmp_path / "run", None, overrides=["vae.epochs=2"])
    summary = train_vae(run2, progress=False)
    assert summary["epochs_trained"] == 1 and summary["latents_written"] == 2
    assert [r["epoch"] for r in read_jsonl(run2.metrics_path("vae"))] == [1, 2]
    assert load_checkpoint(checkpoint_path(run2))["epoch"] == 2
    assert run2.vae_path.read_bytes() != first_weights

    straight = make_run(tmp_path / "straight", episodes=2, steps=8, overrides=("vae.epochs=2",))
    train_vae(straight, progress=False)  # the same two epochs without a stop: the same weights
    resumed, uninterrupted = load_vae(run2.vae_path, Z), load_vae(straight.vae_path, Z)
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_kill_inside_an_epoch_resumes_at_its_last_checkpoint(tmp_path, monkeypatch):
    """vae.checkpoint_every_s: a rerun goes on from the batch the checkpoint reached, with the
    same batches after it as an unbroken epoch: the same weights and the same epoch record."""
    import worldmodel.train_vae as tv

    overrides = ("vae.checkpoint_every_s=0",)  # a checkpoint after every batch
    run = make_run(tmp_path, overrides=overrides)
    calls = {"n": 0}

    def dies_at_the_fourth_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return vae_loss(*args, **kwargs)

    monkeypatch.setattr(tv, "vae_loss", dies_at_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        train_vae(run, progress=False)
    ckpt = load_checkpoint(checkpoint_path(run))
    assert ckpt["epoch"] == 0 and ckpt["partial"]["epoch"] == 1 and ckpt["partial"]["batches"] == 3
    assert ckpt["partial"]["seen"] == 24 and not run.vae_path.exists()

    counted = {"n": 0}

    def counts(*args, **kwargs):
        counted["n"] += 1
        return vae_loss(*args, **kwargs)

    monkeypatch.setattr(tv, "vae_loss", counts)
    summary = train_vae(run, progress=False)
    batches = -(-summary["train_frames"] // 8)
    val_batches = -(-summary["val_frames"] // 8)
    assert counted["n"] == batches - 3 + val_batches  # the three batches done are not trained again
    assert "partial" not in load_checkpoint(checkpoint_path(run))

    monkeypatch.setattr(tv, "vae_loss", vae_loss)
    straight = make_run(tmp_path / "straight", overrides=overrides)
    train_vae(straight, progress=False)
    resumed, unbroken = load_vae(run.vae_path, Z), load_vae(straight.vae_path, Z)
    for (name, a), b in zip(resumed.state_dict().items(), unbroken.state_dict().values()):
        assert torch.equal(a, b), name
    (record,), (same,) = read_jsonl(run.metrics_path("vae")), read_jsonl(straight.metrics_path("vae"))
    assert record["train_loss"] == pytest.approx(same["train_loss"], rel=1e-6) and record["epoch"] == 1


def test_colour_balance_changes_what_v_learns(tmp_path):
    plain = make_run(tmp_path / "plain", episodes=2, steps=8)
    balanced = make_run(tmp_path / "balanced", episodes=2, steps=8, overrides=("vae.colour_balance=0.5",))
    train_vae(plain, progress=False)
    train_vae(balanced, progress=False)
    (p,), (b,) = read_jsonl(plain.metrics_path("vae")), read_jsonl(balanced.metrics_path("vae"))
    assert p["train_recon"] == pytest.approx(p["train_recon_raw"])
    assert b["train_recon"] != pytest.approx(b["train_recon_raw"], rel=1e-3)
    assert np.isfinite(b["val_recon_raw"]) and np.isfinite(b["val_recon"])
    assert plain.vae_path.read_bytes() != balanced.vae_path.read_bytes()


def test_max_frames_subsamples_train_and_val_alike(tmp_path):
    run = make_run(tmp_path, episodes=4, steps=10, overrides=("vae.max_frames=15", "vae.val_fraction=0.25"))
    train, val = split_frames(load_frames(run), run.cfg.vae)
    assert len(train) == 15 and len(val) == 5  # 30 and 10 frames, halved alike
    assert not set(train) & set(val)
    again = split_frames(load_frames(run), run.cfg.vae)
    np.testing.assert_array_equal(again[0], train)


def test_corrupt_episode_names_file_and_skip_bad_goes_on(tmp_path):
    run = make_run(tmp_path, episodes=3, steps=8)
    bad = episode_path(run.episodes_dir, 3)
    bad.write_bytes(episode_path(run.episodes_dir, 0).read_bytes()[:200])  # truncated
    with pytest.raises(UserError, match="ep_000003.npz"):
        train_vae(run, progress=False)
    with pytest.warns(UserWarning, match="ep_000003.npz"):
        summary = train_vae(run, skip_bad=True, progress=False)
    assert summary["skipped_episodes"] == 1 and summary["frames"] == 24
    assert not episode_path(run.latents_dir, 3).exists()
    with pytest.raises(UserError, match="ep_000003.npz"):  # the cache remembers it
        load_frames(run)


def test_no_episodes_is_a_user_error(tmp_path):
    run = make_run(tmp_path, episodes=0)
    with pytest.raises(UserError, match=r"episodes: no collected episodes; run `python run.py collect`"):
        train_vae(run, progress=False)


def test_frame_cache_follows_the_episode_set(tmp_path):
    run = make_run(tmp_path, episodes=2, steps=5)
    frames = load_frames(run)
    assert len(frames) == 10 and isinstance(frames.frames, np.memmap)
    np.testing.assert_array_equal(frames.episode_frames(1), load_episode(episode_path(run.episodes_dir, 1))["obs"])
    index_mtime = cache_paths(run)[1].stat().st_mtime_ns
    assert len(load_frames(run)) == 10 and cache_paths(run)[1].stat().st_mtime_ns == index_mtime  # reused
    save_episode(episode_path(run.episodes_dir, 2), load_episode(episode_path(run.episodes_dir, 0)))
    frames = load_frames(run)
    assert len(frames) == 15 and len(frames.episodes) == 3
    np.testing.assert_array_equal(frames.frame_indices(np.array([0, 2])), [0, 1, 2, 3, 4, 10, 11, 12, 13, 14])


# ----------------------------------------------------------------- scripts/takecover_fireballs.py

def _fireballs_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "takecover_fireballs.py"
    spec = importlib.util.spec_from_file_location("takecover_fireballs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fireball_recall_counts_kept_pixels_by_size():
    fireballs = _fireballs_script()
    frames = np.full((3, 64, 64, 3), 100, np.uint8)
    frames[0, 10, 10:14] = (250, 220, 80)  # 4 pixels: a distant fireball
    frames[1, 20:25, 20:25] = (250, 220, 80)  # 25 pixels
    recon = frames.copy()
    recon[0] = 100  # the distant one is lost
    recon[1, 20:25, 20] = (140, 110, 60)  # 5 of the 25 fade below the kept threshold
    out = fireballs.fireball_recall(frames, recon)
    assert out == {"1-9": (1, 0.0, 0.0), "10-29": (1, pytest.approx(0.8), 1.0)}  # frame 2 has none


def test_fireballs_script_runs_on_a_run(tmp_path):
    import subprocess
    import sys

    run = make_run(tmp_path, episodes=3, steps=8)
    train_vae(run, progress=False)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "scripts/takecover_fireballs.py", "--run", str(run.dir), "--frames", "5"],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "5 frames of 1 validation episodes (of 3)" in result.stdout and str(run.vae_path) in result.stdout
    # episodes collected after V (iterate) are not V's validation split: the output stays the same
    newer = episode_path(run.episodes_dir, 3)
    save_episode(newer, load_episode(episode_path(run.episodes_dir, 0)))
    os.utime(newer, ns=(run.vae_path.stat().st_mtime_ns + 10**9,) * 2)
    again = subprocess.run([sys.executable, "scripts/takecover_fireballs.py", "--run", str(run.dir), "--frames", "5"],
                           cwd=root, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == result.stdout
    bad = subprocess.run([sys.executable, "scripts/takecover_fireballs.py", "--run", str(tmp_path / "nope")],
                         cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
