"""An ensemble of M's for the dream: the first member dreams, all of them judge the reward (and the end).

A controller evolved in one M's dream finds the places where that M is wrong in its
favour: CarRacing's reward head, asked about actions and states the data never held,
pays for standing on the brake or flooring the gas.  M's trained on the same data from
different seeds agree where the data is dense and disagree where it is thin, so the
dream pays

    r = mean_k r_k - λ · std_k r_k,

the members' mean reward less ``cmaes.disagreement`` (λ) times their spread: an
uncertainty penalty in the manner of model-based offline RL (MOPO, Yu et al. 2020).

TakeCover has no reward to judge: the dream pays one point per step it lasts, and a
controller evolved in it finds the places where M is sure, wrongly, that nobody dies
(docs/results.md).  ``cmaes.ensemble_done`` lets the members judge the end as well:
``max`` ends a dream where *any* member expects a death (the pessimistic reading, as
MOReL (Kidambi et al. 2020) ends a rollout where the models disagree), ``mean`` on their
mean P(done); ``first`` (the default) leaves it to the first member.

A hazard critic (``model.hazard_horizon`` = N) is one more M whose done head learns "death
within the next N steps".  An M trained for the next step alone sees a death coming only a
step or two ahead, and in TakeCover it rates running on as safer than the stop that dodges
the fireball in flight; the critic looks further and points the right way more often
(docs/results.md, "Could the agent have dodged?").  Its P_H reads the dream two ways: each
step pays 1 - min(1, λ_H · P_H) instead of 1 (``cmaes.hazard_penalty``, returned here as the
step's reward, -min(1, λ_H · P_H)), so a dream in danger earns less without ending; and
P_H > ``cmaes.hazard_threshold`` ends the dream like a death.  With ``cmaes.dream_shield`` the
dream also plays the real game's shield (``controller.shield``, agents/shield.py): the dream
(envs/dream.py) lets the critic replace C's action by the safest hold, as the agent does in the
game.  Where none of these reads it (a run whose critic only shields the agent in the real game),
the dream does not step the critic at all: its state stays as it began, and a dream step costs
one M less.

By default only the first member (``m.pt``) moves the dream: its z sample, its done probability
and its features for the controller, exactly as without an ensemble (and it alone is
thinned by ``cmaes.dream_dropout``); the others
(``m1.pt``, ``m2.pt``, ..., and the critic) follow the same z's and actions with their own
states, and only their rewards and done probabilities are used.  A controller evolved so
can still thrive on the first member's own mistakes about what comes next (a fireball that
fades where it should grow).  With ``cmaes.ensemble_moves: each`` the members take turns:
noise stream s (the dreams of every candidate that share it) follows member s mod K's z
samples all the way, as PETS (Chua et al. 2018) propagates each particle through one
bootstrap, so a controller must last in every member's world.  Every member then draws its
z from the same noise, and the mover's z replaces the first member's in place; C still reads
the first member's state, which now, as in the real game, observes z's it did not predict.
In the real game the agent needs the first member alone.
"""

from __future__ import annotations

import torch

from worldmodel.config import ENSEMBLE_DONE_RULES, ENSEMBLE_MOVERS
from worldmodel.m import State, WorldModel


