"""Train M on V's latents (``python run.py train-rnn``), and M's weights file.

Each epoch draws z = μ + σ·ε afresh from V's posterior (as the paper does),
cuts every training episode into windows of ``model.seq_len`` steps, shuffles
them and takes Adam steps on ``M.loss`` with gradient clipping.  With
``model.carry_state`` the windows are not shuffled but dealt to lanes, each
playing whole episodes in order with the state carried from window to window
(``latents.lanes``; truncated backpropagation through time).  Held-out
episodes give a validation loss split by term and the quality of the done
head as the dream feels it.  Each epoch ends in an atomic checkpoint
(``m_ckpt.pt``); rerunning the command resumes from it.  A run with several M
files (``model.ensemble``, ``model.hazard_horizon``) trains them side by side on
a CPU, one single-thread process per core: each file's seeds and data are its
own, so it comes out as it would alone.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worldmodel.config import Config
from worldmodel.errors import UserError
from worldmodel.io import append_jsonl, load_checkpoint, load_state_dict_checked, save_checkpoint
from worldmodel.latents import (
    Latents,
    lanes,
    list_latents,
    load_latents,
    make_batch,
    split_episodes,
    windows,
    with_done_horizon,
)
from worldmodel.m import WorldModel, build_m
from worldmodel.plots import plot_run
from worldmodel.runs import Run
from worldmodel.torch_utils import (
    autocast,
    available_cores,
    cpu_has_native_bf16,
    resolve_device,
    resolve_precision,
)

NEEDS_V = "train-rnn needs V's latents: run `python run.py train-vae` first"
CKPT_NAME = "m_ckpt.pt"
#: A predicted death this many steps or more before the real end counts as a false early death.
EARLY_DEATH_MARGIN = 20
#: ``done_quality`` reports M's mean P(done) this many steps before each real death.
WARNING_STEPS = (0, 1, 3, 6)
#: numpy stream for the validation z sample (training epochs are 1, 2, ...).
_VAL_STREAM = 0


# ----------------------------------------------------------------- M's weights file

def save_m(path: str | os.PathLike, m: WorldModel, cfg_model_dict: dict[str, Any]) -> None:
    """Write M's weights with what is needed to rebuild it: name, sizes and model config."""
    save_checkpoint(path, {
        "m": cfg_model_dict["m"],
        "z_dim": int(m.z_dim),
        "action_dim": int(m.action_dim),
        "model_config": dict(cfg_model_dict),
        "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
    })


def load_m(path: str | os.PathLike, cfg: Config, z_dim: int | None = None, action_dim: int | None = None,
           device: str | torch.device = "cpu") -> WorldModel:
    """Rebuild M from ``path`` under ``cfg`` (eval mode, on ``device``).

    ``z_dim`` / ``action_dim``: the sizes the caller needs (None: take the file's).
    Any mismatch of module, sizes or weight shapes is a UserError naming the file.
    """
    ckpt = load_checkpoint(path)
    needed = ("m", "z_dim", "action_dim", "state_dict")
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not an M weights file (lacks {', '.join(missing)})")
    if ckpt["m"] != cfg.model.m:
        raise UserError(f"{path}: holds M {ckpt['m']!r}, config model.m is {cfg.model.m!r}")
    for name, want in (("z_dim", z_dim), ("action_dim", action_dim)):
        if want is not None and int(ckpt[name]) != int(want):
            raise UserError(f"{path}: M was trained with {name} {ckpt[name]}, expected {want}")
    m = build_m(cfg, int(ckpt["z_dim"]), int(ckpt["action_dim"]))
    load_state_dict_checked(m, ckpt["state_dict"], path)
    return m.to(device).eval()


# ----------------------------------------------------------------- inputs

def vae_z_dim(run: Run) -> int:
    """z_dim of the trained V, checked against ``vae.z_dim``."""
    if not run.vae_path.exists() or not list_latents(run.latents_dir):
        raise UserError(NEEDS_V)
    ckpt = load_checkpoint(run.vae_path)
    if not isinstance(ckpt, dict) or "z_dim" not in ckpt:
        raise UserError(f"{run.vae_path}: not a V weights file (no z_dim)")
    z_dim = int(ckpt["z_dim"])
    if z_dim != run.cfg.vae.z_dim:
        raise UserError(f"{run.vae_path}: V has z_dim {z_dim}, config vae.z_dim is {run.cfg.vae.z_dim}")
    return z_dim


