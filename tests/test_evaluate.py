"""evaluate: the agent's real score against a hand-written V -> M -> C loop, the report, bad input.

One tiny run with random weights (no training) serves every test: a V whose z moves
with the frame and a controller whose actions cover all three TakeCover thirds, so
that the real episodes end at different steps and a wrong action would show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE
from gymnasium.utils.env_checker import check_env

import envs
from agents.controller import ControllerSpec, save_controller
from agents.evaluate import _earlier_baseline, dream_score, evaluate_params, play, play_many, report_path
from worldmodel import config as config_lib
from worldmodel.episodes import episode_path, save_episode
from worldmodel.io import write_json
from worldmodel.m import build_m
from worldmodel.runs import open_run
from worldmodel.train_m import save_m
from worldmodel.vae import ConvVAE, save_vae

SEED = 10_000  # eval.seed
EPISODES = 3
MAX_STEPS = 300  # long enough that some episodes end by death, at different steps
PACER_STEPS = 40  # several legs of the blind pacer within MAX_STEPS
OVERRIDES = [f"env.max_steps={MAX_STEPS}", f"eval.seed={SEED}", f"eval.episodes={EPISODES}", "eval.workers=2",
             "eval.video_episodes=1", f"eval.pacer_steps={PACER_STEPS}", "system.device=cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run with random V, M, C and two fake latent episodes (for the dream); read-only."""
    torch.set_num_threads(1)
    run = open_run(tmp_path_factory.mktemp("evaluate") / "run", SMOKE, OVERRIDES)
    torch.manual_seed(0)
    vae = ConvVAE(run.cfg.vae.z_dim).eval()
    with torch.no_grad():  # a fresh V maps every frame to z ~ 0; a louder mu head makes z follow the frame
        vae.fc_mu.weight.mul_(30.0)
    save_vae(run.vae_path, vae)
    m = build_m(run.cfg, run.cfg.vae.z_dim, 1).eval()
    save_m(run.m_path, m, dataclasses.asdict(run.cfg.model))
    spec = ControllerSpec.for_env("takecover", m.feature_dim(run.cfg.controller.features))
    params = 3.0 * np.random.default_rng(0).standard_normal(spec.num_params).astype(np.float32)
    params[-1] = 0.0
    save_controller(run.controller_path, params, {"env": "takecover"})
    rng = np.random.default_rng(1)
    for i in range(2):
        t = 5
        done = np.arange(t) == t - 1
        save_episode(episode_path(run.latents_dir, i), {
            "mu": rng.standard_normal((t, run.cfg.vae.z_dim)).astype(np.float32),
            "logvar": np.full((t, run.cfg.vae.z_dim), -2.0, np.float32),
            "action": np.zeros((t, 1), np.float32), "reward": np.ones(t, np.float32),
            "done": done, "terminated": done.copy()})
    return {"run": run, "vae": vae, "m": m, "params": params, "features": run.cfg.controller.features}


# ----------------------------------------------------------------- the same episodes, by hand