class Ensemble(WorldModel):
    """K M's behind the :class:`WorldModel` interface of the dream (not trainable as one)."""

    def __init__(self, members: list[WorldModel], disagreement: float = 0.0, done: str = "first",
                 critic: WorldModel | None = None, hazard_penalty: float = 0.0, hazard_threshold: float = 1.0,
                 dream_shield: float = 0.0, moves: str = "first"):
        """``critic``: the hazard critic, judged after the members (its state comes last).
        ``dream_shield``: the margin of the critic's shield in the dream (0: none).
        ``moves``: ``first`` or ``each`` (``cmaes.ensemble_moves``, above)."""
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if done not in ENSEMBLE_DONE_RULES:
            raise ValueError(f"done rule must be one of {ENSEMBLE_DONE_RULES}, got {done!r}")
        if moves not in ENSEMBLE_MOVERS:
            raise ValueError(f"moves must be one of {ENSEMBLE_MOVERS}, got {moves!r}")
        self.moves_each = moves == "each" and len(members) > 1
        if critic is None and (hazard_penalty > 0 or hazard_threshold < 1 or dream_shield > 0):
            raise ValueError("a hazard penalty, threshold or shield needs a hazard critic")
        self.done_rule = done
        self.n_members = len(members)
        self.members = torch.nn.ModuleList(members + ([] if critic is None else [critic]))
        self.hazard_penalty, self.hazard_threshold = float(hazard_penalty), float(hazard_threshold)
        self.dream_shield = float(dream_shield)
        self.disagreement = float(disagreement)
        self.z_dim, self.action_dim = members[0].z_dim, members[0].action_dim
        self.predict_reward = all(getattr(m, "predict_reward", True) for m in members)
        self._sizes = [len(m.initial_state(1)) for m in self.members]

    @property
    def has_critic(self) -> bool:
        """Is the last of :attr:`members` a hazard critic?"""
        return len(self.members) > self.n_members

    @property
    def dreams_critic(self) -> bool:
        """Does the dream read the critic (a penalty, a threshold, a shield)?  If not, it is not stepped."""
        return self.has_critic and (self.hazard_penalty > 0 or self.hazard_threshold < 1 or self.dream_shield > 0)

    @property
    def critic(self) -> WorldModel:
        if not self.has_critic:
            raise ValueError("this ensemble has no hazard critic")
        return self.members[-1]

    def critic_state(self, state: State) -> State:
        """The critic's part of the ensemble's ``state``."""
        return self._split(state)[-1] if self.has_critic else ()

    @classmethod
    def from_config(cls, cfg, z_dim: int, action_dim: int) -> Ensemble:
        raise TypeError("an Ensemble is built from trained members (envs.dream.load_world_model)")

    # The state is the members' state tensors, one after the other (all batch-first).
    def _split(self, state: State) -> list[State]:
        parts, start = [], 0
        for size in self._sizes:
            parts.append(state[start:start + size])
            start += size
        return parts

    def initial_state(self, batch_size: int) -> State:
        return tuple(s for m in self.members for s in m.initial_state(batch_size))

    def feature_dim(self, mode: str) -> int:
        return self.members[0].feature_dim(mode)

    def features(self, state: State, z: torch.Tensor, mode: str) -> torch.Tensor:
        return self.members[0].features(self._split(state)[0], z, mode)

    def observe(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        return tuple(s for m, part in zip(self.members, self._split(state))
                     for s in m.observe(part, z, action))

    def set_dream_precision(self, dtype: torch.dtype | None) -> None:
        for m in self.members:
            m.set_dream_precision(dtype)

    def sample_noise(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """The first member's noise; with ``moves: each`` then row s's mover, s mod K (B,) int64,
        drawn from nothing, so the dreams that share a stream share a mover however they are
        compacted, and the random numbers are the same as with ``first``."""
        noise = self.members[0].sample_noise(batch_size, generator)
        return (*noise, self._movers(batch_size, noise[0].device)) if self.moves_each else noise

    def _movers(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Row s's mover under ``moves: each``: member s mod K, (B,) int64."""
        return torch.arange(batch_size, device=device) % self.n_members

    def dropout_masks(self, batch_size: int, rate: float, generator: torch.Generator | None) -> torch.Tensor:
        """The first member's masks: it alone moves the dream, so it alone is thinned."""
        return self.members[0].dropout_masks(batch_size, rate, generator)

    def imagine_step(self, state: State, z: torch.Tensor, action: torch.Tensor, temperature: float,
                     generator: torch.Generator | None = None,
                     noise: tuple[torch.Tensor, ...] | None = None, dropout: torch.Tensor | None = None):
        parts = self._split(state)
        thinned = {} if dropout is None else {"dropout": dropout}
        mover = None
        if self.moves_each:
            if noise is None and temperature > 0:  # one draw for all members, as the first would make
                noise = self.sample_noise(z.shape[0], generator)
            if noise is None:  # τ = 0 draws nothing
                mover = self._movers(z.shape[0], z.device)
            else:
                *noise, mover = noise
                noise = tuple(noise)
        first_state, z_next, reward, done = self.members[0].imagine_step(parts[0], z, action, temperature,
                                                                        generator, noise, **thinned)
        new_state, rewards, dones = list(first_state), [reward], [done]
        judged = self.members[1:] if not self.has_critic or self.dreams_critic else self.members[1:-1]
        for k, (m, part) in enumerate(zip(judged, parts[1:]), start=1):
            if mover is not None and k < self.n_members:  # a member draws its own z from the same noise
                s, z_k, r, d = m.imagine_step(part, z, action, temperature, generator, noise)
                rows = mover == k  # in place: the first member's row buffer holds z' for C's features
                z_next[rows] = z_k[rows]
            else:
                s, r, d = m.judge_step(part, z, action)  # the others draw no z of their own
            new_state += list(s)
            rewards.append(r)
            dones.append(d)
        hazard = None
        if self.has_critic and not self.dreams_critic:  # unread: its state passes through
            new_state += list(parts[-1])
        elif self.has_critic:  # the critic judges apart from the members
            rewards.pop()
            hazard = dones.pop()
        if len(rewards) > 1:
            stacked = torch.stack(rewards)
            reward = stacked.mean(0) - self.disagreement * stacked.std(0, unbiased=False)
            if self.done_rule == "max":
                done = torch.stack(dones).amax(0)
            elif self.done_rule == "mean":
                done = torch.stack(dones).mean(0)
        if hazard is not None:
            reward = reward - (self.hazard_penalty * hazard).clamp_(max=1.0)
            done = torch.where(hazard > self.hazard_threshold, torch.ones_like(done), done)
        return tuple(new_state), z_next, reward, done

    def loss(self, batch):
        raise TypeError("train the members one by one (worldmodel.train_m); an Ensemble only dreams")
