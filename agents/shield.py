"""The hazard critic as a shield (``controller.shield``; docs/models.md, "The critic as a shield").

Before an action a_t is played, the critic (an M whose done head learns "death within the next
H steps", ``model.hazard_horizon``) rates a_t and TakeCover's three holds from its state:

    a_t <- argmin_hold P_H(hold)   where P_H(a_t) - min_hold P_H(hold) > m,   else a_t.

The real game's agent (agents/agent.py) shields with the critic it keeps beside M; with
``cmaes.dream_shield`` the dream does the same with the ensemble's critic (worldmodel/ensemble.py),
so that C is evolved with the shield it will play with.
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
