"""The attack contract.

An attack is a registered class built from validated parameters; calling it as
``attack(model, x, y, threat, generator)`` returns ``x_adv``, or an
:class:`~attacks.core.AttackResult` when its threat ball is centred elsewhere or it
is scored its own way (it keeps no state between batches). It only ever sees the
whole defended model (white-box against defense + classifier). Bookkeeping
(threat-ball checks, re-scoring, counting, timing) lives in the harness
(:mod:`benchmark.harness`), not in the attacks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from benchmark.config import from_dict, require, subkey
from benchmark.registry import ATTACKS

INPUT_SPACE = "input"


def is_input_space(attack_cls: type) -> bool:
    """Whether an attack class perturbs the input and is scored by the whole defended model."""
    return getattr(attack_cls, "threat_space", INPUT_SPACE) == INPUT_SPACE


@dataclass(frozen=True)
class Threat:
    norm: str = "linf"
    eps: float = 8 / 255


@dataclass
class NoParams:
    pass


@dataclass
class IterativeParams:
    """Parameters shared by the iterative attacks: ``steps`` signed steps of ``step_size``."""

    steps: int = 20
    step_size: float = 2 / 255

    def validate(self, where: str) -> None:
        require(self.steps >= 1, subkey(where, "steps"), f"must be >= 1, got {self.steps}")
        require(0 < self.step_size <= 1, subkey(where, "step_size"), f"must be in (0, 1], got {self.step_size}")


class Attack:
    """Base class: subclasses set ``Params`` (a dataclass) and implement :meth:`run`."""

    Params: ClassVar[type] = NoParams
    uses_gradients: ClassVar[bool] = True
    # What the attack perturbs and what its accuracy is scored on. ``input``: images inside the eps
    # ball around the clean input, scored by the whole defended model: the threat model of every
    # headline number (``Worst``, the adaptive table, the figures, the paper presets). Any other
    # space is a diagnostic: reported in its own block, never mixed into a headline.
    threat_space: ClassVar[str] = INPUT_SPACE
    # For a diagnostic: what its number measures (the footer of the diagnostics block says it).
    measures: ClassVar[str] = ""
    # Other scorings of an input-space attack's images, reported as diagnostics: name -> what it measures.
    diagnostic_measures: ClassVar[dict[str, str]] = {}
    # Its images lie in the eps ball around the clean input and are scored by the defended model (so
    # it can be a part of a composite attack). False: another ball centre or another scoring model.
    centred_on_input: ClassVar[bool] = True
    # Its random draws for a sample do not depend on the other images of the batch (drawn through
    # attacks.core.batch_noise): a composite may give it only its survivors. False: every sample.
    batch_independent: ClassVar[bool] = True
    # Bump when a change of the code or of a default changes what the attack computes: a cell's
    # identity includes it (from 2 on), so records of the old behaviour are recomputed.
    version: ClassVar[int] = 1

    def __init__(self, where: str = "attack", **params: Any) -> None:
        self.params = from_dict(self.Params, params, where)

    @classmethod
    def applies_to(cls, defense_cls: type) -> bool:
        """Whether this attack can run against a defense of this class (read from its declarations)."""
        return True

    def applies(self, defense_cls: type) -> bool:
        """Whether this attack, with its parameters, runs against a defense of this class (a composite:
        whether some part does)."""
        return type(self).applies_to(defense_cls)

    def describe(self) -> dict:
        return dataclasses.asdict(self.params)

    def run(self, model, x: torch.Tensor, y: torch.Tensor, threat: Threat, generator: torch.Generator | None):
        """``x_adv``, or an :class:`~attacks.core.AttackResult` (ball centre, scoring)."""
        raise NotImplementedError

    def __call__(self, model, x, y, threat: Threat, generator: torch.Generator | None = None):
        return self.run(model, x, y, threat, generator)


def defended_of(model):
    """The :class:`~defenses.base.DefendedModel` an attack sees: the model itself, or the one behind
    the attack engine's view (its ``defended``)."""
    from defenses.base import DefendedModel

    if isinstance(model, DefendedModel):
        return model
    inner = getattr(model, "defended", None)
    if isinstance(inner, DefendedModel):
        return inner
    raise TypeError(f"{type(model).__name__} is not a DefendedModel nor a view of one")


@ATTACKS.register("clean", label="Natural", description="no attack: natural accuracy")
class Clean(Attack):
    uses_gradients = False

    def run(self, model, x, y, threat, generator):
        return x.clone()
