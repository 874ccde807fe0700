"""The hazard critic as a shield (``controller.shield``; docs/models.md, "The critic as a shield").

Before an action a_t is played, the critic (an M whose done head learns "death within the next
H steps", ``model.hazard_horizon``) rates a_t and TakeCover's three holds from its state:

    a_t <- argmin_hold P_H(hold)   where P_H(a_t) - min_hold P_H(hold) > m,   else a_t.

The real game's agent (agents/agent.py) shields with the critic it keeps beside M; with
``cmaes.dream_shield`` the dream does the same with the ensemble's critic (worldmodel/ensemble.py),
so that C is evolved with the shield it will play with.

With ``controller.shield_critics`` = K > 1 the real game's P_H is the mean over K critics
(:class:`CriticAverage`): the agent's own and those trained beside the run's latest other M's
(``iterate`` retrains the critic with M, so each iteration leaves one; ``m_history/index.json``
orders them).  One critic's P_H is noisy where its data is thin, and an override on noise costs a
move C chose well; critics trained on different data disagree on such noise and agree on a
fireball in flight (docs/results.md, "Averaged critics").
"""

from __future__ import annotations

import torch

from worldmodel.m import State, WorldModel

#: TakeCover's three holds, as the shield offers them: left, stay, right.
HOLDS = torch.tensor([-1.0, 0.0, 1.0])


def shield_actions(critic: WorldModel, state: State, z: torch.Tensor, actions: torch.Tensor,
                   margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C's actions (B, 1), each replaced by the safest hold where the critic (in ``state``, seeing
    z (B, Z)) rates that hold's P(death within H steps) lower by more than ``margin``.

    -> (the actions to play (B, 1), which rows were replaced (B,) bool).  ``state`` is left as it is.
    """
    holds = HOLDS.to(actions.device, actions.dtype)
    options = torch.cat([actions, holds.expand(len(actions), -1)], dim=1)  # (B, 1 + 3)
    k = options.shape[1]
    repeated = tuple(s.repeat_interleave(k, dim=0) for s in state)
    _, _, p = critic.judge_step(repeated, z.repeat_interleave(k, dim=0), options.reshape(-1, 1))
    p = p.view(-1, k)
    safest, best = p[:, 1:].min(dim=1)
    replaced = p[:, 0] - safest > margin
    return torch.where(replaced[:, None], holds[best][:, None], actions), replaced


class CriticAverage:
    """Several hazard critics as one for the shield: P_H is their mean.  Its state is the critics'
    states one after another (a flat tuple, so an agent can index, cut and extend it as one)."""

    def __init__(self, critics: list[WorldModel]):
        if not critics:
            raise ValueError("CriticAverage needs at least one critic")
        self.critics = list(critics)
        self._widths = [len(c.initial_state(1)) for c in self.critics]

    def _split(self, state: State) -> list[State]:
        parts, start = [], 0
        for width in self._widths:
            parts.append(tuple(state[start:start + width]))
            start += width
        return parts

    def initial_state(self, batch_size: int) -> State:
        return tuple(s for c in self.critics for s in c.initial_state(batch_size))

    def observe(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        return tuple(s for c, part in zip(self.critics, self._split(state)) for s in c.observe(part, z, action))

    def judge_step(self, state: State, z: torch.Tensor, action: torch.Tensor
                   ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """As :meth:`WorldModel.judge_step`: the critics' next states, their mean reward and mean P_H."""
        judged = [c.judge_step(part, z, action) for c, part in zip(self.critics, self._split(state))]
        return (tuple(s for next_state, _, _ in judged for s in next_state),
                torch.stack([r for _, r, _ in judged]).mean(0), torch.stack([p for _, _, p in judged]).mean(0))