def _frame_to_input(frame: np.ndarray) -> torch.Tensor:
    """uint8 (64, 64, 3) -> float (1, 3, 64, 64) in [0, 1], written out here rather than imported."""
    return torch.from_numpy(np.array(frame, np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def _hand_agent_episode(tiny: dict, seed: int, noise: float = 0.0,
                        real_noise: float = 0.0) -> tuple[float, int, list[float]]:
    """One real episode: z = V's mu, f = M.features, a = tanh(W f + b) from the flat params;
    with ``noise`` σ, a = clip(a + σ ε) with ε from torch's generator seeded with the seed.
    With ``real_noise`` ρ, M observes a and the game gets clip(a + ρ ε'), ε' the generator's next draw."""
    vae, m, params = tiny["vae"], tiny["m"], tiny["params"].astype(np.float64)
    w, b = params[:-1], params[-1]  # TakeCover: A = 1, so W is one row of F weights, b one bias
    env = envs.make("takecover", max_steps=MAX_STEPS)
    frame, _ = env.reset(seed=seed)
    state, total, steps, actions = m.initial_state(1), 0.0, 0, []
    generator = torch.Generator().manual_seed(seed)
    while True:
        mu, _ = vae.encode(_frame_to_input(frame))
        f = m.features(state, mu, tiny["features"])[0].numpy().astype(np.float64)
        a = np.tanh(w @ f + b)
        if noise:
            a = float(np.clip(np.float32(a) + noise * torch.randn(1, generator=generator).item(), -1.0, 1.0))
        actions.append(float(a))
        state = m.observe(state, mu, torch.tensor([[a]], dtype=torch.float32))
        if real_noise:
            a = float(np.clip(np.float32(a) + real_noise * torch.randn(1, generator=generator).item(), -1.0, 1.0))
        frame, reward, terminated, truncated, _ = env.step(np.array([a], np.float32))
        total += reward
        steps += 1
        if terminated or truncated:
            break
    env.close()
    return total, steps, actions


def _hand_baseline_episode(seed: int, action) -> tuple[float, int]:
    """A blind baseline by hand: ``action(step, rng)`` each step, rng numpy's generator seeded with the seed."""
    env = envs.make("takecover", max_steps=MAX_STEPS)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    total, steps = 0.0, 0
    while True:
        _, reward, terminated, truncated, _ = env.step(np.array([action(steps, rng)], np.float32))
        total += reward
        steps += 1
        if terminated or truncated:
            break
    env.close()
    return total, steps


def _random_action(step: int, rng: np.random.Generator) -> float:
    """The random policy: a fresh U(-1, 1) action each step."""
    return rng.uniform(-1.0, 1.0)


def _pacing_action(step: int, rng: np.random.Generator) -> float:
    """The blind pacer: left for PACER_STEPS steps, right for as many, and so on, whatever it sees."""
    return -1.0 if (step // PACER_STEPS) % 2 == 0 else 1.0


@pytest.fixture(scope="module")
def by_hand(tiny):
    seeds = list(range(SEED, SEED + EPISODES))
    agent = [_hand_agent_episode(tiny, s) for s in seeds]
    return {"seeds": seeds,
            "agent": [r for r, _, _ in agent], "agent_steps": [n for _, n, _ in agent],
            "actions": np.concatenate([a for _, _, a in agent]),
            "random": [_hand_baseline_episode(s, _random_action) for s in seeds],
            "pacing": [_hand_baseline_episode(s, _pacing_action) for s in seeds]}


def test_hand_loop_is_not_vacuous(by_hand):
    thirds = np.histogram(by_hand["actions"], [-1.0, -1 / 3, 1 / 3, 1.0])[0]
    assert (thirds > 0).all(), thirds  # the controller presses left, stays and presses right
    assert len(set(by_hand["agent"])) == EPISODES  # episodes differ
    assert min(by_hand["agent_steps"]) < MAX_STEPS  # some end by death, not by the cap


def test_evaluate_params_equals_the_hand_loop(tiny, by_hand):
    # Two workers: the three seeds go out as tasks of two and one (lockstep batches).
    returns = evaluate_params(tiny["run"], tiny["params"], EPISODES, SEED, workers=2)
    assert returns == by_hand["agent"]


def test_action_noise_is_played_as_the_hand_loop_plays_it(tiny, by_hand):
    run = dataclasses.replace(tiny["run"], cfg=config_lib.apply_overrides(tiny["run"].cfg,
                                                                          ["controller.action_noise=0.5"]))
    returns = evaluate_params(run, tiny["params"], EPISODES, SEED, workers=2)
    expected = [_hand_agent_episode(tiny, s, noise=0.5)[0] for s in by_hand["seeds"]]
    np.testing.assert_allclose(returns, expected)
    assert returns != by_hand["agent"]


def test_real_noise_reaches_the_game_but_not_m(tiny, by_hand):
    run = dataclasses.replace(tiny["run"], cfg=config_lib.apply_overrides(
        tiny["run"].cfg, ["controller.action_noise=0.5", "controller.real_noise=0.5"]))
    returns = evaluate_params(run, tiny["params"], EPISODES, SEED, workers=2)
    expected = [_hand_agent_episode(tiny, s, noise=0.5, real_noise=0.5)[0] for s in by_hand["seeds"]]
    np.testing.assert_allclose(returns, expected)
    observed = [_hand_agent_episode(tiny, s, noise=0.5)[0] for s in by_hand["seeds"]]
    assert returns != observed  # the check can fail: the extra noise changes the episodes


def _task(run, policy: str, seeds: list[int]) -> dict:
    return {"run": str(run.dir), "config": config_lib.to_dict(run.cfg), "policy": policy, "params": None,
            "seeds": seeds}


@pytest.mark.parametrize("policy", ["agent", "random", "pacing"])
def test_lockstep_batch_equals_one_seed_per_task(tiny, by_hand, policy):
    run, seeds = tiny["run"], by_hand["seeds"]
    together = play(_task(run, policy, seeds))
    alone = [r for s in seeds for r in play(_task(run, policy, [s]))]
    assert together == alone
    assert [r["seed"] for r in together] == seeds
    expected = (list(zip(by_hand["agent"], by_hand["agent_steps"])) if policy == "agent"
                else by_hand[policy])
    assert [(r["return"], r["steps"]) for r in together] == expected


# ----------------------------------------------------------------- the command and its report

@pytest.fixture(scope="module")
def evaluated(tiny):
    result = subprocess.run([sys.executable, "run.py", "evaluate", "--run", str(tiny["run"].dir),
                             "--episodes", str(EPISODES), "--workers", "2", "--video", "--quiet"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result, json.loads(tiny["run"].path("eval.json").read_text())


def test_report_scores_agent_and_random_policy_on_the_same_seeds(evaluated, by_hand, tiny):
    result, report = evaluated
    assert report["env"] == "takecover" and report["seeds"] == [SEED, SEED + EPISODES - 1]
    assert report["max_steps"] == tiny["run"].cfg.env.max_steps
    assert report["frame_skip"] == tiny["run"].cfg.env.frame_skip
    agent, random = report["agent"], report["random"]
    assert [e["seed"] for e in agent["episodes_detail"]] == by_hand["seeds"]
    assert [e["seed"] for e in random["episodes_detail"]] == by_hand["seeds"]
    assert [e["return"] for e in agent["episodes_detail"]] == by_hand["agent"]
    assert [e["steps"] for e in agent["episodes_detail"]] == by_hand["agent_steps"]
    assert [(e["return"], e["steps"]) for e in random["episodes_detail"]] == by_hand["random"]
    for block in (agent, random):
        returns = np.array([e["return"] for e in block["episodes_detail"]])
        assert block["episodes"] == EPISODES
        assert block["mean"] == pytest.approx(returns.mean())
        assert block["std"] == pytest.approx(returns.std())
        assert (block["min"], block["max"]) == (returns.min(), returns.max())
    assert f"{agent['mean']:.1f} ± {agent['std']:.1f}" in result.stdout
    assert f"{random['mean']:.1f} ± {random['std']:.1f} on the same seeds" in result.stdout
    pacing = report["pacing"]  # eval.pacer_steps > 0: the blind pacer on the same seeds
    assert pacing["pacer_steps"] == PACER_STEPS
    assert [(e["return"], e["steps"]) for e in pacing["episodes_detail"]] == by_hand["pacing"]
    assert pacing["mean"] == pytest.approx(np.mean([r for r, _ in by_hand["pacing"]]))
    assert by_hand["pacing"] != by_hand["random"]
    assert f"blind pacer: {pacing['mean']:.1f} ± {pacing['std']:.1f} on the same seeds" in result.stdout
    # ... and in the agent's dreams (same start z and noise): M's verdict on a policy that cannot look
    assert pacing["dream"] == dream_score(tiny["run"], EPISODES, SEED, "pacing")
    assert pacing["dream"]["episodes"] == EPISODES
    assert 1 <= pacing["dream"]["min"] <= pacing["dream"]["max"] <= tiny["run"].cfg.cmaes.max_steps
    assert f"blind pacer in the dream: {pacing['dream']['mean']:.1f} ± {pacing['dream']['std']:.1f}" in result.stdout
    dream = report["dream"]  # the same controller in M's dream, as CMA-ES dreamt
    assert dream["episodes"] == EPISODES and dream["temperature"] == tiny["run"].cfg.cmaes.temperature
    assert 1 <= dream["min"] <= dream["mean"] <= dream["max"] <= tiny["run"].cfg.cmaes.max_steps
    assert f"{dream['mean']:.1f} ± {dream['std']:.1f} over {EPISODES} dreams" in result.stdout


def test_video_holds_the_whole_first_episode(evaluated, by_hand):
    _, report = evaluated
    assert len(report["videos"]) == 1  # eval.video_episodes = 1
    path = Path(report["videos"][0])
    assert path.name == f"agent_seed{SEED}.mp4" and path.stat().st_size > 0
    with imageio.get_reader(path, format="FFMPEG") as reader:
        frames = sum(1 for _ in reader.iter_data())
    assert frames == by_hand["agent_steps"][0] + 1  # the reset frame, then one per step


def test_random_policy_is_played_again_unless_env_seeds_and_step_limit_match(make_run):
    run = make_run()
    seeds = [5, 6, 7]
    played = [{"seed": s, "return": float(s), "steps": 3} for s in seeds]
    report = {"env": run.cfg.env.name, "frame_skip": run.cfg.env.frame_skip, "seeds": [5, 7],
              "max_steps": run.cfg.env.max_steps, "random": {"episodes": 3, "episodes_detail": played}}
    write_json(run.path("eval.json"), report)
    assert _earlier_baseline(run, seeds, "random", run.path("eval.json")) == played
    assert _earlier_baseline(run, seeds, "pacing", run.path("eval.json")) is None  # never played
    assert _earlier_baseline(run, [5, 6, 7, 8], "random", run.path("eval.json")) is None  # more episodes
    for key, value in (("env", "carracing"), ("max_steps", run.cfg.env.max_steps + 1), ("max_steps", None),
                       ("frame_skip", run.cfg.env.frame_skip + 1), ("frame_skip", None)):
        changed = {**report, key: value} if value is not None else {k: v for k, v in report.items() if k != key}
        write_json(run.path("eval.json"), changed)
        assert _earlier_baseline(run, seeds, "random", run.path("eval.json")) is None, key
    run.path("eval.json").write_text("{torn")
    assert _earlier_baseline(run, seeds, "random", run.path("eval.json")) is None


def test_pacer_is_played_again_when_its_leg_length_changes(make_run):
    run = make_run(overrides=["eval.pacer_steps=110"])
    seeds = [5, 6, 7]
    played = [{"seed": s, "return": float(s), "steps": 3} for s in seeds]
    report = {"env": run.cfg.env.name, "frame_skip": run.cfg.env.frame_skip, "seeds": [5, 7],
              "max_steps": run.cfg.env.max_steps,
              "pacing": {"episodes": 3, "pacer_steps": 110, "episodes_detail": played}}
    write_json(run.path("eval.json"), report)
    assert _earlier_baseline(run, seeds, "pacing", run.path("eval.json")) == played
    write_json(run.path("eval.json"), {**report, "pacing": {**report["pacing"], "pacer_steps": 80}})
    assert _earlier_baseline(run, seeds, "pacing", run.path("eval.json")) is None


def test_traces_script_replays_the_evaluated_episodes(tiny, evaluated, tmp_path):
    """scripts/takecover_traces.py plays the agent as evaluate does: the same steps per seed."""
    _, report = evaluated
    png = tmp_path / "before_hit.png"
    result = subprocess.run([sys.executable, "scripts/takecover_traces.py", "--run", str(tiny["run"].dir),
                             "--episodes", str(EPISODES), "--seed", str(SEED), "--recon", str(png)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line[:5].isdigit()]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(e["seed"], e["steps"]) for e in report["agent"]["episodes_detail"]]
    assert f"{EPISODES} episodes: {report['agent']['mean']:.1f} ± {report['agent']['std']:.1f} steps" in result.stdout
    if any(int(r[2]) for r in rows):  # an episode with a hit long enough to look back 30 steps
        assert png.stat().st_size > 0


def test_branches_script_replays_each_death_exactly(tiny, evaluated, tmp_path):
    """scripts/takecover_branches.py plays evaluate's episodes; a replay of a death's actions dies at the
    same step; holding the agent's own button over its last step kills again."""
    _, report = evaluated
    out = tmp_path / "branches.json"
    result = subprocess.run([sys.executable, "scripts/takecover_branches.py", "--run", str(tiny["run"].dir),
                             "--episodes", str(EPISODES), "--seed", str(SEED), "--before", "1", "3", "--window", "5",
                             "--dreams", "2", "--workers", "1", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    played = [line.split() for line in result.stdout.splitlines() if line.startswith("played seed")]
    episodes = report["agent"]["episodes_detail"]
    assert [(int(r[2].rstrip(":")), int(r[3])) for r in played] == [(e["seed"], e["steps"]) for e in episodes]
    rows = json.loads(out.read_text())["rows"]
    died = {e["seed"] for e in episodes if e["steps"] < MAX_STEPS}
    assert died and {r["seed"] for r in rows} == died
    assert all(r["deterministic"] for r in rows)
    last = [r for r in rows if r["k"] == 1]
    assert len(last) == len(died) and not any(r["escaped"][r["press"]] for r in last)
    assert all(0.0 <= p <= 1.0 for r in rows for p in r["dream"].values())


def test_branches_replay_plays_the_run_s_frame_skip_and_step_cap():
    """A replay plays the game as the run does: with 2 tics a step, the same actions end at the same
    step as the episode they came from, and a hold that reaches the step cap has not died."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("takecover_branches", ROOT / "scripts" / "takecover_branches.py")
    branches = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(branches)
    from agents.collect import run_episode
    from agents.policies import HeldRandomPolicy

    env = envs.make("takecover", frame_skip=2, max_steps=400)
    try:  # held-random play until a death (about 120 steps at 2 tics a step)
        episode = run_episode(env, HeldRandomPolicy(env.action_space, 1, 10), SEED, 400)
    finally:
        env.close()
    assert episode["terminated"][-1]
    actions = episode["action"][:, 0]
    replays = [branches.replay(SEED, actions, frame_skip=2, max_steps=400) for _ in range(2)]
    assert replays == [(len(actions), True)] * 2
    # Stepping as fast as a 1-tic run moves the death (or the cap) elsewhere.
    assert branches.replay(SEED, actions, frame_skip=1, max_steps=400) != (len(actions), True)
    assert branches.replay(SEED, np.zeros(0, np.float32), 0.0, 5, frame_skip=2, max_steps=5) == (5, False)


def test_dream_baselines_script_scores_the_pacer_as_evaluate_does(tiny, tmp_path):
    """scripts/dream_baselines.py plays evaluate's dreams: its pacer line is dream_score's."""
    from agents.evaluate import dream_score
    from envs.dream import load_world_model

    folder = tmp_path / "run"
    shutil.copytree(tiny["run"].dir, folder)
    run = open_run(folder, None, create=False)
    m = load_world_model(run)
    with torch.no_grad():  # P(done) swings with h: dreams end at steps that depend on the actions
        m.head.weight[-1].mul_(200.0)
        m.head.bias[-1] = -2.0
    save_m(run.m_path, m, dataclasses.asdict(run.cfg.model))
    expected = dream_score(run, 8, SEED, "pacing")
    result = subprocess.run([sys.executable, "scripts/dream_baselines.py", "--run", str(folder), "--dreams", "8",
                             "--pacer", str(PACER_STEPS)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {k.strip(): v for k, v in (line.split(":", 1) for line in result.stdout.splitlines())}
    assert set(lines) == {"always left", "always right", "stand still", f"pacer {PACER_STEPS}"}
    assert lines[f"pacer {PACER_STEPS}"].startswith(f" {expected['mean']:.1f} ± {expected['std']:.1f}")
    assert expected["min"] < run.cfg.cmaes.max_steps  # dreams do end, so the lines can differ
    assert len(set(lines.values())) > 1


def test_play_many_plays_each_seed_with_its_own_controller(tiny, evaluated):
    """One controller per seed (scripts/takecover_real_cmaes.py plays a CMA-ES population so):
    each episode is the one `evaluate` plays for that controller and seed, whatever its
    batch-mates do, and results come in the order asked, repeated seeds included."""
    _, report = evaluated
    by_seed = {e["seed"]: e["return"] for e in report["agent"]["episodes_detail"]}
    run, params = tiny["run"], tiny["params"]
    still = np.zeros_like(params)  # always "stay": dies at other steps than the agent
    mixed = play_many(run, "agent", [SEED, SEED, SEED + 1], np.stack([params, still, params]), workers=2)
    alone = play_many(run, "agent", [SEED], still, workers=1)
    assert [r["seed"] for r in mixed] == [SEED, SEED, SEED + 1]
    assert mixed[0]["return"] == by_seed[SEED] and mixed[2]["return"] == by_seed[SEED + 1]
    assert mixed[1]["return"] == alone[0]["return"]
    assert mixed[1]["return"] != mixed[0]["return"]  # the rows did play different controllers
    with pytest.raises(ValueError, match="2 controllers for 3 seeds"):
        play_many(run, "agent", [SEED, SEED, SEED + 1], np.stack([params, still]), workers=1)


def test_real_cmaes_script_logs_real_and_dream_fitness_and_resumes(tiny, tmp_path):
    from agents.controller import load_controller

    out = tmp_path / "real"
    command = [sys.executable, "scripts/takecover_real_cmaes.py", "--run", str(tiny["run"].dir), "--out", str(out),
               "--generations", "2", "--population", "2", "--episodes", "1", "--check-every", "2",
               "--check-episodes", "1", "--dream-rollouts", "2", "--workers", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (out / "real_cmaes.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in log] == [1, 2]
    assert all(len(r["dream"]) == len(r["real"]) == 3 for r in log)  # 2 candidates and the centre
    assert all(r["centre"] == r["real"][-1] for r in log)
    assert "check_mean" in log[1] and "check_mean" not in log[0]
    params, meta = load_controller(out / "controller.pt", expected_params=tiny["params"].size)
    assert meta["generation"] == 2 and meta["real_score"] == log[1]["check_mean"]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len((out / "real_cmaes.jsonl").read_text().splitlines()) == 2  # done: nothing replayed
    # --rescore draws generation 1's candidates again: in the same run's dream, the same scores.
    rescored = subprocess.run([*command, "--rescore", str(tiny["run"].dir)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    assert rescored.returncode == 0, rescored.stderr
    assert f"dream mean {np.mean(log[0]['dream']):.1f} " in rescored.stdout
    assert len((out / "real_cmaes.jsonl").read_text().splitlines()) == 2  # it logs and plays nothing
    bad = subprocess.run([*command[:-2], "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.startswith("error: --workers 0") and "Traceback" not in bad.stderr


def test_hazard_counts_deaths_per_step_lived_in_each_bin():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hazard", ROOT / "scripts" / "takecover_hazard.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # died at step 5, died at 15, cut off at the limit 20: bins [0, 10) and [10, 20)
    rows = script.hazard(np.array([5, 15, 20]), np.array([True, True, False]), (0, 10, 20, 30))
    assert rows[0] == (1000.0 / (5 + 10 + 10), 1, 3)
    assert rows[1] == (1000.0 / (5 + 10), 1, 2)
    assert np.isnan(rows[2][0]) and rows[2][1:] == (0, 0)


def test_hazard_script_reads_eval_json_and_dreams(tiny, evaluated):
    command = [sys.executable, "scripts/takecover_hazard.py", "--run", str(tiny["run"].dir), "--dreams", "4",
               "--teacher-forced", "2", "--bins", "0", "2", "5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = [line[:22].strip() for line in result.stdout.splitlines()[1:]]
    assert names == ["real agent", "real random policy", "real pacer", "dream agent", "dream pacer",
                     "data: 2 longest", "M's P(done) on them"]
    _, report = evaluated
    steps = np.array([e["steps"] for e in report["agent"]["episodes_detail"]])
    alive = [line for line in result.stdout.splitlines() if line.startswith("real agent")][0]
    assert f"/{(steps > 2).sum():3d})" in alive  # episodes alive at step 2
    bad = subprocess.run([*command[:-3], "5", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.startswith("error: --dreams 4 --bins 5 2") and "Traceback" not in bad.stderr


def test_traces_script_refuses_a_carracing_run(make_run):
    run = make_run(overrides=["env.name=carracing"])
    result = subprocess.run([sys.executable, "scripts/takecover_traces.py", "--run", str(run.dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "carracing" in result.stderr and result.stderr.startswith("error:")


# ----------------------------------------------------------------- bad input

def _cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def _assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for text in named:
        assert text in lines[0], lines[0]


@pytest.fixture
def copied(tiny, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny["run"].dir, run_dir, ignore=shutil.ignore_patterns("eval.json", "videos"))
    return run_dir


def test_run_without_m_names_m_pt(copied):
    (copied / "m.pt").unlink()
    _assert_one_line_error(_cli("evaluate", "--run", copied, "--quiet"), "m.pt", "train-rnn")
    assert not (copied / "eval.json").exists()


def test_controller_of_the_wrong_size_names_file_and_sizes(tiny, copied):
    size = tiny["params"].size
    save_controller(copied / "controller.pt", np.zeros(size + 3, np.float32), {"env": "takecover"})
    _assert_one_line_error(_cli("evaluate", "--run", copied, "--quiet"), "controller.pt", str(size + 3), str(size))
    assert not (copied / "eval.json").exists()


def test_evaluating_under_other_settings_leaves_the_runs_config_and_report_alone(copied):
    """--set and --episodes hold for that evaluation only: config.yaml keeps the run's settings,
    eval.json its own score, and the screen goes to evals/<what changed>.json."""
    config = (copied / "config.yaml").read_bytes()
    write_json(copied / "eval.json", {"agent": {"mean": 123.0}})
    result = _cli("evaluate", "--run", copied, "--quiet", "--episodes", "2", "--set", "eval.seed=3000000",
                  "--set", "eval.pacer_steps=0")
    assert result.returncode == 0, result.stderr
    assert (copied / "config.yaml").read_bytes() == config
    assert json.loads((copied / "eval.json").read_text()) == {"agent": {"mean": 123.0}}
    [screen] = (copied / "evals").iterdir()
    assert screen.name == "episodes=2,eval.pacer_steps=0,eval.seed=3000000.json"
    report = json.loads(screen.read_text())
    assert report["seeds"] == [3_000_000, 3_000_001] and report["agent"]["episodes"] == 2
    assert "pacing" not in report and str(screen) in result.stdout
    run = open_run(copied, None, ["eval.seed=3000000"], create=False)
    assert report_path(run, EPISODES) == copied / "evals" / "eval.seed=3000000.json"
    assert report_path(open_run(copied, None, create=False), EPISODES) == copied / "eval.json"


@pytest.mark.parametrize("args, named", [(["--episodes", "0"], "--episodes"), (["--backend", "foo"], "--backend")],
                         ids=["zero-episodes", "unknown-backend"])
def test_bad_arguments_are_refused(copied, args, named):
    result = _cli("evaluate", "--run", copied, "--quiet", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert named in result.stderr.strip().splitlines()[-1]
    assert not (copied / "eval.json").exists()


def test_ray_backend_without_ray_is_a_one_line_error(copied, tmp_path):
    # A `ray` package first on the path that fails to import, as when Ray is not installed.
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray (test stub)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    _assert_one_line_error(_cli("evaluate", "--run", copied, "--backend", "ray", "--quiet", env=env),
                           "--backend ray", "not installed")
    assert not (copied / "eval.json").exists()


# ----------------------------------------------------------------- the dream by name

def test_make_dream_from_a_run_folder_passes_check_env(tiny):
    env = envs.make("dream", run=str(tiny["run"].dir))
    check_env(env)
    assert env.observation_space.shape == (tiny["m"].feature_dim(tiny["features"]),)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8


def test_export_makes_a_small_evaluable_agent(tiny, tmp_path):
    out = tmp_path / "pretrained"
    result = _cli("export", "--run", tiny["run"].dir, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "vae.pt", "m.pt", "controller.pt", "latents"}
    vae = torch.load(out / "vae.pt", weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float16 for t in vae.values())
    for key, value in tiny["vae"].state_dict().items():
        torch.testing.assert_close(vae[key].float(), value, rtol=1e-3, atol=1e-3)
    exported = open_run(out, None, [], create=False)
    returns = evaluate_params(exported, tiny["params"], episodes=2, seed=SEED, workers=1)
    assert len(returns) == 2 and min(returns) > 0
    again = _cli("export", "--run", tiny["run"].dir, "--out", out, "--quiet")
    _assert_one_line_error(again, "not empty")


def test_a_calibrated_run_dreams_and_exports_with_its_ms_threshold(tiny, tmp_path):
    """With cmaes.done_calibration, evaluate's dream and export use the threshold calibration.json
    holds for the run's M (agents/calibrate.py), and export refuses a run that has none."""
    from agents.calibrate import CALIBRATION_FILE
    from agents.cmaes import weights_fingerprint
    from envs.dream import load_world_model

    src = tmp_path / "run"
    shutil.copytree(tiny["run"].dir, src)
    calibrated = open_run(src, None, ["cmaes.done_calibration=1.0"])  # recorded in its config.yaml
    _assert_one_line_error(_cli("export", "--run", src, "--out", tmp_path / "none", "--quiet"),
                           "calibration.json has no threshold")
    assert not (tmp_path / "none").exists()  # refused before anything was written
    m_id = weights_fingerprint(load_world_model(calibrated))
    write_json(src / CALIBRATION_FILE, {"thresholds": {m_id: {"threshold": 0.0}}})
    by_hand = open_run(src, None, ["cmaes.done_calibration=0", "cmaes.done_threshold=0.0"], create=False)
    preset = open_run(src, None, ["cmaes.done_calibration=0"], create=False)
    assert dream_score(calibrated, 8, SEED) == dream_score(by_hand, 8, SEED) != dream_score(preset, 8, SEED)
    out = tmp_path / "exported"
    result = _cli("export", "--run", src, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    exported = open_run(out, None, [], create=False).cfg.cmaes
    assert (exported.done_threshold, exported.done_calibration) == (0.0, 0.0)
