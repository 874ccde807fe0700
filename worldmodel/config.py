"""Typed configuration: the single source of truth for every hyperparameter.

A config is a tree of dataclasses, one section per stage.  YAML presets in
``configs/`` fill it, ``--set section.key=value`` overrides single fields, and
:func:`validate` rejects unknown keys, wrong types and out-of-range values with
a message that names the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from worldmodel.errors import UserError


def _f(default: Any, *, low: float | None = None, high: float | None = None,
       choices: tuple | None = None, doc: str = "") -> Any:
    """A config field with its allowed range (inclusive) or choices."""
    meta = {"low": low, "high": high, "choices": choices, "doc": doc}
    return field(default=default, metadata=meta)


@dataclass
class EnvConfig:
    name: str = _f("takecover", choices=("takecover", "carracing"), doc="real environment")
    frame_skip: int = _f(1, low=1, doc="env steps (game tics) per agent action")
    max_steps: int = _f(2100, low=1, doc="episode cap; TakeCover 2100, CarRacing 1000")


@dataclass
class CollectConfig:
    episodes: int = _f(100, low=1, doc="episodes to collect")
    max_steps: int = _f(2100, low=1, doc="cap on steps per collected episode")
    policy: str = _f("held_random", choices=("held_random", "random", "brownian", "road"),
                     doc="exploration policy (agents/policies.py)")
    hold_min: int = _f(1, low=1, doc="held_random: shortest hold of an action")
    hold_max: int = _f(10, low=1, doc="held_random: longest hold of an action")
    lean: float = _f(0.0, low=0.0, doc="held_random: each episode adds a bias ~ U(-lean, lean) to its actions")
    brownian_dt: float = _f(0.02, low=0.0, doc="brownian: step size of the action random walk")
    workers: Optional[int] = _f(None, low=1, doc="worker processes; null = one per core")
    seed: int = _f(0, low=0, doc="base seed; episode i uses a seed derived from it and i")


@dataclass
class VAEConfig:
    z_dim: int = _f(64, low=1, doc="latent size (paper: 64 TakeCover, 32 CarRacing)")
    kl_tolerance: float = _f(0.5, low=0.0, doc="free bits: KL floored at kl_tolerance * z_dim")
    beta: float = _f(1.0, low=0.0, doc="weight of the KL term (beta-VAE)")
    colour_balance: float = _f(0.0, low=0.0, doc="weigh each pixel's squared error by its colour's share of "
                                                 "the training pixels to the power -colour_balance, so that "
                                                 "rare colours (a distant fireball) count; 0 = the paper's loss")
    colour_weight_max: float = _f(20.0, low=1.0, doc="colour_balance: cap on a colour's weight, relative to "
                                                     "the commonest colour's")
    lr: float = _f(1e-3, low=0.0, doc="Adam learning rate")
    batch_size: int = _f(100, low=1)
    epochs: int = _f(1, low=1)
    val_fraction: float = _f(0.05, low=0.0, high=0.5, doc="share of episodes held out")
    max_frames: Optional[int] = _f(None, low=1, doc="train on at most this many frames")
    seed: int = _f(0, low=0)
    threads: Optional[int] = _f(None, low=1, doc="torch threads while training V; null = every core")
    checkpoint_every_s: float = _f(300.0, low=0.0, doc="also checkpoint this often inside an epoch (seconds; "
                                                      "0 = after every batch): a kill loses at most this much")


@dataclass
class ModelConfig:
    m: str = _f("mdnrnn", doc="which M module (worldmodel/registry)")
    hidden: int = _f(256, low=1, doc="LSTM size (paper: 512 TakeCover, 256 CarRacing)")
    mixtures: int = _f(5, low=1, doc="Gaussians in M's mixture over z_{t+1}")
    mixture: str = _f("per_dim", choices=("per_dim", "joint"),
                      doc="mdnrnn: per_dim = a mixture for each z dimension (the paper); joint = one "
                          "component picked for the whole z, so that an event moving many dimensions "
                          "at once (a fireball appearing) is sampled whole")
    seq_len: int = _f(64, low=2, doc="training subsequence length")
    carry_state: bool = _f(False, doc="mdnrnn: train on each episode's windows in order, carrying the LSTM "
                                      "state from one to the next (truncated backprop through time), "
                                      "as the dream runs M for up to env.max_steps steps; false: every "
                                      "window starts from a zero state")
    batch_size: int = _f(32, low=1)
    lr: float = _f(1e-3, low=0.0)
    epochs: int = _f(10, low=1)
    grad_clip: float = _f(1.0, low=0.0)
    reward_weight: float = _f(1.0, low=0.0, doc="weight of the reward loss")
    done_weight: float = _f(1.0, low=0.0, doc="weight of the done loss")
    done_pos_weight: float = _f(10.0, low=0.0, doc="BCE weight of the (rare) done=1 class")
    done_horizon: int = _f(1, low=1, doc="the done head learns 'death within the next N steps' (1 = the next "
                                         "step, as the paper); a dream then ends up to N - 1 steps early")
    hazard_horizon: int = _f(0, low=0, doc="> 0: train one more M after the ensemble, the hazard critic (the "
                                           "last M file), whose done head learns 'death within the next N "
                                           "steps'; the dream reads it through cmaes.hazard_penalty and "
                                           "cmaes.hazard_threshold (worldmodel/ensemble.py), the real game through "
                                           "controller.shield (agents/agent.py); 0 = none")
    predict_reward: bool = _f(True, doc="train a reward head (off for TakeCover: +1 alive)")
    time_input: bool = _f(False, doc="mdnrnn: the LSTM also reads the episode's step t / env.max_steps, so "
                                     "M can learn a game that changes with time (TakeCover sends more "
                                     "imps as it goes on) although it trains on short windows")
    dropout: float = _f(0.0, low=0.0, high=0.9, doc="mdnrnn: training dropout on the LSTM's z input "
                                                     "(a mask per sequence) and its recurrent h (a mask "
                                                     "per batch), as M for cmaes.dream_dropout is trained")
    overshoot: int = _f(8, low=1, doc="belief: overshoot length K")
    overshoot_weight: float = _f(1.0, low=0.0, doc="belief: weight of steps beyond the first")
    sim_hidden: Optional[int] = _f(None, low=1, doc="belief: simulation core (GRU) size; null = hidden // 2")
    tdvae_state: int = _f(8, low=1, doc="tdvae: size of each layer of the state s")
    tdvae_layers: int = _f(1, choices=(1, 2), doc="tdvae: layers of s (2: the paper's hierarchy)")
    tdvae_max_jump: int = _f(4, low=1, doc="tdvae: D, the longest jump t2 - t1 trained")
    tdvae_pairs: int = _f(16, low=1, doc="tdvae: (t1, t2) pairs sampled per sequence per batch")
    val_fraction: float = _f(0.05, low=0.0, high=0.5)
    seed: int = _f(0, low=0)
    ensemble: int = _f(1, low=1, doc="M's trained from seeds seed, seed+1, ...; the dream's reward is "
                                      "their mean less cmaes.disagreement x their spread")
    workers: Optional[int] = _f(None, low=1, doc="on a CPU, most processes that train the run's M files "
                                                 "(ensemble members, hazard critic) side by side, one "
                                                 "thread each, in full rounds (a count that divides the "
                                                 "files'), the same weights as one after another; null = "
                                                 "one per core; 1 = one after another with every thread")


BRAKE_SQUASHES = ("clip", "shift")  # controller.brake; agents/controller.py
#: the squash of every CarRacing controller, search state and select cache written before the
#: brake was recorded
LEGACY_BRAKE = "shift"


@dataclass
class ControllerConfig:
    features: str = _f("zh", choices=("z", "zh", "zch"), doc="what C sees: z alone, [z, h] or [z, c, h]")
    real_z: str = _f("mean", choices=("mean", "sample"),
                     doc="in the real env, z is V's posterior mean or a sample from it (as M was trained)")
    action_noise: float = _f(0.0, low=0.0, doc="std of Gaussian noise on C's actions (then clipped to the "
                             "action box), in the dream and in the real game alike: C is evolved and "
                             "evaluated as this stochastic policy; 0 = deterministic")
    real_noise: float = _f(0.0, low=0.0, doc="std of Gaussian noise added to C's actions in the real game only, "
                           "after M has observed the action (then clipped to the action box); the dream never "
                           "sees it.  A play-time setting: checks, select, evaluate and watch use it")
    shield: float = _f(0.0, low=0.0, high=1.0,
                       doc="TakeCover with a hazard critic (model.hazard_horizon): where the critic's P_H for C's "
                           "action exceeds that of the safest hold (left, stay or right) by more than this, the agent "
                           "takes that hold instead; 0 = off.  A play-time setting like real_noise: checks, select, "
                           "evaluate (its videos too) and iterate's collection play it; the dream only with "
                           "cmaes.dream_shield")
    shield_critics: int = _f(1, low=1,
                             doc="how many hazard critics the real game's shield averages P_H over: the agent's own "
                                 "(the one trained beside its M) and those of the run's latest other M's "
                                 "(m_history/index.json, newest first), as many as there are up to this; 1 = its own "
                                 "alone.  A play-time setting like shield (agents/shield.py, CriticAverage)")
    committee: int = _f(1, low=1,
                        doc="the agent in evaluate: the best this many of select's controllers played together, "
                            "each with the M it was checked with, every step the median of their actions "
                            "(agents/agent.py, Committee), when that beats the best alone on select's "
                            "episodes; 1 = the best alone.  A play-time setting: needs "
                            "cmaes.select_episodes > 0 and cmaes.select_top >= this")
    brake: str = _f("clip", choices=BRAKE_SQUASHES,
                    doc="CarRacing's brake from C's output y: clip(tanh y, 0, 1) as in the paper's code, "
                        "or (tanh y + 1) / 2 (half the brake at y = 0; agents/controller.py)")


ENSEMBLE_DONE_RULES = ("first", "max", "mean")  # cmaes.ensemble_done; worldmodel/ensemble.py
ENSEMBLE_MOVERS = ("first", "each")  # cmaes.ensemble_moves; worldmodel/ensemble.py


@dataclass
class CMAESConfig:
    population: int = _f(64, low=2)
    rollouts: int = _f(16, low=1, doc="dreams per candidate; fitness is their mean")
    workers: Optional[int] = _f(None, low=1, doc="on a CPU, processes that dream each generation, one thread "
                                                 "each, every one a share of the candidates (the same "
                                                 "dreams as one batch but for bfloat16 rounding, faster; "
                                                 "agents/dream_workers.py); null = one per core where each "
                                                 "gets 64 dreams or more; 1 = one batch in this process "
                                                 "with every thread")
    generations: int = _f(100, low=1)
    sigma0: float = _f(0.1, low=0.0)
    temperature: float = _f(1.15, low=0.0, doc="tau: mixture logits / tau, sigma * sqrt(tau)")
    max_steps: int = _f(2100, low=1, doc="dream length cap")
    disagreement: float = _f(0.0, low=0.0, doc="lambda: dream reward = members' mean - lambda * their "
                                                "std (model.ensemble > 1; worldmodel/ensemble.py)")
    ensemble_done: str = _f("first", choices=ENSEMBLE_DONE_RULES,
                            doc="whose P(done) ends a dream (model.ensemble > 1): the first member's, the "
                                "highest of the members' (the dream ends where any of them expects a death), "
                                "or their mean; worldmodel/ensemble.py")
    ensemble_moves: str = _f("first", choices=ENSEMBLE_MOVERS,
                             doc="whose z samples move a dream (model.ensemble > 1): the first member's "
                                 "(m.pt) in every dream, or each member's in turn (noise stream s follows "
                                 "member s mod K all the way), so that C cannot thrive on one M's mistakes; "
                                 "C reads the first member's state either way")
    hazard_penalty: float = _f(0.0, low=0.0, doc="lambda: a TakeCover dream step pays 1 - min(1, lambda * P_H), "
                                                  "P_H the hazard critic's P(death within model.hazard_horizon "
                                                  "steps): a step in danger earns less, the dream goes on")
    hazard_threshold: float = _f(1.0, low=0.0, high=1.0, doc="a dream also ends where the hazard critic's P_H "
                                                             "exceeds this (1 = never)")
    dream_shield: bool = _f(False, doc="the dream plays controller.shield too: its critic replaces C's "
                                       "riskiest moves as it does in the real game, so C is evolved with "
                                       "the shield it plays with (the critic is then stepped in every dream)")
    done: str = _f("threshold", choices=("threshold", "sample"),
                   doc="how M's calibrated P(done) ends a dream: P > done_threshold, or a Bernoulli sample")
    done_threshold: float = _f(0.1, low=0.0, high=1.0,
                               doc="a harsh dream (low threshold) transfers better; docs/results.md")
    done_calibration: float = _f(0.0, low=0.0,
                                 doc="TakeCover, done: threshold: > 0 sets each search's done threshold for "
                                     "its own M, so that the blind pacer (calibration_pacer_steps a leg) lives this "
                                     "many times as long in the dream as in the real game (agents/calibrate.py)"
                                     "; 0 = done_threshold as given")
    calibration_episodes: int = _f(100, low=1, doc="done_calibration: the pacer's real episodes (seeds "
                                                   "5,000,000 + cmaes.seed ...) and its dreams")
    calibration_pacer_steps: int = _f(28, low=1, doc="done_calibration: the blind pacer's leg (steps at full "
                                                     "speed one way, then the other; agents/policies.py)")
    dream_dropout: float = _f(0.0, low=0.0, high=0.9, doc="each dream drops this share of M's z and h "
                                                           "inputs, one mask for its whole length: every "
                                                           "dream is a different M (Wellmer & Kwok 2021)")
    midway_starts: float = _f(0.0, low=0.0, high=1.0,
                              doc="share of each candidate's dreams that start inside a real episode, at a "
                                  "step t0 uniform over the game's time, with M's state filtered over the "
                                  "real steps before it (envs/dream.py MidwayStarts); 0 = every dream "
                                  "starts at step 0")
    eval_every: int = _f(10, low=0, doc="real-env check of the best every N generations; 0 = never")
    eval_episodes: int = _f(8, low=1)
    select_top: int = _f(3, low=1, doc="after training: how many of the best real checks to re-play")
    select_episodes: int = _f(0, low=0, doc="fresh real episodes for each re-played controller; 0 = no selection")
    seed: int = _f(0, low=0)


@dataclass
class IterateConfig:
    iterations: int = _f(0, low=0, doc="rounds of collect -> retrain M -> more CMA-ES after the dream")
    episodes: int = _f(200, low=1, doc="real episodes the current agent collects per iteration")
    noise: float = _f(0.1, low=0.0, doc="std of the Gaussian noise added to the agent's actions")
    vae_epochs: int = _f(0, low=0, doc="more V epochs per iteration (0: V stays; new frames only encoded)")
    m_epochs: int = _f(3, low=0, doc="more M epochs per iteration, on all data, from M's current weights")
    generations: int = _f(40, low=1, doc="more CMA-ES generations per iteration, in the new dream")
    restart: bool = _f(False, doc="start each iteration's CMA-ES afresh (mean 0, cmaes.sigma0) in the new dream: "
                                  "a centre saturated by an exploited dream may never leave it (docs/results.md, "
                                  "run tj)")
    search: bool = _f(True, doc="false: an iteration collects with the first dream's agent and trains only the "
                                "hazard critic (its iterate.m_epochs more), for the shield's average "
                                "(controller.shield_critics); no new CMA-ES search, the dream's M's stay "
                                "(docs/results.md, \"Critic-only iterations\")")
    restart_from: str = _f("zero", choices=("zero", "best"),
                           doc="with iterate.restart, the new search's mean: zero, or the controller of the "
                               "best real check so far when it beats the mean return of the collect stage's "
                               "episodes (the search then refines it in the new dream)")


@dataclass
class EvalConfig:
    episodes: int = _f(100, low=1)
    seed: int = _f(10_000, low=0, doc="first seed; held apart from collection seeds")
    workers: Optional[int] = _f(None, low=1, doc="worker processes; null = one per core")
    video_episodes: int = _f(3, low=0)
    pacer_steps: int = _f(0, low=0, doc="TakeCover: also score a blind pacer on the same seeds (full speed left "
                                        "for this many steps, then right, and so on; 110 crosses the room); 0 = off")


@dataclass
class SystemConfig:
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), doc="auto = cuda when present")
    precision: str = _f("auto", choices=("auto", "float32", "bfloat16"),
                        doc="matrix products of V and M training and of the dream; auto = bfloat16 "
                            "where the hardware has it (AMX / AVX-512 BF16 CPU, CUDA), else float32")
    backend: str = _f("local", choices=("local", "ray"), doc="where real-env work runs")
    ray_address: Optional[str] = _f(None, doc="Ray cluster address; null = RAY_ADDRESS or local")
    task_timeout: float = _f(1800.0, low=1.0, doc="seconds before a worker task counts as hung")


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    cmaes: CMAESConfig = field(default_factory=CMAESConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    name: str = "run"


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")


# ----------------------------------------------------------------- conversion

def _base_type(tp: Any) -> tuple[type, bool]:
    """(type, optional) from a field annotation such as ``Optional[int]``."""
    if isinstance(tp, str):
        tp = eval(tp, {"Optional": Optional, **vars(typing)})  # annotations are ours, not user text
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config {key}: null is not allowed (expected {base.__name__})")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" in a file as a string; a number is meant
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config {key}: expected {base.__name__}, got {value!r}")


def _check_range(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"config {key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and value < low:
        raise UserError(f"config {key}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise UserError(f"config {key}: {value!r} is above the maximum {high}")


def _set_field(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] == "name":
        cfg.name = _coerce("name", value, str)
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"config {dotted}: unknown key (sections: {', '.join(SECTIONS)})")
    section = getattr(cfg, parts[0])
    fields = {f.name: f for f in dataclasses.fields(section)}
    if parts[1] not in fields:
        raise UserError(f"config {dotted}: unknown key (known: {', '.join(fields)})")
    f = fields[parts[1]]
    coerced = _coerce(dotted, value, f.type)
    _check_range(dotted, coerced, dict(f.metadata))
    setattr(section, parts[1], coerced)


def from_dict(data: dict, base: Config | None = None, source: str = "config") -> Config:
    """Build a Config from nested ``{section: {key: value}}``, starting at ``base``."""
    cfg = from_flat(to_flat(base)) if base is not None else Config()  # a deep copy of base
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section == "name":
            _set_field(cfg, "name", values)
            continue
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            _set_field(cfg, f"{section}.{key}", value)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_flat(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {"name": cfg.name}
    for section in SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{key}"] = value
    return flat


def from_flat(flat: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in flat.items():
        _set_field(cfg, key, value)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span several fields."""
    if cfg.collect.hold_min > cfg.collect.hold_max:
        raise UserError(
            f"config collect.hold_min: {cfg.collect.hold_min} is above collect.hold_max {cfg.collect.hold_max}"
        )
    if cfg.eval.pacer_steps and cfg.env.name != "takecover":
        raise UserError(f"config eval.pacer_steps: {cfg.eval.pacer_steps} is for TakeCover, not {cfg.env.name} "
                        "(set it to 0)")
    if cfg.model.mixture != "per_dim" and cfg.model.m != "mdnrnn":
        raise UserError(f"config model.mixture: {cfg.model.mixture} is for model.m: mdnrnn, not {cfg.model.m} "
                        "(set it to per_dim)")
    for key in ("time_input", "carry_state"):
        if getattr(cfg.model, key) and cfg.model.m != "mdnrnn":
            raise UserError(f"config model.{key}: true is for model.m: mdnrnn, not {cfg.model.m} (set it to false)")
    if cfg.cmaes.disagreement > 0 and (cfg.model.ensemble < 2 or not cfg.model.predict_reward):
        raise UserError(f"config cmaes.disagreement: {cfg.cmaes.disagreement} needs model.ensemble >= 2 "
                        f"(is {cfg.model.ensemble}) and model.predict_reward: true (is {cfg.model.predict_reward})")
    hazard = {"hazard_penalty": cfg.cmaes.hazard_penalty > 0, "hazard_threshold": cfg.cmaes.hazard_threshold < 1}
    for key, used in hazard.items():
        if used and not cfg.model.hazard_horizon:
            raise UserError(f"config cmaes.{key}: {getattr(cfg.cmaes, key)} needs a hazard critic "
                            "(model.hazard_horizon > 0, is 0)")
    if cfg.cmaes.dream_shield and not cfg.controller.shield > 0:
        raise UserError("config cmaes.dream_shield: true needs the shield's margin (controller.shield > 0, is "
                        f"{cfg.controller.shield})")
    if cfg.controller.shield_critics > 1 and not cfg.controller.shield > 0:
        raise UserError(f"config controller.shield_critics: {cfg.controller.shield_critics} needs the shield "
                        f"(controller.shield > 0, is {cfg.controller.shield})")
    if cfg.controller.shield > 0 and not (cfg.model.hazard_horizon and cfg.env.name == "takecover"):
        raise UserError(f"config controller.shield: {cfg.controller.shield} needs TakeCover (env.name is "
                        f"{cfg.env.name}) and a hazard critic (model.hazard_horizon > 0, is {cfg.model.hazard_horizon})")
    if cfg.cmaes.hazard_penalty > 0 and cfg.env.name != "takecover":
        raise UserError(f"config cmaes.hazard_penalty: {cfg.cmaes.hazard_penalty} is for TakeCover's survival "
                        f"reward, not {cfg.env.name} (set it to 0)")
    if cfg.cmaes.done_calibration > 0 and not (cfg.env.name == "takecover" and cfg.cmaes.done == "threshold"):
        raise UserError(f"config cmaes.done_calibration: {cfg.cmaes.done_calibration} calibrates on TakeCover's blind "
                        f"pacer: it needs env.name takecover (is {cfg.env.name}) and cmaes.done: threshold (is "
                        f"{cfg.cmaes.done})")
    it = cfg.iterate
    if it.iterations and not it.search and not (cfg.model.hazard_horizon and it.m_epochs):
        raise UserError("config iterate.search: false trains only the hazard critic: it needs model.hazard_horizon "
                        f"> 0 (is {cfg.model.hazard_horizon}) and iterate.m_epochs > 0 (is {it.m_epochs})")
    committee, c = cfg.controller.committee, cfg.cmaes
    if committee > 1 and (c.select_episodes == 0 or c.select_top < committee):
        raise UserError(f"config controller.committee: {committee} needs select to play that many controllers "
                        f"(cmaes.select_episodes > 0, is {c.select_episodes}; cmaes.select_top >= {committee}, "
                        f"is {c.select_top})")
    for key in ("ensemble_done", "ensemble_moves"):
        if getattr(cfg.cmaes, key) != "first" and cfg.model.ensemble < 2:
            raise UserError(f"config cmaes.{key}: {getattr(cfg.cmaes, key)} needs model.ensemble >= 2 "
                            f"(is {cfg.model.ensemble})")


# ----------------------------------------------------------------- files and overrides

def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    if not path.is_file():
        raise UserError(f"{path}: config path is not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: malformed YAML{where}") from None
    return data if data is not None else {}


def load(path: str | os.PathLike) -> Config:
    """Load a YAML preset; its file name (without .yaml) is the default config name."""
    data = load_yaml(path)
    if isinstance(data, dict) and "name" not in data:
        data = {"name": Path(path).stem, **data}
    return from_dict(data, source=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, value); the value is read as YAML (``null``, ``1e-3``, ``true``)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" as a string; a number is meant
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    flat = to_flat(cfg)
    for text in overrides:
        key, value = parse_override(text)
        if key not in flat:
            _set_field(Config(), key, value)  # raises the unknown-key error
        flat[key] = value
    out = Config()
    for key, value in flat.items():
        _set_field(out, key, value)
    validate(out)
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    fa, fb = to_flat(a), to_flat(b)
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}
