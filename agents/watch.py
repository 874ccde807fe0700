"""`python run.py watch`: look at the dream — C dreaming, and M's dream beside reality.

Two kinds of video land in ``--out`` (default ``<run>/videos``), each as MP4 and GIF:

- ``dream_tau{τ}_{i}.mp4``: the trained controller acts in M's dream (the same
  :class:`envs.dream.DreamEnv` that CMA-ES evolves it in), started from V's posterior at
  the first frame of a real episode, at temperature τ.  Every z_t is decoded by V; the
  step, τ and the running score are drawn on the frame.  The dream ends when M says
  done (``cmaes.done`` / ``cmaes.done_threshold``) or after ``--steps``.
- ``compare_ep{N}_tau{τ}.mp4``: three columns over one stored episode: the real frames,
  V's reconstruction of each (decode(μ)), and M's *open-loop* dream: z_0 = μ of the first
  real frame, then ``imagine_step`` with the episode's recorded actions, never seeing a
  real frame again.  Where the third column parts from the first, the dream has drifted.
  Episodes M held out from training are shown first.

``--play`` hands the controls to you instead (:mod:`agents.play`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from agents.controller import Controller, ControllerSpec, load_controller
from envs.dream import REWARD_MODES, DreamEnv, DreamSettings, load_start_latents, load_world_model
from worldmodel.episodes import episode_index, episode_path, list_episodes, load_episode
from worldmodel.errors import UserError
from worldmodel.io import atomic_path
from worldmodel.latents import list_latents, split_episodes
from worldmodel.m import WorldModel
from worldmodel.runs import Run
from worldmodel.vae import ConvVAE, load_vae, preprocess

#: 64×64 frames are blown up this many times (nearest neighbour) for viewing.
SCALE = 4
#: height of the label strip above each column of the side-by-side video (a multiple of 16,
#: so frame sizes suit the video codec's macro blocks).
LABEL_H = 32
#: frames per second of each game's videos (the real games' render rates).
FPS = {"takecover": 35, "carracing": 50}
#: a GIF keeps every k-th frame so that it has at most this many (an MP4 keeps them all).
GIF_MAX_FRAMES = 500
#: frames V decodes at once.
DECODE_BATCH = 256


# ----------------------------------------------------------------- loading

def load_vae_for(run: Run) -> ConvVAE:
    if not run.vae_path.exists():
        raise UserError(f"{run.vae_path}: not found; run `python run.py train-vae` first")
    return load_vae(run.vae_path, run.cfg.vae.z_dim)


def load_controller_for(run: Run, m: WorldModel) -> Controller:
    spec = ControllerSpec.for_config(run.cfg, m)
    if not run.controller_path.exists():
        raise UserError(f"{run.controller_path}: not found; run `python run.py dream` first")
    params, _ = load_controller(run.controller_path, spec=spec)
    return Controller(spec, params)


def pick_episodes(run: Run, n: int) -> list[Path]:
    """Up to ``n`` stored episodes, those M held out from training first."""
    stored = list_episodes(run.episodes_dir)
    if not stored:
        raise UserError(f"{run.episodes_dir}: no episodes; run `python run.py collect` first")
    latents = list_latents(run.latents_dir)
    _, val_ids = split_episodes(len(latents), run.cfg.model.val_fraction, run.cfg.model.seed)
    held_out = [episode_path(run.episodes_dir, episode_index(latents[i])) for i in val_ids]
    held_out = [p for p in held_out if p.exists()]
    rest = [p for p in stored if p not in held_out]
    return (held_out + rest)[:n]


# ----------------------------------------------------------------- frames

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """V's output (B, 3, 64, 64) in [0, 1] -> uint8 frames (B, 64, 64, 3)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.inference_mode()
def decode(vae: ConvVAE, z: torch.Tensor) -> np.ndarray:
    """z (T, Z) -> uint8 frames (T, 64, 64, 3), in batches."""
    return np.concatenate([to_uint8(vae.decode(z[i:i + DECODE_BATCH])) for i in range(0, len(z), DECODE_BATCH)])


