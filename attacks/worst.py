"""The per-sample worst case over several attacks, with early exit where one pass decides (as
AutoAttack runs its four).

``worst-of`` runs its attacks in order as the parts of :func:`attacks.core.run_parts`: each starts
from the batch's starting randomness (so it computes what it computes alone), and every image each
one returns is a candidate of the result. The harness scores every candidate; a sample counts as
robust only if it survives all of them, under each score (all draws, mean over draws, majority), so
``worst-of`` is never above any of its members under any score. On a deterministic row a later
attack only sees the samples every earlier one left correct, and the accuracy equals the
per-sample AND of the attacks run separately (``tests/test_engine.py`` checks it); on a row whose
scoring draws randomness, every member attacks every sample (one misclassifying pass says nothing
about the scoring draws).

Every registered attack whose images lie in the eps ball around the clean input and are scored by
the defended model can be a member (composites included); the representation attack, centred on
the restored image and scored by the classifier alone, cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attacks.base import Attack, Threat, defended_of
from attacks.core import run_parts
from benchmark.config import ConfigError, require, subkey
from benchmark.registry import ATTACKS


@dataclass
class WorstOfParams:
    attacks: list[dict] = field(default_factory=list)  # [{name: pgd, params: {...}}, ...]

    def validate(self, where: str) -> None:
        require(len(self.attacks) >= 1, subkey(where, "attacks"), "must list at least one attack")


def member_allowed(cls: type) -> bool:
    """Whether an attack class can be a part of a composite: its images are centred on the clean input
    and scored by the defended model (not the representation attack)."""
    return bool(getattr(cls, "centred_on_input", True))


@ATTACKS.register("worst-of", label="Worst-of",
                  description="per-sample worst case over a list of attacks; later ones run only on survivors "
                              "where one pass decides")
class WorstOf(Attack):
    Params = WorstOfParams
    version = 2  # members from the batch's starting randomness; every image scored; no single-draw exits

    def __init__(self, where: str = "attack", **params) -> None:
        super().__init__(where, **params)
        self.members: list[tuple[str, Attack]] = []
        for i, spec in enumerate(self.params.attacks):
            at = subkey(where, f"attacks[{i}]")
            if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "params"}:
                raise ConfigError(f"{at}: expected a mapping with 'name' and optional 'params', got {spec!r}")
            name = spec["name"]
            if name not in ATTACKS:
                raise ConfigError(f"{subkey(at, 'name')}: {ATTACKS.unknown_message(name)}")
            cls = ATTACKS.get(name)
            if not member_allowed(cls):
                raise ConfigError(f"{subkey(at, 'name')}: {name!r} cannot be part of worst-of (its threat ball is "
                                  "centred on another image, or it is scored by another model); give it its own column")
            self.members.append((name, cls(where=subkey(at, "params"), **(spec.get("params") or {}))))

    def applies(self, defense_cls: type) -> bool:
        return any(attack.applies(defense_cls) for _, attack in self.members)

    @property
    def batch_independent(self) -> bool:  # type: ignore[override]
        return all(a.batch_independent for _, a in self.members)

    def member_versions(self) -> list:
        """Each member's code version (and its members'), part of the composite cell's identity."""
        return [[name, getattr(a, "version", 1), *([a.member_versions()] if isinstance(a, WorstOf) else [])]
                for name, a in self.members]

    def describe(self) -> dict:
        return {"attacks": [{"name": n, "params": a.describe()} for n, a in self.members]}

    def run(self, model, x, y, threat: Threat, generator):
        defense = type(defended_of(model).defense)
        members = [(n, a) for n, a in self.members if a.applies(defense)]  # e.g. mask-adaptive: masks only
        parts = []
        for _, attack in members:
            def part(xs, ys, a=attack):
                return a(model, xs, ys, threat, generator)
            part.whole_batch = not attack.batch_independent
            parts.append(part)
        return run_parts(parts, model, x, y, generator, fresh=True)
