"""The attack contract.

An attack is a registered class built from validated parameters; calling it as
``attack(model, x, y, threat, generator)`` returns ``x_adv``. It only ever sees
the whole defended model (white-box against defense + classifier). Bookkeeping
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

    def __init__(self, where: str = "attack", **params: Any) -> None:
        self.params = from_dict(self.Params, params, where)

    @classmethod
    def applies_to(cls, defense_cls: type) -> bool:
        """Whether this attack can run against a defense of this class (read from its declarations)."""
        return True

    def describe(self) -> dict:
        return dataclasses.asdict(self.params)

    def run(self, model, x: torch.Tensor, y: torch.Tensor, threat: Threat,
            generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model, x, y, threat: Threat, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.run(model, x, y, threat, generator)

    # -- how the harness checks and re-scores the last batch ------------------------------
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The centre of the threat ball of the last batch (the clean input, for most attacks)."""
        return x

    def score(self, model, x_adv: torch.Tensor) -> torch.Tensor:
        """Logits the reported accuracy is computed from: a fresh pass of the defended model."""
        return model(x_adv)


def defended_of(model):
    """The :class:`~defenses.base.DefendedModel` inside wrappers such as the harness's counter."""
    from defenses.base import DefendedModel

    seen = model
    while not isinstance(seen, DefendedModel):
        inner = getattr(seen, "_modules", {}).get("model")
        if inner is None:
            raise TypeError(f"{type(model).__name__} does not wrap a DefendedModel")
        seen = inner
    return seen


@ATTACKS.register("clean", label="Natural", description="no attack: natural accuracy")
class Clean(Attack):
    uses_gradients = False

    def run(self, model, x, y, threat, generator):
        return x.clone()