def upscale(frame: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """(H, W, 3) -> (scale·H, scale·W, 3), nearest neighbour (every pixel a block)."""
    return frame.repeat(scale, axis=0).repeat(scale, axis=1)


def draw_text(frame: np.ndarray, text: str, xy: tuple[int, int] = (3, 2), box: bool = True) -> np.ndarray:
    """``frame`` (H, W, 3) uint8 with ``text`` (lines split on newlines) in white, on a dark box."""
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    if box:
        left, top, right, bottom = draw.multiline_textbbox(xy, text, spacing=2)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.multiline_text(xy, text, fill=(255, 255, 255), spacing=2)
    return np.asarray(image)


def _score(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


# ----------------------------------------------------------------- C in the dream

@dataclass
class DreamClip:
    """One dream: ``frames`` (T+1, 64, 64, 3) uint8 (z_0 … z_T decoded), ``actions`` (T, A),
    ``rewards`` (T,), ``ended``: M's done head ended it (else the step cap did)."""

    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    ended: bool

    @property
    def score(self) -> float:
        return float(self.rewards.sum())


def dream_clip(env: DreamEnv, controller: Controller, seed: int) -> DreamClip:
    """Let ``controller`` act in ``env`` (rendering with V) from ``reset(seed=seed)`` to the end."""
    obs, _ = env.reset(seed=seed)
    frames, actions, rewards = [env.render()], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        action = controller.act(obs).numpy()
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(env.render())
        actions.append(action)
        rewards.append(reward)
    a_dim = controller.spec.action_dim
    return DreamClip(np.stack(frames), np.asarray(actions, np.float32).reshape(-1, a_dim),
                     np.asarray(rewards, np.float64), bool(terminated))


def dream_video_frames(clip: DreamClip, temperature: float) -> np.ndarray:
    """Annotated, upscaled frames of a dream: (T+1, 64·SCALE, 64·SCALE, 3) uint8."""
    scores = np.concatenate([[0.0], np.cumsum(clip.rewards)])
    out = []
    for t, frame in enumerate(clip.frames):
        text = f"dream  step {t}\ntau {temperature:g}  score {_score(scores[t])}"
        if clip.ended and t == len(clip.frames) - 1:
            text += "\nM: episode over"
        out.append(draw_text(upscale(frame), text))
    return np.stack(out)


# ----------------------------------------------------------------- M's dream beside reality

@dataclass
class Comparison:
    """One episode three ways, each (T, 64, 64, 3) uint8: ``real`` stored frames, ``recon``
    V's decode(μ) of them, ``dream`` M's open-loop dream; ``done_prob`` (T,) P(d_t) that M
    gave when dreaming step t (0 at t = 0)."""

    real: np.ndarray
    recon: np.ndarray
    dream: np.ndarray
    done_prob: np.ndarray


@torch.inference_mode()
def compare_episode(vae: ConvVAE, m: WorldModel, obs: np.ndarray, actions: np.ndarray, temperature: float,
                    generator: torch.Generator | None = None, jump: int = 1) -> Comparison:
    """obs uint8 (T, 64, 64, 3), actions (T, A): reality, V's view of it, and M dreaming it open-loop.

    z_0 = V's μ of obs[0]; then z_{t+1} ~ M(z_t, a_t) at ``temperature`` for t < T-1.
    jump > 1 (an M with ``imagine_jump``, e.g. TD-VAE): z_{t+δ} ~ M(z_t, a_t … a_{t+δ-1}) in jumps
    of δ = ``jump`` steps, each dreamt frame held until the next jump lands.
    """
    if jump > 1 and not hasattr(m, "imagine_jump"):
        raise UserError(f"--jump {jump}: this M ({type(m).__name__}) dreams one step at a time; "
                        "jumpy dreams need model.m: tdvae")
    mus = [vae.encode(preprocess(obs[i:i + DECODE_BATCH]))[0] for i in range(0, len(obs), DECODE_BATCH)]
    mu = torch.cat(mus)
    a = torch.as_tensor(np.asarray(actions, np.float32).reshape(len(obs), -1))
    z, state = mu[:1], m.initial_state(1)
    dream_z, done = [z], [0.0]
    t = 0
    while t < len(obs) - 1:
        delta = min(jump, len(obs) - 1 - t)
        if jump > 1:
            state, z, _, d = m.imagine_jump(state, z, a[None, t:t + delta], temperature, generator)
        else:
            state, z, _, d = m.imagine_step(state, z, a[t:t + 1], temperature, generator)
        dream_z.extend([dream_z[-1]] * (delta - 1) + [z])
        done.extend([done[-1]] * (delta - 1) + [float(d[0])])
        t += delta
    return Comparison(real=np.asarray(obs, np.uint8), recon=decode(vae, mu), dream=decode(vae, torch.cat(dream_z)),
                      done_prob=np.asarray(done))


def comparison_video_frames(cmp: Comparison, temperature: float) -> np.ndarray:
    """Three labelled columns (real | V | M) per step: (T, LABEL_H + 64·SCALE, 3·64·SCALE, 3) uint8.

    Below the label strip each column is exactly its frame upscaled SCALE times.
    """
    side = 64 * SCALE
    out = np.zeros((len(cmp.real), LABEL_H + side, 3 * side, 3), np.uint8)
    for t in range(len(cmp.real)):
        labels = (f"real  step {t}", "V: reconstruction",
                  f"M: open-loop dream, tau {temperature:g}\nP(done) {cmp.done_prob[t]:.2f}")
        for col, (frames, label) in enumerate(zip((cmp.real, cmp.recon, cmp.dream), labels)):
            x = col * side
            out[t, LABEL_H:, x:x + side] = upscale(frames[t])
            out[t, :LABEL_H, x:x + side] = draw_text(out[t, :LABEL_H, x:x + side], label, box=False)
    return out


# ----------------------------------------------------------------- writing

def write_video(path: str | Path, frames: np.ndarray, fps: float) -> dict[str, Any]:
    """Write ``frames`` (T, H, W, 3) uint8 as ``path`` (MP4, H.264) and beside it a GIF, atomically.

    The GIF keeps every k-th frame (at most GIF_MAX_FRAMES) and plays in real time.
    Returns {"mp4", "gif", "frames", "gif_frames"}.
    """
    import imageio_ffmpeg

    mp4 = Path(path).with_suffix(".mp4")
    gif = mp4.with_suffix(".gif")
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    height, width = frames.shape[1:3]
    with atomic_path(mp4) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=8,
            macro_block_size=16, output_params=["-f", "mp4"], ffmpeg_log_level="error")
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
    stride = max(1, math.ceil(len(frames) / GIF_MAX_FRAMES))
    images = [Image.fromarray(f) for f in frames[::stride]]
    with atomic_path(gif) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 * stride / fps), loop=0)
    return {"mp4": str(mp4), "gif": str(gif), "frames": len(frames), "gif_frames": len(images)}


