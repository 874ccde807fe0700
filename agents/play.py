"""`python run.py watch --play`: play M's dream yourself, with the keyboard.

The window shows V's decoding of the dreamed z (upscaled) with the step, τ and score.
Keys: TakeCover ← / → move left / right; CarRacing ← / → steer, ↑ gas, ↓ brake.  R starts
a new dream (a fresh start z), Esc or closing the window quits.  When M says the episode
is over the dream waits for R.

:class:`DreamPlayer` holds all the state and takes pygame events one at a time, so tests
drive it with posted events; the window runs headless under ``SDL_VIDEODRIVER=dummy``.
pygame is an optional extra (``pip install -e '.[play]'``) and is imported only here.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from agents.watch import FPS, SCALE, _score, _temperature, draw_text, load_vae_for, upscale
from envs.dream import DreamEnv, DreamSettings, load_start_latents, load_world_model
from worldmodel.errors import UserError
from worldmodel.runs import Run

#: brake strength while ↓ is held (CarRacing; gymnasium's own keyboard demo uses 0.8).
BRAKE = 0.8


def import_pygame() -> ModuleType:
    try:
        import pygame
    except ImportError:
        raise UserError("watch --play needs pygame: pip install -e '.[play]'") from None
    return pygame


def keyboard_action(env_name: str, held: set[str]) -> np.ndarray:
    """The action for the arrow keys in ``held`` ("left", "right", "up", "down"), float32 (A,)."""
    steer = float("right" in held) - float("left" in held)
    if env_name == "takecover":
        return np.array([steer], np.float32)  # -1 / 0 / +1: left / stay / right
    return np.array([steer, float("up" in held), BRAKE * ("down" in held)], np.float32)


class DreamPlayer:
    """A human at the controls of one dream at a time.

    ``handle_event(event)`` takes a pygame event; ``step()`` advances the dream one step
    with the keys now held (nothing while the dream is over); ``frame()`` is what to show,
    (64·SCALE, 64·SCALE, 3) uint8.  ``running`` turns False on Esc or a window close.
    """

    def __init__(self, env: DreamEnv, env_name: str, temperature: float, seed: int = 0) -> None:
        self.pygame = import_pygame()
        k = self.pygame
        self.keys = {k.K_LEFT: "left", k.K_RIGHT: "right", k.K_UP: "up", k.K_DOWN: "down"}
        self.env, self.env_name, self.temperature, self.seed = env, env_name, temperature, seed
        self.held: set[str] = set()
        self.running = True
        self.dreams, self.total_steps = 0, 0
        self.scores: list[float] = []
        self.last_action = keyboard_action(env_name, set())
        self.restart()

    def restart(self) -> None:
        """A new dream from a fresh start z (the finished or abandoned one is scored)."""
        if self.dreams and self.t > 0 and not self.over:
            self.scores.append(self.score)
        self.env.reset(seed=self.seed + self.dreams)
        self.dreams += 1
        self.t, self.score, self.over = 0, 0.0, False
        self._frame = self.env.render()

    def handle_event(self, event: Any) -> None:
        k = self.pygame
        if event.type == k.QUIT:
            self.running = False
        elif event.type == k.KEYDOWN:
            if event.key == k.K_ESCAPE:
                self.running = False
            elif event.key == k.K_r:
                self.restart()
            elif event.key in self.keys:
                self.held.add(self.keys[event.key])
        elif event.type == k.KEYUP and event.key in self.keys:
            self.held.discard(self.keys[event.key])
        elif event.type == getattr(k, "WINDOWFOCUSLOST", None):
            self.held.clear()  # a key released in another window never sends KEYUP here

    def action(self) -> np.ndarray:
        return keyboard_action(self.env_name, self.held)

    def step(self) -> bool:
        """One dream step with the held keys; False (and nothing done) while the dream is over."""
        if self.over:
            return False
        self.last_action = self.action()
        _, reward, terminated, truncated, _ = self.env.step(self.last_action)
        self.t += 1
        self.total_steps += 1
        self.score += reward
        self._frame = self.env.render()
        if terminated or truncated:
            self.over = True
            self.scores.append(self.score)
        return True

    def frame(self) -> np.ndarray:
        text = f"dream {self.dreams}  step {self.t}  tau {self.temperature:g}\nscore {_score(self.score)}"
        if self.over:
            text += "\nepisode over: R restart, Esc quit"
        return draw_text(upscale(self._frame), text)

    def summary(self) -> dict[str, Any]:
        return {"dreams": self.dreams, "steps": self.total_steps, "temperature": self.temperature,
                "scores": [round(s, 3) for s in self.scores],
                "best_score": max(self.scores) if self.scores else None}


def run_window(player: DreamPlayer, fps: float, max_frames: int | None = None) -> dict[str, Any]:
    """Show ``player`` in a window at ``fps`` until it stops running (or ``max_frames`` frames)."""
    pygame = player.pygame
    side = 64 * SCALE
    pygame.display.init()
    try:
        screen = pygame.display.set_mode((side, side))
    except pygame.error as exc:
        pygame.display.quit()
        raise UserError(f"watch --play: cannot open a window ({exc}); "
                        "set SDL_VIDEODRIVER=dummy to run without a display") from None
    pygame.display.set_caption("World Models: the dream (arrows act, R restart, Esc quit)")
    clock = pygame.time.Clock()
    frames = 0
    try:
        while player.running and (max_frames is None or frames < max_frames):
            for event in pygame.event.get():
                player.handle_event(event)
            if not player.running:
                break
            player.step()
            image = player.frame()
            screen.blit(pygame.surfarray.make_surface(image.swapaxes(0, 1)), (0, 0))
            pygame.display.flip()
            clock.tick(fps)
            frames += 1
    except KeyboardInterrupt:  # Ctrl-C in the terminal quits the game like Esc
        pass
    finally:
        pygame.display.quit()
    return player.summary()


def make_player(run: Run, temperature: float, steps: int) -> DreamPlayer:
    """The run's dream (M, V and real start latents) with a human at the controls."""
    import_pygame()  # fail before loading any model
    cfg = run.cfg
    vae = load_vae_for(run)
    m = load_world_model(run)
    settings = DreamSettings.from_config(cfg, temperature=temperature, max_steps=steps)
    env = DreamEnv(m, load_start_latents(run), cfg.env.name, settings, vae=vae, render_mode="rgb_array")
    return DreamPlayer(env, cfg.env.name, temperature, seed=cfg.eval.seed)


def play(run: Run, args: Any) -> dict[str, Any]:
    """``watch --play``: args.temperature (default cmaes.temperature), args.steps (dream cap)."""
    steps = getattr(args, "steps", None) or run.cfg.cmaes.max_steps
    player = make_player(run, _temperature(run, args), steps)
    return run_window(player, FPS[run.cfg.env.name])
