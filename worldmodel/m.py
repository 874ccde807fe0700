"""The interface every M (world model over V's latent z) implements, and the registry.

The dream, the controller and evaluation only ever talk to M through these few
methods, so the MDN-RNN, the belief-state model and TD-VAE are interchangeable.
Adding a fourth M means one new file and one line in :data:`REGISTRY`.

Time convention (as in the paper): at step t the controller sees
``features(state_t, z_t)`` and picks ``a_t``; ``observe(state_t, z_t, a_t)``
returns ``state_{t+1}``, from which M predicts ``z_{t+1}``, ``r_{t+1}`` and
``d_{t+1}``.  Every tensor in a state has the batch dimension first, so the
dream can index a state with a mask (``tuple(s[alive] for s in state)``).

Noise: ``sample_noise(B, generator)`` draws the random numbers that one
``imagine_step`` of B rows consumes, as a tuple of (B, ...) tensors whose layout
only M knows; ``imagine_step(..., noise=noise)`` uses them instead of drawing,
row i of the noise driving row i of the batch.  The dream draws noise for a few
streams and hands every dream its stream's row, even as finished dreams leave
the batch, so that CMA-ES candidates are compared on the same luck (common
random numbers).  Without ``noise``, ``imagine_step`` draws
``sample_noise(B, generator)`` itself (or nothing, where the step needs no
randomness, e.g. at τ = 0): both ways give the same step.  The dream's own
randomness (start z, the done rule) stays in the dream.

Dream dropout (``cmaes.dream_dropout``; Wellmer & Kwok 2021, "Dropout's Dream Land"):
``dropout_masks(B, rate, generator)`` draws one mask per dream, and
``imagine_step(..., dropout=mask_rows)`` steps a thinned M, so that every dream is a
slightly different world and a controller cannot fit the quirks of one.  Only a
module that implements :meth:`WorldModel.dropout_masks` takes masks.
"""

from __future__ import annotations

import abc
import importlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from worldmodel.errors import UserError

if TYPE_CHECKING:
    from worldmodel.config import Config

State = tuple[torch.Tensor, ...]

#: name in ``model.m`` -> "module:Class".  Imported lazily.
REGISTRY: dict[str, str] = {
    "mdnrnn": "worldmodel.mdnrnn:MDNRNN",
    "belief": "worldmodel.belief:BeliefModel",
    "tdvae": "worldmodel.tdvae:TDVAE",
}


class WorldModel(nn.Module, abc.ABC):
    """M: dynamics over z.  Subclasses set ``z_dim``, ``action_dim`` and implement the methods."""

    z_dim: int
    action_dim: int

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: Config, z_dim: int, action_dim: int) -> WorldModel:
        """Build the module with the sizes the config names."""

    @abc.abstractmethod
    def initial_state(self, batch_size: int) -> State:
        """The state before the first step: a tuple of (B, ...) tensors on the model's device."""

    @abc.abstractmethod
    def feature_dim(self, mode: str) -> int:
        """Width of :meth:`features` for ``mode`` (``controller.features``: "z", "zh" or "zch")."""

    @abc.abstractmethod
    def features(self, state: State, z: torch.Tensor, mode: str) -> torch.Tensor:
        """What the controller sees at step t.  z: (B, Z) -> (B, F)."""

    @abc.abstractmethod
    def observe(self, state: State, z: torch.Tensor, action: torch.Tensor) -> State:
        """Filter one real step: consume z_t (B, Z) and a_t (B, A), return state_{t+1}."""

    @abc.abstractmethod
    def sample_noise(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """The random numbers one :meth:`imagine_step` of ``batch_size`` rows consumes.

        A tuple of (B, ...) tensors on M's device, drawn from ``generator`` (which may live
        on another device; None: torch's default generator).
        """

    @abc.abstractmethod
    def imagine_step(
        self,
        state: State,
        z: torch.Tensor,
        action: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, ...] | None = None,
        dropout: torch.Tensor | None = None,
    ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One dream step from z_t (B, Z) and a_t (B, A).

        Returns (state_{t+1}, z_{t+1} sampled at ``temperature`` (B, Z),
        predicted reward r_{t+1} (B,), probability that the episode ended d_{t+1} (B,)).
        noise: rows of :meth:`sample_noise`, row i for row i of the batch; None draws
        ``sample_noise(B, generator)``.
        dropout: rows of :meth:`dropout_masks`, row i for row i of the batch; None: all of M.
        """

    def dropout_masks(self, batch_size: int, rate: float, generator: torch.Generator | None) -> torch.Tensor:
        """(B, ...) masks for :meth:`imagine_step`'s ``dropout``: each drops ``rate`` of M's inputs.

        A module without dream dropout (this default) refuses.
        """
        raise UserError(f"cmaes.dream_dropout: model.m {type(self).__name__} has no dream dropout "
                        "(the mdnrnn has); set cmaes.dream_dropout to 0")

    def set_dream_precision(self, dtype: torch.dtype | None) -> None:
        """Let the dream multiply in ``dtype`` (None: float32).  A module may ignore it."""

    def judge_step(self, state: State, z: torch.Tensor, action: torch.Tensor
                   ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """(state_{t+1}, predicted r_{t+1} (B,), P(d_{t+1}) (B,)) from z_t (B, Z) and a_t (B, A), with no z_{t+1}.

        What an ensemble's other members need (worldmodel/ensemble.py): they follow the
        first member's z's and judge its reward and its end.  This default runs
        :meth:`imagine_step` at τ = 0 and drops its z; a module may skip that work.
        """
        state, _, reward, done = self.imagine_step(state, z, action, 0.0)
        return state, reward, done

    @abc.abstractmethod
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training objective on a batch of real subsequences, term by term.

        batch: ``z`` (B, T, Z) latents sampled from V's posterior, ``action`` (B, T, A),
        ``reward`` (B, T), ``terminated`` (B, T) bool, ``mask`` (B, T) bool (False past
        an episode's end).  Step t holds z_t, a_t and what followed a_t (r_{t+1}, d_{t+1}).
        Returns a dict of scalar terms; ``"loss"`` is the total to minimise.
        """


def hidden_parts(mode: str) -> int:
    """How many of M's recurrent (h, c) the controller sees: 0 for "z" (z alone, the paper's ablation),
    1 for "zh" ([z, h]), 2 for "zch" ([z, c, h])."""
    if mode == "z":
        return 0
    if mode == "zh":
        return 1
    if mode == "zch":
        return 2
    raise ValueError(f"unknown feature mode {mode!r} (expected 'z', 'zh' or 'zch')")


def controller_features(z: torch.Tensor, h: torch.Tensor, c: torch.Tensor, mode: str) -> torch.Tensor:
    """What C sees: z (B, Z), h, c (B, H) -> z for "z", [z, h] (B, Z+H) for "zh", [z, c, h] (B, Z+2H) for "zch"."""
    return torch.cat([[z], [z, h], [z, c, h]][hidden_parts(mode)], dim=-1)


def build_m(cfg: Config, z_dim: int, action_dim: int) -> WorldModel:
    """Instantiate the M module that ``cfg.model.m`` names."""
    name = cfg.model.m
    if name not in REGISTRY:
        raise UserError(f"config model.m: unknown M module {name!r} (known: {', '.join(REGISTRY)})")
    module_name, cls_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.from_config(cfg, z_dim=z_dim, action_dim=action_dim)