# ----------------------------------------------------------------- one pass over data

def _pass(m: WorldModel, data: Latents, z: np.ndarray, cfg: Config, device: torch.device,
          rng: np.random.Generator | None, opt: torch.optim.Optimizer | None, desc: str,
          precision: torch.dtype | None = None, position: int = 0) -> dict[str, float]:
    """Loss terms averaged over valid steps; trains when ``opt`` is given.

    precision: bfloat16 runs ``m.loss`` under autocast, for an M that allows it
    (``autocast_training``); its heads return float32, so the losses stay float32.
    """
    if not getattr(m, "autocast_training", False):
        precision = None
    seq_len, batch_size = cfg.model.seq_len, cfg.model.batch_size
    if cfg.model.carry_state:  # lanes of whole episodes, the state carried from window to window
        lane_starts, lane_lengths, first = lanes(data, seq_len, batch_size, rng)
        state = m.initial_state(batch_size)
        batches = [(lane_starts[s], lane_lengths[s]) for s in range(len(lane_starts))]
    else:  # shuffled windows, each from a zero state
        starts, lengths = windows(data, seq_len, rng)
        order = rng.permutation(len(starts)) if rng is not None else np.arange(len(starts))
        batches = [(starts[order[i:i + batch_size]], lengths[order[i:i + batch_size]])
                   for i in range(0, len(order), batch_size)]
    sums: dict[str, float] = {}
    steps = 0
    bar = tqdm(range(len(batches)), desc=desc, leave=False, disable=None, position=position)
    for i in bar:
        batch_starts, batch_lengths = batches[i]
        batch = make_batch(data, z, batch_starts, batch_lengths, seq_len, device)
        with torch.set_grad_enabled(opt is not None), autocast(device, precision):
            if cfg.model.carry_state:
                new_episode = torch.from_numpy(first[i]).to(device)[:, None]
                state = tuple(torch.where(new_episode, 0.0, s) for s in state)
                terms, state = m.loss_and_state(batch, state)
                state = tuple(s.detach().float() for s in state)
            else:
                terms = m.loss(batch)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.model.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.model.grad_clip)
            opt.step()
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
        n = int(batch_lengths.sum())
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) * n
        steps += n
    return {key: total / max(steps, 1) for key, total in sums.items()}


@torch.no_grad()
def done_quality(m: WorldModel, data: Latents, threshold: float, device: torch.device) -> dict[str, Any]:
    """How M's done head would end dreams, filtering the real episodes (z = μ, real actions).

    Per step (all episodes, all steps): precision and recall of P(d_{t+1}) > ``threshold``
    against ``terminated``.  Per episode: ``false_early_death_rate``, the share of
    episodes whose first predicted death comes more than ``EARLY_DEATH_MARGIN`` steps
    before the episode's real end.  ``done_p_{k}_before_death``: the mean P(done) k steps
    before the last step of the episodes that end in a death (k in ``WARNING_STEPS``; k = 0
    is the step that kills), i.e. how much warning the head gives.
    """
    m.eval()
    n, t_max = data.n_episodes, int(data.lengths.max())
    starts, lengths = data.starts, data.lengths
    state = m.initial_state(n)
    first_death = np.full(n, -1, dtype=np.int64)
    died = data.terminated[starts + lengths - 1]
    before_death = np.full((n, max(WARNING_STEPS) + 1), np.nan)  # column k: P(done) k steps before the end
    tp = fp = fn = 0
    for t in range(t_max):
        alive = lengths > t
        rows = np.where(alive, starts + t, starts)  # finished episodes repeat a valid row, unused
        z = torch.from_numpy(data.mu[rows]).to(device)
        action = torch.from_numpy(data.action[rows]).to(device)
        state, _, _, p_done = m.imagine_step(state, z, action, 0.0)
        pred = (p_done > threshold).cpu().numpy() & alive
        target = data.terminated[rows] & alive
        tp += int((pred & target).sum())
        fp += int((pred & ~target).sum())
        fn += int((~pred & target).sum())
        first_death[(first_death < 0) & pred] = t
        k = lengths - 1 - t
        near = died & (k >= 0) & (k < before_death.shape[1])
        before_death[near, k[near]] = p_done.float().cpu().numpy()[near]
    early = (first_death >= 0) & (first_death < lengths - 1 - EARLY_DEATH_MARGIN)
    m.train()
    return {
        "done_precision": tp / (tp + fp) if tp + fp else None,
        "done_recall": tp / (tp + fn) if tp + fn else None,
        "false_early_death_rate": float(early.mean()),
        "done_threshold": threshold,
        "done_eval_episodes": n,
        "done_eval_deaths": int(data.terminated.sum()),
        **{f"done_p_{k}_before_death": (float(np.nanmean(before_death[:, k]))
                                        if np.isfinite(before_death[:, k]).any() else None)
           for k in WARNING_STEPS},
    }


