"""The per-sample worst case over several attacks, with early exit (as AutoAttack runs its four).

``worst-of`` runs its attacks in order; each later attack only sees the samples that every earlier
one failed to break, so the cost falls as the defended model's accuracy falls. A sample counts as
robust only if it survives all of them; its returned image is the first one that fooled the model
(else the last attack's). The accuracy equals the per-sample AND of the attacks run separately
(for deterministic attacks exactly; ``tests/test_engine.py`` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attacks.base import Attack, Threat, defended_of, is_input_space
from attacks.core import AttackResult
from benchmark.config import ConfigError, require, subkey
from benchmark.registry import ATTACKS


@dataclass
class WorstOfParams:
    attacks: list[dict] = field(default_factory=list)  # [{name: pgd, params: {...}}, ...]

    def validate(self, where: str) -> None:
        require(len(self.attacks) >= 1, subkey(where, "attacks"), "must list at least one attack")


@ATTACKS.register("worst-of", label="Worst-of",
                  description="per-sample worst case over a list of attacks; later ones run only on survivors")
class WorstOf(Attack):
    Params = WorstOfParams

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
            if name == "worst-of" or cls.own_scoring or not is_input_space(cls):
                raise ConfigError(f"{subkey(at, 'name')}: {name!r} cannot be part of worst-of (it scores, "
                                  "centres its threat ball or measures its own way); give it its own column")
            self.members.append((name, cls(where=subkey(at, "params"), **(spec.get("params") or {}))))

    def describe(self) -> dict:
        return {"attacks": [{"name": n, "params": a.describe()} for n, a in self.members]}

    def run(self, model, x, y, threat: Threat, generator):
        plain = defended_of(model)  # the success check in fp32, not through the engine's options
        best = x.clone()
        todo = torch.arange(len(x), device=x.device)
        survivors = [0] * len(self.members)
        for i, (_, attack) in enumerate(self.members):
            if len(todo) == 0:
                break
            adv = attack(model, x[todo], y[todo], threat, generator).detach()
            best[todo] = adv
            with torch.no_grad():
                fooled = plain(adv).argmax(1) != y[todo]
            todo = todo[~fooled]
            survivors[i] = len(todo)
        return AttackResult(best, info={"survivors": survivors})
