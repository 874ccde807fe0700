"""watch: dream and side-by-side videos, and playing the dream with (synthetic) keys."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from agents.controller import ControllerSpec, save_controller
from agents.watch import LABEL_H, SCALE, compare_episode, comparison_video_frames, watch
from worldmodel.episodes import episode_path, load_episode, save_episode
from worldmodel.errors import UserError
from worldmodel.m import build_m
from worldmodel.runs import open_run
from worldmodel.train_m import save_m
from worldmodel.vae import ConvVAE, encode_frames, save_vae

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
T = 12


def make_run(root: Path, done_bias: float = -10.0, controller: bool = True):
    """A tiny run without training: random frames, random V, M and C (done_bias sets P(done))."""
    run = open_run(root / "run", SMOKE, overrides=["system.device=cpu"])
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vae = ConvVAE(run.cfg.vae.z_dim).eval()
    with torch.no_grad():  # a fresh V decodes every z to grey; louder weights make z visible
        vae.fc_decode.weight.mul_(10)
        vae.decoder[-2].weight.mul_(10)
    save_vae(run.vae_path, vae)
    for i in range(2):
        done = np.zeros(T, bool)
        done[-1] = True
        ep = {"obs": rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
              "action": rng.uniform(-1, 1, (T, 1)).astype(np.float32),
              "reward": np.ones(T, np.float32), "done": done, "terminated": done.copy()}
        save_episode(episode_path(run.episodes_dir, i), ep)
        mu, logvar = encode_frames(vae, ep["obs"], 32)
        save_episode(episode_path(run.latents_dir, i), {"mu": mu, "logvar": logvar, **{
            k: ep[k] for k in ("action", "reward", "done", "terminated")}})
    m = build_m(run.cfg, run.cfg.vae.z_dim, 1)
    with torch.no_grad():
        m.head.bias[-1] = done_bias
    save_m(run.m_path, m, dataclasses.asdict(run.cfg.model))
    if controller:
        spec = ControllerSpec.for_env("takecover", m.feature_dim(run.cfg.controller.features))
        save_controller(run.controller_path, rng.standard_normal(spec.num_params).astype(np.float32),
                        {"env": "takecover"})
    return run


def args(**kw):
    base = {"episodes": 1, "temperature": None, "steps": None, "out": None, "play": False, "quiet": True}
    return SimpleNamespace(**{**base, **kw})


def video_frames(path: str) -> np.ndarray:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([f for f in reader.iter_data()])


def test_watch_writes_dream_and_side_by_side_videos(tmp_path):
    run = make_run(tmp_path)
    out = watch(run, args(steps=8, temperature=0.7))
    assert out["temperature"] == 0.7
    # The dream: z_0 and 8 steps (M's done head is off), 256×256, and it moves.
    (dream,) = out["dream_videos"]
    assert out["dream_frames"] == [9] and out["dream_scores"] == [8.0]
    frames = video_frames(dream)
    assert frames.shape == (9, 64 * SCALE, 64 * SCALE, 3)
    assert np.abs(frames[1:].astype(int) - frames[:-1]).mean() > 1.0
    with Image.open(Path(dream).with_suffix(".gif")) as gif:
        assert gif.size == (256, 256) and gif.n_frames == 9
    # The side by side: the whole 12-step episode (8 is the cap: --steps), three columns.
    (compare,) = out["compare_videos"]
    assert out["compare_frames"] == [8]
    frames = video_frames(compare)
    assert frames.shape == (8, LABEL_H + 256, 3 * 256, 3)
    assert not list(Path(out["out"]).glob(".*.tmp"))  # atomic writes left nothing behind


def test_side_by_side_real_column_is_the_episode(tmp_path):
    run = make_run(tmp_path, controller=False)
    from agents.watch import load_vae_for
    from envs.dream import load_world_model

    ep = load_episode(episode_path(run.episodes_dir, 0))
    vae, m = load_vae_for(run), load_world_model(run)
    cmp = compare_episode(vae, m, ep["obs"], ep["action"], 1.0, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(cmp.real, ep["obs"])
    # Step 0 of the dream is V's view of the real first frame; later it is M's alone.
    np.testing.assert_array_equal(cmp.dream[0], cmp.recon[0])
    assert np.abs(cmp.dream[1:].astype(int) - cmp.recon[1:]).mean() > 0.5
    frames = comparison_video_frames(cmp, 1.0)
    assert frames.shape == (T, LABEL_H + 256, 768, 3)
    real_col = frames[:, LABEL_H:, :256]
    np.testing.assert_array_equal(real_col[:, ::SCALE, ::SCALE], ep["obs"])
    np.testing.assert_array_equal(real_col, ep["obs"].repeat(SCALE, 1).repeat(SCALE, 2))
    np.testing.assert_array_equal(frames[:, LABEL_H:, 256:512:][:, ::SCALE, ::SCALE], cmp.recon)
    np.testing.assert_array_equal(frames[:, LABEL_H:, 512:][:, ::SCALE, ::SCALE], cmp.dream)
    assert frames[:, :LABEL_H].max() > 0  # labels drawn in the strip


def test_dream_ends_on_done_and_without_controller_only_side_by_side(tmp_path):
    run = make_run(tmp_path, done_bias=10.0)
    out = watch(run, args(steps=50))
    assert out["dream_frames"] == [2]  # z_0, then M says done after the first step
    run.controller_path.unlink()
    out = watch(run, args(steps=5, out=str(tmp_path / "v")))
    assert "python run.py dream" in out["dream_videos"]
    assert Path(out["compare_videos"][0]).parent == tmp_path / "v"


@pytest.mark.parametrize("missing, command", [("vae.pt", "train-vae"), ("m.pt", "train-rnn"),
                                              ("episodes", "collect")])
def test_missing_pieces_name_the_command(tmp_path, missing, command):
    run = make_run(tmp_path)
    target = run.dir / missing
    if target.is_dir():
        for p in target.iterdir():
            p.unlink()
    else:
        target.unlink()
    with pytest.raises(UserError, match=f"run.py {command}"):
        watch(run, args(steps=3))


def test_bad_temperature_is_a_user_error(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(UserError, match="temperature"):
        watch(run, args(temperature=-1.0))


def test_play_headless_follows_the_keys(tmp_path, monkeypatch):
    pygame = pytest.importorskip("pygame")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    from agents.play import make_player, run_window

    run = make_run(tmp_path)
    player = make_player(run, temperature=1.0, steps=100)
    pygame.display.init()
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_LEFT))
    out = run_window(player, fps=1000, max_frames=3)
    assert out["steps"] == 3 and player.t == 3
    np.testing.assert_array_equal(player.last_action, [-1.0])
    first = player.frame()

    pygame.display.init()
    for event in (pygame.event.Event(pygame.KEYUP, key=pygame.K_LEFT),
                  pygame.event.Event(pygame.KEYDOWN, key=pygame.K_RIGHT)):
        pygame.event.post(event)
    run_window(player, fps=1000, max_frames=2)
    assert player.t == 5
    np.testing.assert_array_equal(player.last_action, [1.0])
    assert player.frame().shape == (256, 256, 3) and not np.array_equal(first, player.frame())

    player.handle_event(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_r))
    assert player.t == 0 and player.dreams == 2 and player.summary()["scores"] == [5.0]
    player.handle_event(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_ESCAPE))
    assert not player.running


def test_play_carracing_keys():
    from agents.play import keyboard_action

    np.testing.assert_allclose(keyboard_action("carracing", {"left", "up"}), [-1.0, 1.0, 0.0])
    np.testing.assert_allclose(keyboard_action("carracing", {"right", "down"}), [1.0, 0.0, 0.8])
    np.testing.assert_allclose(keyboard_action("takecover", {"left", "right"}), [0.0])


def test_watch_command_line(tmp_path):
    run = make_run(tmp_path)
    result = subprocess.run([sys.executable, "run.py", "watch", "--run", str(run.dir), "--steps", "4",
                             "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dream_videos" in result.stdout and (run.dir / "videos" / "dream_tau1.15_00.mp4").exists()


@pytest.mark.slow
def test_watch_and_plot_on_a_smoke_run(tmp_path):
    """The real stages on configs/smoke.yaml, then watch and plot (about a minute)."""
    run_dir = tmp_path / "smoke"
    log = open(tmp_path / "log.txt", "w")  # not a pipe: game processes may outlive a stage
    for command in ("collect", "train-vae", "train-rnn", "dream", "watch", "plot"):
        extra = ["--config", str(SMOKE)] if command == "collect" else []
        result = subprocess.run([sys.executable, "run.py", command, "--run", str(run_dir), "--quiet", *extra],
                                cwd=ROOT, stdout=log, stderr=log, timeout=600)
        assert result.returncode == 0, (tmp_path / "log.txt").read_text()[-2000:]
    videos = run_dir / "videos"
    assert list(videos.glob("dream_tau*.mp4")) and list(videos.glob("compare_ep*.gif"))
    assert all((run_dir / "plots" / f"{s}.png").exists() for s in ("vae", "m", "dream"))