# ----------------------------------------------------------------- training

def _ckpt_path(run: Run, member: int):
    """m_ckpt.pt for M (the ensemble's first member), m1_ckpt.pt, m2_ckpt.pt, ... for the others."""
    return run.dir / (CKPT_NAME if member == 0 else f"m{member}_ckpt.pt")


def _load_resume(run: Run, m: WorldModel, opt: torch.optim.Optimizer, data: Latents, member: int) -> int:
    """Restore M, Adam and RNG from its checkpoint; returns the epochs already done (0 if none)."""
    path = _ckpt_path(run, member)
    if not path.exists():
        return 0
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "torch_rng"} <= set(ckpt):
        raise UserError(f"{path}: not an M training checkpoint; delete it to train M afresh")
    for name, have in (("z_dim", data.z_dim), ("action_dim", data.action_dim)):
        if int(ckpt.get(name, -1)) != have:
            raise UserError(f"{path}: checkpoint has {name} {ckpt.get(name)}, the latents have {have}; "
                            "delete it to train M afresh")
    load_state_dict_checked(m, ckpt["model"], path)
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"resuming M training from {path} after epoch {int(ckpt['epoch'])}", flush=True)
    return int(ckpt["epoch"])


def save_training_state(run: Run, m: WorldModel, opt: torch.optim.Optimizer, epoch: int, member: int) -> None:
    """M file ``member``'s checkpoint after ``epoch`` epochs: what a rerun resumes from."""
    save_checkpoint(_ckpt_path(run, member), {
        "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "z_dim": int(m.z_dim),
        "action_dim": int(m.action_dim),
        "torch_rng": torch.get_rng_state(),
    })


def _evaluate(m: WorldModel, train: Latents, val: Latents | None, cfg: Config,
              device: torch.device) -> dict[str, Any]:
    """Validation loss by term and done quality (on held-out episodes, else on training ones)."""
    record: dict[str, Any] = {}
    if val is not None:
        m.eval()
        z = val.sample_z(np.random.default_rng([cfg.model.seed, _VAL_STREAM]))
        terms = _pass(m, val, z, cfg, device, rng=None, opt=None, desc="validate")
        record.update({f"val/{k}": v for k, v in terms.items()})
        m.train()
    record.update(done_quality(m, val if val is not None else train, cfg.cmaes.done_threshold, device))
    record["done_eval_split"] = "val" if val is not None else "train"
    return record


def train_m(run: Run, skip_bad: bool = False) -> dict[str, Any]:
    """Train M on the run's latents, resuming from ``m_ckpt.pt``; writes ``m.pt``.

    With ``model.ensemble`` = K > 1, K-1 more M's follow from seeds ``model.seed`` + k
    (``m1.pt`` ...; worldmodel/ensemble.py).  With ``model.hazard_horizon`` = N > 0 one more,
    the hazard critic (``mK.pt``, seed ``model.seed`` + K), learns "death within the next N
    steps" with its done head.  On a CPU the M files train side by side in
    :func:`member_processes` processes, one thread each (``model.workers``).  Returns the
    first M's summary: epochs done, last validation terms and done-head quality.
    """
    cfg = run.cfg
    device = resolve_device(cfg.system.device)
    z_dim = vae_z_dim(run)
    splits = _splits(run, z_dim, skip_bad)  # here too when workers train: a bad file is one clear error
    precision = _precision(cfg, device)
    processes = member_processes(cfg, device, run.m_files)
    if processes > 1:
        del splits  # each worker loads its own copy
        summaries = _train_in_processes(run, processes, z_dim, precision, skip_bad)
    else:
        horizons = [_done_horizon(cfg, k) for k in range(run.m_files)]
        labelled = {h: _labelled(splits, h) for h in set(horizons)}  # one copy per horizon, not per M
        summaries = [_train_member(run, k, *labelled[h], device, precision) for k, h in enumerate(horizons)]
    plot_run(run, stages=("m",))
    print(format_done(summaries[0]))
    return summaries[0]


