"""The full agent in a real environment: V encodes the frame, C acts, M updates its state.

:class:`Agent` steps a batch of environments at once, so V and M run batched
over them.  At step t: ``z_t = V(frame_t)`` (the posterior mean, or a sample from the
posterior with ``controller.real_z: sample``), ``a_t =
C(M.features(state_t, z_t))`` (plus N(0, σ²) noise, clipped to the action box, with
``controller.action_noise`` = σ > 0), then ``state_{t+1} = M.observe(state_t, z_t, a_t)``.
The game then gets ``a_t`` plus N(0, ρ²) noise, clipped again, with ``controller.real_noise`` =
ρ > 0: noise M does not observe, as the agent's collections in ``iterate`` get ``iterate.noise``.

With ``controller.shield`` = m > 0 (TakeCover, a run with a hazard critic) the critic, which
follows the game with M, also judges a_t before it is played: where its P(death within H steps)
for a_t exceeds that of the safest hold (left, stay or right) by more than m, the agent holds that
instead, and M observes the hold (agents/shield.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agents.controller import ControllerSpec, act_batched, add_action_noise, load_committee, load_controller
from agents.shield import CriticAverage, shield_actions
from worldmodel.config import Config, from_dict
from worldmodel.errors import UserError
from worldmodel.m import State, WorldModel
from worldmodel.runs import Run
from worldmodel.train_m import load_m
from worldmodel.vae import ConvVAE, load_vae, preprocess


class Agent:
    """V + M + C over a batch of environments (all on the CPU or all on one device)."""

    def __init__(self, vae: ConvVAE, m: WorldModel, spec: ControllerSpec, params: np.ndarray,
                 features: str, device: torch.device | str = "cpu", real_z: str = "mean",
                 action_noise: float = 0.0, real_noise: float = 0.0, critic: WorldModel | None = None,
                 shield: float = 0.0):
        """``params``: one controller (P,) for every environment, or one per environment (N, P).
        ``critic``: the run's hazard critic, which overrides C where ``shield`` > 0 says so."""
        params = np.asarray(params)
        if params.ndim not in (1, 2) or params.shape[-1] != spec.num_params:
            raise UserError(f"controller parameters of shape {params.shape}: this config expects "
                            f"({spec.num_params},) or (environments, {spec.num_params})")
        self.vae, self.m, self.spec, self.features = vae, m, spec, features
        self.device = torch.device(device)
        self.params = torch.as_tensor(params, dtype=torch.float32, device=self.device).reshape(-1, spec.num_params)
        self.per_env = params.ndim == 2
        self.real_z = real_z
        self.action_noise, self.real_noise = float(action_noise), float(real_noise)
        if shield > 0 and critic is None:
            raise ValueError("a shield needs the hazard critic")
        self.critic, self.shield = (critic, float(shield)) if shield > 0 else (None, 0.0)
        self.state: State = ()
        self.critic_state: State = ()
        self.overrides = np.zeros(0, np.int64)  # per environment: actions the shield replaced
        self.last_z: torch.Tensor | None = None  # the z's M observed at the last act (B, Z)
        self.generators: list[torch.Generator] = []

    @classmethod
    def from_run(cls, run_dir: str | Path, cfg: Config, params: np.ndarray | None = None,
                 device: torch.device | str = "cpu", m_path: str | Path | None = None) -> Agent:
        """Load V, M and (unless ``params`` is given) the controller from a run folder.

        ``params``: (P,) or one controller per environment (N, P).
        ``m_path``: another M file than the run's m.pt (``select`` plays controllers with the M
        they were checked with, kept in ``m_history/``)."""
        run_dir = Path(run_dir)
        for name, what in (("vae.pt", "train-vae"), ("m.pt", "train-rnn")):
            if not (run_dir / name).exists():
                raise UserError(f"{run_dir}/{name}: not found; run `python run.py {what}` first")
        vae = load_vae(run_dir / "vae.pt", cfg.vae.z_dim, device)
        m = load_m(Path(m_path) if m_path else run_dir / "m.pt", cfg, z_dim=cfg.vae.z_dim, device=device)
        spec = ControllerSpec.for_config(cfg, m)
        critic = None
        if cfg.controller.shield > 0:  # the critic that goes with M: the run's, or the one kept beside M's snapshot
            critics = [load_m(path, cfg, z_dim=cfg.vae.z_dim, device=device)
                       for path in agent_critic_paths(Run(run_dir, cfg), m_path)]
            critic = critics[0] if len(critics) == 1 else CriticAverage(critics)
        if params is None:
            path = run_dir / "controller.pt"
            if not path.exists():
                raise UserError(f"{path}: not found; run `python run.py dream` first")
            params, _ = load_controller(path, spec=spec)
        return cls(vae, m, spec, np.asarray(params, np.float32), cfg.controller.features, device,
                   cfg.controller.real_z, cfg.controller.action_noise, cfg.controller.real_noise,
                   critic, cfg.controller.shield)

    def reset(self, batch_size: int, seeds: list[int] | None = None) -> None:
        """Start ``batch_size`` episodes; ``seeds`` fix each one's draws (z samples with
        ``real_z: sample``, action noise with ``controller.action_noise``)."""
        if self.per_env and batch_size != len(self.params):
            raise ValueError(f"{batch_size} environments for {len(self.params)} controllers")
        self.state = self.m.initial_state(batch_size)
        self.critic_state = self.critic.initial_state(batch_size) if self.critic is not None else ()
        self.overrides = np.zeros(batch_size, np.int64)
        seeds = seeds if seeds is not None else list(range(batch_size))
        # One generator per environment, so an episode's draws do not depend on its batch-mates.
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def add(self, seeds: list[int]) -> None:
        """Start ``len(seeds)`` more episodes, as rows after the others (seeds as in :meth:`reset`)."""
        if self.per_env:
            raise ValueError("an agent with one controller per environment cannot take more environments")
        k = len(seeds)
        self.state = tuple(torch.cat([s, s0]) for s, s0 in zip(self.state, self.m.initial_state(k)))
        if self.critic is not None:
            self.critic_state = tuple(torch.cat([s, s0]) for s, s0 in zip(self.critic_state,
                                                                          self.critic.initial_state(k)))
        self.overrides = np.concatenate([self.overrides, np.zeros(k, np.int64)])
        self.generators += [torch.Generator().manual_seed(int(s)) for s in seeds]

    def keep(self, rows: np.ndarray | list[int]) -> None:
        """Drop finished environments: keep only state rows ``rows`` (indices)."""
        rows = np.asarray(rows, np.int64)  # an empty list too
        index = torch.as_tensor(rows, device=self.device)
        self.state = tuple(s[index] for s in self.state)
        self.critic_state = tuple(s[index] for s in self.critic_state)
        self.overrides = self.overrides[rows]
        if self.per_env:
            self.params = self.params[index]
        self.generators = [self.generators[i] for i in rows.tolist()]

    def _normal(self, dim: int) -> torch.Tensor:
        """N(0, 1) draws (B, dim), row i from environment i's own generator."""
        return torch.stack([torch.randn(dim, generator=g) for g in self.generators]).to(self.device)

    @torch.no_grad()
    def act(self, frames: np.ndarray) -> np.ndarray:
        """frames uint8 (B, 64, 64, 3) -> actions float32 (B, A); advances M's state."""
        z = self.encode(frames)
        return self.to_game(self.commit(z, self.propose(z)))

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """V's z of each frame (B, Z): the posterior mean, or a sample with ``real_z: sample``."""
        mu, logvar = self.vae.encode(preprocess(frames, self.device))
        if self.real_z == "sample":
            return mu + (0.5 * logvar).exp() * self._normal(mu.shape[1])
        return mu

    def propose(self, z: torch.Tensor) -> torch.Tensor:
        """C's actions (B, A) for z and M's state (with ``action_noise``); M does not move yet."""
        features = self.m.features(self.state, z, self.features)
        actions = act_batched(self.spec, self.params if self.per_env else self.params.expand(len(z), -1), features)
        if self.action_noise > 0:  # M observes the action taken, as in the dream
            actions = add_action_noise(self.spec, actions, self.action_noise, self._normal(actions.shape[1]))
        return actions

    def commit(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Play ``actions`` (B, A): the shield may replace some; M (and the critic) observe what is
        played.  Returns the actions played."""
        if self.critic is not None:
            actions, replaced = shield_actions(self.critic, self.critic_state, z, actions, self.shield)
            self.overrides += replaced.cpu().numpy()
            self.critic_state = self.critic.observe(self.critic_state, z, actions)
        self.state, self.last_z = self.m.observe(self.state, z, actions), z
        return actions

    def to_game(self, actions: torch.Tensor) -> np.ndarray:
        """The actions M observed, as the game gets them (plus ``real_noise``, which M does not see)."""
        if self.real_noise > 0:
            actions = add_action_noise(self.spec, actions, self.real_noise, self._normal(actions.shape[1]))
        return actions.cpu().numpy()


def agent_critic_paths(run: Run, m_path: str | Path | None = None) -> list[Path]:
    """The critics that shield an agent playing with the run's M (``m_path`` None) or with the M
    kept in ``m_path`` (a snapshot in ``m_history/``): its own, then the run's latest others.

    An M's id is the fingerprint of all its files (:func:`agents.cmaes.current_m_id`, the name of
    its snapshot), so that the run's own M is not counted again among "the others"; ``select``
    (``m_path`` given) and ``evaluate`` (``m_path`` None, after ``select`` put the pick's M back)
    then average the same critics."""
    from agents.cmaes import current_m_id

    critic = run.cfg.model.ensemble
    if m_path is not None:
        own_id = Path(m_path).stem
        own = run.m_snapshot_path(own_id, critic)
    else:
        own_id = current_m_id(run) if run.cfg.controller.shield_critics > 1 else ""
        own = run.member_path(critic)
    if not own.exists():
        raise UserError(f"{own}: not found; controller.shield needs the hazard critic "
                        "(model.hazard_horizon; `python run.py train-rnn` trains it)")
    return shield_critic_paths(run, own_id, own)


def shield_critic_paths(run: Run, own_id: str, own: Path) -> list[Path]:
    """The critics the shield averages (``controller.shield_critics`` = K): ``own`` (the critic
    trained beside the agent's M, fingerprint ``own_id``), then those kept beside the run's latest
    other M's in ``m_history/`` (newest first), up to K in all."""
    count = run.cfg.controller.shield_critics
    paths = [own]
    if count == 1:
        return paths
    ids = run.m_snapshot_ids()
    if not ids and any(run.dir.glob("m_history/*.pt")):
        raise UserError(f"{run.m_history_index}: not found; controller.shield_critics: {count} needs the order "
                        "of the run's M's, which runs write since it was added (or set controller.shield_critics: 1)")
    for m_id in reversed(ids):
        path = run.m_snapshot_path(m_id, run.cfg.model.ensemble)
        if len(paths) < count and m_id != own_id and path.exists():
            paths.append(path)
    return paths


class Committee:
    """Several agents that share V and play one action: the median of their controllers' actions.

    Each member has its own C and the M it was checked with (an earlier iteration's, say); every
    M observes the action played.  The first member leads: its critic alone shields the vote
    (``controller.shield``), and its ``overrides`` and ``last_z`` are the committee's.  For
    TakeCover, whose game reads an action as left, stay or right by thirds, the median of three
    is the majority's move, and "stay" where all three differ.
    """

    def __init__(self, members: list[Agent]):
        if not members:
            raise ValueError("a committee needs at least one agent")
        if any(m.critic is not None for m in members[1:]):
            raise ValueError("only the committee's first agent may shield")
        self.members, self.lead = members, members[0]

    critic = property(lambda self: self.lead.critic)
    overrides = property(lambda self: self.lead.overrides)
    last_z = property(lambda self: self.lead.last_z)

    def reset(self, batch_size: int, seeds: list[int] | None = None) -> None:
        for member in self.members:
            member.reset(batch_size, seeds)

    def keep(self, rows: np.ndarray | list[int]) -> None:
        for member in self.members:
            member.keep(rows)

    @torch.no_grad()
    def act(self, frames: np.ndarray) -> np.ndarray:
        z = self.lead.encode(frames)
        votes = torch.stack([member.propose(z) for member in self.members])
        actions = self.lead.commit(z, votes.median(dim=0).values)
        for member in self.members[1:]:
            member.commit(z, actions)
        return self.lead.to_game(actions)


def load_agent(run_dir: str | Path, cfg: Config, device: torch.device | str = "cpu") -> Agent | Committee:
    """The run's agent as ``evaluate`` plays it: its controller, or with ``controller.committee`` > 1
    the committee ``select`` kept in ``committee.pt`` (none kept: the controller alone)."""
    run = Run(Path(run_dir), cfg)
    lead = Agent.from_run(run.dir, cfg, device=device)
    path = run.committee_path
    if cfg.controller.committee < 2 or not path.exists():
        return lead
    params, m_ids, _ = load_committee(path, lead.spec)
    if len(params) != cfg.controller.committee or not np.array_equal(params[0], lead.params[0].cpu().numpy()):
        what = (f"has {len(params)} controllers, controller.committee is {cfg.controller.committee}"
                if len(params) != cfg.controller.committee else "leads with another controller than controller.pt")
        raise UserError(f"{path}: {what}; run `python run.py dream --run {run_dir}` to select again "
                        "(or --set controller.committee=1)")
    m_paths = [None if m_id == m_ids[0] else run.m_snapshot_path(m_id) for m_id in m_ids[1:]]
    for m_path in m_paths:
        if m_path is not None and not m_path.exists():
            raise UserError(f"{m_path}: not found; {path} plays a controller with that M")
    return Committee([lead, *followers(run.dir, cfg, list(zip(params[1:], m_paths)), device)])


def followers(run_dir: str | Path, cfg: Config, members: list[tuple[np.ndarray, str | Path | None]],
              device: torch.device | str = "cpu") -> list[Agent]:
    """A committee's members after its leader: each controller with its M (None: the run's m.pt),
    without the shield, which the leader alone plays."""
    quiet = from_dict({"controller": {"shield": 0.0}}, base=cfg)
    return [Agent.from_run(run_dir, quiet, params, device=device, m_path=m_path) for params, m_path in members]