# ----------------------------------------------------------------- the command

def _temperature(run: Run, args: Any) -> float:
    tau = getattr(args, "temperature", None)
    tau = run.cfg.cmaes.temperature if tau is None else float(tau)
    if not math.isfinite(tau) or tau < 0:
        raise UserError(f"--temperature {tau}: must be a number >= 0")
    return tau


def watch(run: Run, args: Any) -> dict[str, Any]:
    """Write the dream and side-by-side videos of ``run`` (or, with ``args.play``, play the dream).

    args: ``episodes`` (dreams and side-by-side episodes, default 1), ``jump`` (side by side:
    M dreams in jumps of that many steps; TD-VAE only), ``temperature``
    (default ``cmaes.temperature``), ``steps`` (cap per video, default ``cmaes.max_steps``),
    ``out`` (folder, default ``<run>/videos``), ``play``, ``quiet``.
    Without ``controller.pt`` the dream videos are skipped (the summary says so).
    """
    if getattr(args, "play", False):
        from agents.play import play

        return play(run, args)
    cfg = run.cfg
    tau = _temperature(run, args)
    n = getattr(args, "episodes", None) or 1
    steps = getattr(args, "steps", None) or cfg.cmaes.max_steps
    out = Path(getattr(args, "out", None) or run.dir / "videos")
    fps = FPS[cfg.env.name]
    quiet = bool(getattr(args, "quiet", False))
    jump = getattr(args, "jump", None) or 1

    vae = load_vae_for(run)
    m = load_world_model(run)
    episodes = pick_episodes(run, n)
    summary: dict[str, Any] = {"out": str(out), "temperature": tau}

    compare = []
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    for path in tqdm(episodes, desc="side by side", disable=quiet or None):
        ep = load_episode(path, keys=("obs", "action"))
        if len(ep["obs"]) == 0:
            continue
        cmp = compare_episode(vae, m, ep["obs"][:steps], ep["action"][:steps], tau, generator, jump)
        name = f"compare_ep{episode_index(path):06d}_tau{tau:g}{f'_jump{jump}' if jump > 1 else ''}.mp4"
        compare.append(write_video(out / name, comparison_video_frames(cmp, tau), fps))
    summary["compare_videos"] = [v["mp4"] for v in compare]
    summary["compare_frames"] = [v["frames"] for v in compare]

    if not run.controller_path.exists():
        summary["dream_videos"] = f"skipped: {run.controller_path} not found; run `python run.py dream` first"
        return summary
    controller = load_controller_for(run, m)
    settings = DreamSettings.from_config(cfg, temperature=tau, max_steps=steps)
    env = DreamEnv(m, load_start_latents(run), cfg.env.name, settings, vae=vae, render_mode="rgb_array")
    dreams, scores = [], []
    for i in tqdm(range(n), desc="dreams", disable=quiet or None):
        clip = dream_clip(env, controller, seed=cfg.eval.seed + i)
        dreams.append(write_video(out / f"dream_tau{tau:g}_{i:02d}.mp4", dream_video_frames(clip, tau), fps))
        scores.append(round(clip.score, 3))
    summary["dream_videos"] = [v["mp4"] for v in dreams]
    summary["dream_frames"] = [v["frames"] for v in dreams]
    summary["dream_scores"] = scores
    summary["score_kind"] = "steps alive" if REWARD_MODES[cfg.env.name] == "alive" else "M's predicted reward"
    return summary