def train_member(run: Run, member: int, skip_bad: bool = False) -> dict[str, Any]:
    """Train M file ``member`` alone, in this process, as :func:`train_m` trains it (its seed, the
    run's split, its done horizon, precision and epochs; resuming from its checkpoint): e.g. the
    hazard critic of another ``model.hazard_horizon`` beside a run's agent
    (scripts/takecover_critic.py).  Returns its summary."""
    device = resolve_device(run.cfg.system.device)
    splits = _splits(run, vae_z_dim(run), skip_bad)
    return _train_member(run, member, *_labelled(splits, _done_horizon(run.cfg, member)), device,
                         _precision(run.cfg, device))


def _precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype M trains in: ``system.precision``, but float32 where the CPU has no bfloat16 LSTM."""
    precision = resolve_precision(cfg.system.precision, device)
    if precision is not None and device.type == "cpu" and not cpu_has_native_bf16():
        # oneDNN has no bfloat16 LSTM without AVX-512: nn.LSTM would fail to build its kernel.
        print("train-rnn: system.precision bfloat16 needs AVX-512 BF16 or AMX for M's LSTM, "
              "which this CPU lacks; M trains in float32")
        precision = None
    return precision


def member_processes(cfg: Config, device: torch.device, members: int) -> int:
    """How many processes train a run's ``members`` M files: on a CPU up to one per core and
    ``model.workers``, in full rounds (a count that divides ``members``); one (this process,
    every thread) on a GPU, for a single M, or where no such count above one exists.

    Each member is one LSTM's small matrix products, which two threads speed up by only
    ~1.4x: two members side by side on one thread each train ~1.16x faster than one after
    the other on both (docs/benchmarks.md, "Training the M files").  A member left to
    train alone in a last round would run on one thread, slower than on all: so three M's
    on two cores train one after another.
    """
    if device.type != "cpu" or members < 2:
        return 1
    most = max(1, min(members, cfg.model.workers or available_cores()))
    return max(p for p in range(1, most + 1) if members % p == 0)


def _done_horizon(cfg: Config, member: int) -> int:
    """What M file ``member``'s done head learns: the ensemble's horizon, or the hazard critic's."""
    return cfg.model.done_horizon if member < cfg.model.ensemble else cfg.model.hazard_horizon


def _splits(run: Run, z_dim: int, skip_bad: bool) -> tuple[Latents, Latents | None]:
    """The run's latents as (training, validation) episodes; the same split for every M."""
    data = load_latents(run.latents_dir, z_dim, skip_bad=skip_bad)
    train_ids, val_ids = split_episodes(data.n_episodes, run.cfg.model.val_fraction, run.cfg.model.seed)
    return data.subset(train_ids), (data.subset(val_ids) if len(val_ids) else None)


def _labelled(splits: tuple[Latents, Latents | None], horizon: int) -> tuple[Latents, Latents | None]:
    """(train, val) whose done marks "death within ``horizon`` steps"."""
    return tuple(None if d is None else with_done_horizon(d, horizon) for d in splits)


#: Seconds a member may train before its worker counts as hung: long runs are normal here.
_MEMBER_TIMEOUT_S = 7 * 24 * 3600.0


def _train_in_processes(run: Run, processes: int, z_dim: int, precision: torch.dtype | None,
                        skip_bad: bool) -> list[dict[str, Any]]:
    """Every M file of the run trained by a pool of one-thread processes; their summaries in order."""
    from agents.workers import run_tasks  # the pool collect and evaluate use (spawned, one thread)

    tasks = [{"name": f"M file {run.member_path(k).name}", "run": run, "member": k, "z_dim": z_dim,
              "skip_bad": skip_bad, "precision": precision, "position": k % processes}
             for k in range(run.m_files)]
    print(f"train-rnn: {len(tasks)} M's in {processes} processes side by side, one thread each", flush=True)
    summaries: dict[int, dict[str, Any]] = {}
    for task, result in run_tasks(_member_task, tasks, processes, timeout=_MEMBER_TIMEOUT_S, retries=0):
        if "user_error" in result:
            raise UserError(result["user_error"])
        summaries[task["member"]] = result
    return [summaries[k] for k in range(len(tasks))]


