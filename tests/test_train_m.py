"""train-rnn end to end on a tiny synthetic run, M's weights file, and the done-head metrics."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.errors import UserError
from worldmodel.io import read_jsonl, save_checkpoint
from worldmodel.latents import (
    Latents,
    lanes,
    load_latents,
    make_batch,
    split_episodes,
    windows,
    with_done_horizon,
)
from worldmodel.m import build_m
from worldmodel.runs import open_run
from worldmodel.torch_utils import cpu_has_native_bf16
from worldmodel.train_m import NEEDS_V, _pass, done_quality, load_m, save_m, train_m

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
Z, A = 8, 3
LENGTHS = (40, 25, 60, 33, 50, 18)


def _write_latents(folder: Path, lengths=LENGTHS, z_dim: int = Z, seed: int = 0, action_dim: int = A) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        done = np.zeros(n, dtype=bool)
        done[-1] = True
        terminated = done.copy() if i % 3 else np.zeros(n, dtype=bool)  # every third one truncated
        np.savez_compressed(
            folder / f"ep_{i:06d}.npz",
            mu=rng.standard_normal((n, z_dim)).astype(np.float32),
            logvar=np.full((n, z_dim), -2.0, dtype=np.float32),
            action=rng.uniform(-1, 1, (n, action_dim)).astype(np.float32),
            reward=np.ones(n, dtype=np.float32),
            done=done,
            terminated=terminated,
        )


def _run(tmp_path: Path, overrides: list[str] | None = None, vae: bool = True, latents: bool = True,
         name: str = "run"):
    run = open_run(tmp_path / name, SMOKE, overrides=["system.device=cpu", *(overrides or [])])
    if latents:
        _write_latents(run.latents_dir)
    if vae:
        save_checkpoint(run.vae_path, {"z_dim": Z, "state_dict": {}})
    return run


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_m_end_to_end(tmp_path, capsys, precision):
    run = _run(tmp_path, overrides=[f"system.precision={precision}"])
    summary = train_m(run)
    assert run.m_path.exists() and (run.dir / "m_ckpt.pt").exists()
    records = read_jsonl(run.metrics_path("m"))
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train/z_nll", "train/reward", "train/done", "train/loss", "val/z_nll", "val/reward",
                "val/done", "val/loss", "done_precision", "done_recall", "false_early_death_rate"):
        assert key in records[-1] and key in summary
    assert records[-1]["done_eval_split"] == "val" and summary["val_episodes"] >= 1
    assert 0.0 <= summary["false_early_death_rate"] <= 1.0
    out = capsys.readouterr().out
    assert "false early deaths" in out
    # Without AVX-512 BF16 or AMX, oneDNN has no bfloat16 LSTM: M falls back to float32, and says so.
    assert ("M trains in float32" in out) == (precision == "bfloat16" and not cpu_has_native_bf16())
    m = load_m(run.m_path, run.cfg, Z, A)
    assert m.feature_dim(run.cfg.controller.features) == Z + run.cfg.model.hidden


def test_bfloat16_on_a_cpu_without_it_trains_m_in_float32(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("worldmodel.train_m.cpu_has_native_bf16", lambda: False)
    run = _run(tmp_path, overrides=["system.precision=bfloat16", "model.epochs=1"])
    summary = train_m(run)
    assert "M trains in float32" in capsys.readouterr().out
    assert summary["epoch"] == 1 and np.isfinite(summary["train/loss"])


def test_resume_continues_after_last_epoch(tmp_path, capsys):
    run = _run(tmp_path, overrides=["model.epochs=1"])
    train_m(run)
    first_weights = torch.load(run.m_path, weights_only=True)["state_dict"]
    resumed = open_run(run.dir, None, overrides=["model.epochs=3"])
    summary = train_m(resumed)
    assert "after epoch 1" in capsys.readouterr().out
    assert [r["epoch"] for r in read_jsonl(run.metrics_path("m"))] == [1, 2, 3]
    assert summary["epoch"] == 3
    ckpt = torch.load(run.dir / "m_ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and isinstance(ckpt["torch_rng"], torch.Tensor)
    final = torch.load(run.m_path, weights_only=True)["state_dict"]
    assert any(not torch.equal(first_weights[k], final[k]) for k in final)
    again = train_m(resumed)  # nothing left to do: reports the stored model
    assert again["epoch"] == 3 and len(read_jsonl(run.metrics_path("m"))) == 3


def test_finished_training_keeps_an_m_pt_written_after_its_checkpoint(tmp_path, capsys):
    # `select` may put back an earlier M that its controller was checked with (agents/select.py):
    # a rerun with nothing to train must not overwrite it with the checkpoint's M ...
    run = _run(tmp_path, overrides=["model.epochs=1"])
    train_m(run)
    earlier = build_m(run.cfg, Z, A)
    save_m(run.m_path, earlier, dataclasses.asdict(run.cfg.model))
    selected = run.m_path.read_bytes()
    train_m(run)
    assert run.m_path.read_bytes() == selected and "m.pt kept" in capsys.readouterr().out
    # ... but an m.pt older than the checkpoint (killed between the two writes) is written again.
    ckpt = run.dir / "m_ckpt.pt"
    stamp = run.m_path.stat().st_mtime_ns
    os.utime(ckpt, ns=(stamp + 10**9, stamp + 10**9))
    train_m(run)
    restored = torch.load(run.m_path, weights_only=True)["state_dict"]
    trained = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(restored[k], trained[k]) for k in trained)
    assert any(not torch.equal(restored[k], earlier.state_dict()[k]) for k in trained)


def _strip_seconds(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "m_path")} for r in records]


def test_m_files_trained_side_by_side_are_those_trained_one_after_another(tmp_path, capsys):
    overrides = ["model.ensemble=3", "model.hazard_horizon=4", "env.name=carracing"]  # carracing: three actions
    alone = _run(tmp_path, [*overrides, "model.workers=1"], name="alone")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same kernels, so the same rounding
    try:
        first = train_m(alone)
    finally:
        torch.set_num_threads(threads)
    assert "side by side" not in capsys.readouterr().out
    pooled = _run(tmp_path, [*overrides, "model.workers=2"], name="pooled")
    second = train_m(pooled)
    assert "4 M's in 2 processes side by side" in capsys.readouterr().out
    assert _strip_seconds([first]) == _strip_seconds([second])
    for k, name in enumerate(("m", "m1", "m2", "m3")):
        a = torch.load(alone.member_path(k), weights_only=True)["state_dict"]
        b = torch.load(pooled.member_path(k), weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
        assert _strip_seconds(read_jsonl(alone.metrics_path(name))) == _strip_seconds(read_jsonl(pooled.metrics_path(name)))
    heads = [torch.load(pooled.member_path(k), weights_only=True)["state_dict"]["head.weight"] for k in range(2)]
    assert not torch.equal(heads[0], heads[1])  # each its own seed
    # Run again with nothing left to train: the workers report the stored M's.
    assert train_m(pooled)["epoch"] == 2 and len(read_jsonl(pooled.metrics_path("m3"))) == 2


def test_a_user_error_in_a_worker_is_one_clear_error(tmp_path, capsys):
    run = _run(tmp_path, ["model.ensemble=2", "model.workers=2", "model.epochs=1", "env.name=carracing"])
    save_checkpoint(run.dir / "m1_ckpt.pt", {"epoch": 1})  # left by something else
    with pytest.raises(UserError, match="m1_ckpt.pt: not an M training checkpoint; delete it"):
        train_m(run)
    assert "Traceback" not in capsys.readouterr().err


def test_member_processes_one_per_core_and_m_file_on_a_cpu_only(tmp_path, monkeypatch):
    from worldmodel.train_m import member_processes

    monkeypatch.setattr("worldmodel.train_m.available_cores", lambda: 2)
    cfg = _run(tmp_path, latents=False, vae=False).cfg
    cpu = torch.device("cpu")
    assert member_processes(cfg, cpu, 1) == 1  # one M: this process, every thread
    assert member_processes(cfg, cpu, 4) == 2 and member_processes(cfg, cpu, 2) == 2
    assert member_processes(cfg, cpu, 3) == 1  # full rounds only: no M left alone on one thread
    assert member_processes(cfg, torch.device("cuda"), 4) == 1
    cfg.model.workers = 8
    assert member_processes(cfg, cpu, 3) == 3  # never more processes than M files
    assert member_processes(cfg, cpu, 6) == 6 and member_processes(cfg, cpu, 7) == 7
    cfg.model.workers = 4
    assert member_processes(cfg, cpu, 6) == 3 and member_processes(cfg, cpu, 5) == 1
    cfg.model.workers = 1
    assert member_processes(cfg, cpu, 4) == 1


def test_train_rnn_before_train_vae_is_user_error(tmp_path):
    with pytest.raises(UserError, match="run `python run.py train-vae` first"):
        train_m(_run(tmp_path, vae=False, latents=False))
    with pytest.raises(UserError) as exc:
        train_m(_run(tmp_path, vae=True, latents=False, name="run2"))
    assert str(exc.value) == NEEDS_V


def test_vae_z_dim_mismatch_names_file_and_sizes(tmp_path):
    run = _run(tmp_path)
    save_checkpoint(run.vae_path, {"z_dim": 16, "state_dict": {}})
    with pytest.raises(UserError, match=r"vae\.pt: V has z_dim 16, config vae\.z_dim is 8"):
        train_m(run)


def test_corrupt_latent_file_is_named_or_skipped(tmp_path):
    run = _run(tmp_path, overrides=["model.epochs=1"])
    bad = run.latents_dir / "ep_000002.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="ep_000002.npz"):
        train_m(run)
    with pytest.warns(UserWarning, match="ep_000002.npz"):
        summary = train_m(run, skip_bad=True)
    assert summary["train_episodes"] + summary["val_episodes"] == len(LENGTHS) - 1


def test_save_load_round_trip_and_size_mismatch(tmp_path):
    run = _run(tmp_path, latents=False, vae=False)
    torch.manual_seed(0)
    m = build_m(run.cfg, Z, A)
    path = tmp_path / "m.pt"
    save_m(path, m, {"m": "mdnrnn"})
    loaded = load_m(path, run.cfg, Z, A)
    z, a = torch.randn(5, Z), torch.randn(5, A)
    outs = [mod.imagine_step(mod.initial_state(5), z, a, 1.0, torch.Generator().manual_seed(0))
            for mod in (m, loaded)]
    for x, y in zip(outs[0][1:], outs[1][1:], strict=True):
        assert torch.equal(x, y)
    with pytest.raises(UserError, match=r"m\.pt: M was trained with z_dim 8, expected 9"):
        load_m(path, run.cfg, 9, A)
    with pytest.raises(UserError, match=r"m\.pt: M was trained with action_dim 3, expected 2"):
        load_m(path, run.cfg, Z, 2)
    bigger = open_run(run.dir, None, overrides=["model.hidden=64"]).cfg
    with pytest.raises(UserError, match=r"m\.pt: .*shape"):
        load_m(path, bigger, Z, A)


def test_windows_cover_every_step_once_and_batches_pad(tmp_path):
    _write_latents(tmp_path)
    data = load_latents(tmp_path, Z)
    for rng in (None, np.random.default_rng(0)):
        starts, lengths = windows(data, 16, rng)
        assert lengths.max() <= 16 and lengths.min() >= 1
        covered = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        assert np.array_equal(np.sort(covered), np.arange(len(data.mu)))
    batch = make_batch(data, data.mu, starts[:4], lengths[:4], 16)
    assert batch["z"].shape == (4, 16, Z) and batch["mask"].sum() == int(lengths[:4].sum())
    assert not batch["z"][~batch["mask"]].any()
    train, val = split_episodes(len(LENGTHS), 0.25, seed=0)
    assert len(val) == 2 and set(train) | set(val) == set(range(len(LENGTHS)))
    assert np.array_equal(val, split_episodes(len(LENGTHS), 0.25, seed=0)[1])


def test_batches_give_each_steps_index_in_its_episode(tmp_path):
    _write_latents(tmp_path)
    data = load_latents(tmp_path, Z)
    starts, lengths = windows(data, 16, np.random.default_rng(3))
    batch = make_batch(data, data.mu, starts, lengths, 16)
    episode = np.searchsorted(data.starts, starts, side="right") - 1
    for row in range(len(starts)):
        first = starts[row] - data.starts[episode[row]]
        assert batch["step"][row].tolist() == list(range(first, first + 16))


def test_lanes_play_every_episode_whole_and_in_order(tmp_path):
    _write_latents(tmp_path)
    data = load_latents(tmp_path, Z)
    starts, lengths, first = lanes(data, 16, 3, np.random.default_rng(0))
    assert starts.shape == lengths.shape == first.shape and starts.shape[1] == 3
    covered = np.concatenate([np.arange(s, s + n) for s, n in zip(starts.ravel(), lengths.ravel(), strict=True)])
    assert np.array_equal(np.sort(covered), np.arange(len(data.mu)))
    for lane in range(3):
        for s in range(1, len(starts)):
            if lengths[s, lane] and not first[s, lane]:  # the next window of the same episode
                assert starts[s, lane] == starts[s - 1, lane] + 16 and lengths[s - 1, lane] == 16
            if lengths[s, lane] and first[s, lane]:
                assert starts[s, lane] in data.starts
    assert first[0].all()
    assert len(starts) <= -(-sum(-(-n // 16) for n in LENGTHS) // 3) + 2  # lanes about equally long


@pytest.mark.parametrize("carry", [False, True])
def test_a_carried_state_lets_m_learn_how_long_the_game_has_run(carry):
    """Every game ends at step 40 and nothing on screen tells (z is noise).  From windows of 8
    steps, each from a zero state, M cannot know how far into the game it is; with the state
    carried from window to window (``model.carry_state``) it learns that the end is near."""
    from worldmodel import config as config_lib
    from worldmodel.mdnrnn import MDNRNN

    n, length = 16, 40
    terminated = np.zeros(n * length, dtype=bool)
    terminated[length - 1::length] = True
    data = Latents(np.zeros((n * length, Z), np.float32), np.zeros((n * length, Z), np.float32),
                   np.zeros((n * length, A), np.float32), np.zeros(n * length, np.float32), terminated,
                   np.arange(n) * length, np.full(n, length), [])
    cfg = config_lib.apply_overrides(config_lib.Config(), [
        "model.seq_len=8", "model.batch_size=16", f"model.carry_state={str(carry).lower()}"])
    torch.manual_seed(0)
    m = MDNRNN(Z, A, 16, 3, predict_reward=False, done_pos_weight=4.0)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for epoch in range(80):
        rng = np.random.default_rng(epoch)
        _pass(m, data, rng.standard_normal(data.mu.shape).astype(np.float32), cfg, torch.device("cpu"), rng, opt, "t")
    state, p_done, g = m.initial_state(1), [], torch.Generator().manual_seed(0)
    for _ in range(length):
        state, _, _, p = m.imagine_step(state, torch.randn(1, Z, generator=g), torch.zeros(1, A), 0.0)
        p_done.append(p.item())
    end, middle = np.mean(p_done[-3:]), np.mean(p_done[5:30])
    if carry:
        assert end > 3 * middle
    else:
        assert end < 1.5 * middle


class _AlwaysDies(torch.nn.Module):
    """A stub M whose done head says "dead" from the first step on."""

    def initial_state(self, batch_size: int):
        return (torch.zeros(batch_size, 1),)

    def imagine_step(self, state, z, action, temperature, generator=None):
        b = z.shape[0]
        return state, z, torch.zeros(b), torch.ones(b)


def test_done_quality_counts_steps_and_early_deaths():
    lengths = np.array([10, 30, 50])
    terminated = np.zeros(90, dtype=bool)
    terminated[[9, 39]] = True  # the first two die, the third is truncated
    starts = np.array([0, 10, 40])
    data = Latents(np.zeros((90, Z), np.float32), np.zeros((90, Z), np.float32),
                   np.zeros((90, A), np.float32), np.zeros(90, np.float32), terminated, starts, lengths, [])
    q = done_quality(_AlwaysDies(), data, 0.5, torch.device("cpu"))
    assert q["done_precision"] == pytest.approx(2 / 90)
    assert q["done_recall"] == 1.0
    assert q["false_early_death_rate"] == pytest.approx(2 / 3)  # 30 and 50 steps: first death too early


class _Counting(torch.nn.Module):
    """A stub M whose P(done) after step t is (t + 1) / 100."""

    def initial_state(self, batch_size: int):
        return (torch.zeros(batch_size),)

    def imagine_step(self, state, z, action, temperature, generator=None):
        count = state[0] + 1
        return (count,), z, torch.zeros_like(count), count / 100


def test_done_quality_reports_the_warning_before_each_death():
    lengths = np.array([10, 30, 50])
    terminated = np.zeros(90, dtype=bool)
    terminated[[9, 39]] = True  # the first two die at their last step, the third is truncated
    data = Latents(np.zeros((90, Z), np.float32), np.zeros((90, Z), np.float32), np.zeros((90, A), np.float32),
                   np.zeros(90, np.float32), terminated, np.array([0, 10, 40]), lengths, [])
    q = done_quality(_Counting(), data, 0.5, torch.device("cpu"))
    # deaths at steps 9 and 29 of their episodes; the truncated episode does not count
    for k in (0, 1, 3, 6):
        assert q[f"done_p_{k}_before_death"] == pytest.approx(((10 - k) + (30 - k)) / 2 / 100), k


def test_done_horizon_marks_the_steps_before_each_death_within_its_episode():
    lengths = np.array([3, 6, 4])
    terminated = np.zeros(13, dtype=bool)
    terminated[[2, 8]] = True  # episodes 0 and 1 die at their last step; episode 2 is cut short
    data = Latents(np.zeros((13, Z), np.float32), np.zeros((13, Z), np.float32), np.zeros((13, A), np.float32),
                   np.zeros(13, np.float32), terminated, np.array([0, 3, 9]), lengths, [])
    assert with_done_horizon(data, 1) is data
    wide = with_done_horizon(data, 4)
    assert wide.terminated.tolist() == [True, True, True,            # only 3 steps: stops at its start
                                        False, False, True, True, True, True,
                                        False, False, False, False]
    assert data.terminated.sum() == 2  # the original is untouched
    assert np.array_equal(wide.mu, data.mu) and np.array_equal(wide.lengths, data.lengths)