#: A worker's latents, loaded once for all the M files it trains, and labelled once per horizon.
_WORKER_DATA: dict[str, Any] = {}


def _member_task(task: dict[str, Any]) -> dict[str, Any]:
    """In a worker: train one M file; a UserError comes back as ``{"user_error": message}``."""
    run, member = task["run"], task["member"]
    key = (str(run.dir), task["z_dim"], task["skip_bad"])
    try:
        if _WORKER_DATA.get("key") != key:
            _WORKER_DATA.clear()
            with warnings.catch_warnings():  # the parent has warned about skipped files already
                warnings.simplefilter("ignore")
                _WORKER_DATA.update(key=key, splits=_splits(run, task["z_dim"], task["skip_bad"]), labelled={})
        horizon, labelled = _done_horizon(run.cfg, member), _WORKER_DATA["labelled"]
        if horizon not in labelled:
            labelled[horizon] = _labelled(_WORKER_DATA["splits"], horizon)
        return _train_member(run, member, *labelled[horizon], torch.device("cpu"), task["precision"],
                             position=task["position"])
    except UserError as exc:
        return {"user_error": str(exc)}


def _train_member(run: Run, member: int, train: Latents, val: Latents | None,
                  device: torch.device, precision: torch.dtype | None, position: int = 0) -> dict[str, Any]:
    cfg = run.cfg
    seed = cfg.model.seed + member
    torch.manual_seed(seed)
    m = build_m(cfg, train.z_dim, train.action_dim).to(device)
    opt = torch.optim.Adam(m.parameters(), lr=cfg.model.lr)
    done_epochs = _load_resume(run, m, opt, train, member)
    metrics_path = run.metrics_path("m" if member == 0 else f"m{member}")
    name = ("" if member == 0 else f" (ensemble member {member})" if member < cfg.model.ensemble
            else f" (hazard critic, death within {cfg.model.hazard_horizon} steps)")
    record: dict[str, Any] = {}
    for epoch in range(done_epochs + 1, cfg.model.epochs + 1):
        t0 = time.time()
        rng = np.random.default_rng([seed, epoch])
        terms = _pass(m, train, train.sample_z(rng), cfg, device, rng, opt,
                      desc=f"train-rnn{name} epoch {epoch}/{cfg.model.epochs}", precision=precision,
                      position=position)
        record = {"epoch": epoch, **{f"train/{k}": v for k, v in terms.items()}}
        record.update(_evaluate(m, train, val, cfg, device))
        record["seconds"] = time.time() - t0
        append_jsonl(metrics_path, record)
        save_training_state(run, m, opt, epoch, member)
        print(_format(record) + name, flush=True)
    path = run.member_path(member)
    trained = bool(record)
    if not trained:  # nothing left to train: report the stored model
        record = {"epoch": done_epochs, **_evaluate(m, train, val, cfg, device)}
    ckpt = _ckpt_path(run, member)
    if not trained and path.exists() and ckpt.exists() and path.stat().st_mtime_ns > ckpt.stat().st_mtime_ns:
        # Written after the checkpoint: by this training, or by `select`, which may have put back
        # an earlier M that the chosen controller was checked with (agents/select.py).
        print(f"M is trained; {path} kept", flush=True)
    else:
        save_m(path, m, dataclasses.asdict(cfg.model))
        print(f"M saved to {path}", flush=True)
    return {"m_path": str(path), "train_episodes": train.n_episodes,
            "val_episodes": val.n_episodes if val is not None else 0, **record}


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _format(record: dict[str, Any]) -> str:
    terms = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k.startswith(("train/", "val/")))
    return f"epoch {record['epoch']}: {terms}"


def format_done(s: dict[str, Any]) -> str:
    return (f"done head on {s['done_eval_episodes']} {s['done_eval_split']} episodes "
            f"(threshold {s['done_threshold']}): precision {_fmt(s['done_precision'])}, "
            f"recall {_fmt(s['done_recall'])}, "
            f"false early deaths (> {EARLY_DEATH_MARGIN} steps before the end) "
            f"{_fmt(s['false_early_death_rate'])}; mean P(done) "
            + ", ".join(f"{_fmt(s.get(f'done_p_{k}_before_death'))}" for k in WARNING_STEPS)
            + f" at {', '.join(map(str, WARNING_STEPS))} steps before a death")
