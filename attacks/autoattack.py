"""AutoAttack (Croce & Hein 2020): the ``pyautoattack`` package, and the suite's own APGD.

``version: auto`` runs ``standard`` (APGD-CE, APGD-T, FAB-T, Square) on
deterministic models and ``rand`` (APGD-CE and APGD-DLR with 20 EOT iterations)
on models that declare randomness, as AutoAttack's authors prescribe.
``attacks`` runs only some members of the version's sequence, with the version's
settings (e.g. ``[apgd-ce, apgd-t]``, the usual cheap subset for small runs); the
config should then give the attack a label that says so.

Where one pass decides (a deterministic row), pyautoattack's ``run_standard_evaluation``
runs unchanged and its per-sample results are kept (a survivor's image is the clean one:
it survived every member). On a row whose scoring draws randomness that would score images
the attack never returned: ``run_standard_evaluation`` keeps an attack's image only for the
samples its own single check pass misclassifies and returns the *clean* image for the rest,
which the harness then rescores under its draws. There each member runs directly on every
sample (pyautoattack's ``attack_single_run``, with the version's settings: iterations, EOT,
restarts, target classes, seeds) and returns what it produced for every sample: APGD's
highest-loss point and its last misclassified point, Square's best point; the harness scores
them all, and a sample counts as robust only if it survives every image under each score. (FAB,
in the standard and plus versions forced onto a random row, has no such point: its image is the
clean one where it failed, which adds nothing; the rand version has no FAB.)

``backend`` says who runs the APGD members. ``auto`` (the default): on a row whose scoring draws
randomness, the suite's APGD (``attacks/apgd.py``: AutoAttack's algorithm on the attack core,
its 20 EOT draws one batched pass when ``eval.eot_batch`` asks for it, under bf16/channels_last
when asked); on a deterministic row pyautoattack's ``run_standard_evaluation`` unchanged.
``native``: the suite's APGD on every row (a deterministic row: members on the survivors of the
earlier ones, as AutoAttack's loop); ``pyautoattack``: pyautoattack's APGD on every row (the path
before the native one, kept for comparison). FAB and Square are always pyautoattack's. Every
version's settings (iterations, restarts, EOT draws, target classes) are read from the
pyautoattack object the version configures, so both backends run the same protocol.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from attacks.base import Attack, Threat
from attacks.core import AttackResult, judge_for, run_parts
from benchmark.registry import ATTACKS


@dataclass
class AutoAttackParams:
    version: Literal["auto", "standard", "rand", "plus"] = "auto"
    attacks: list[str] | None = None  # members of the version's sequence to run (None: all of them)
    seed: int = 0
    # who runs the APGD members: auto = the suite's (attacks/apgd.py, EOT draws batched by the engine)
    # on rows whose scoring draws randomness, pyautoattack's run_standard_evaluation unchanged on
    # deterministic rows (the reference's own numbers); native or pyautoattack everywhere
    backend: Literal["auto", "native", "pyautoattack"] = "auto"
    apgd_steps: int | None = None  # APGD iterations (None: the version's, 100); a label should say so
    eot_iter: int | None = None  # APGD's EOT draws (None: the version's, 20 in rand); a label should say so

    def validate(self, where: str) -> None:
        from benchmark.config import require, subkey

        require(self.backend in ("auto", "native", "pyautoattack"), subkey(where, "backend"),
                f"must be auto, native or pyautoattack, got {self.backend!r}")
        for key in ("apgd_steps", "eot_iter"):
            value = getattr(self, key)
            require(value is None or (isinstance(value, int) and value >= 1), subkey(where, key),
                    f"must be null or an integer >= 1, got {value!r}")

        if self.attacks is not None:
            known = sorted(set().union(*SEQUENCES.values()))
            bad = [a for a in self.attacks if a not in known]
            require(not bad and len(self.attacks) > 0, subkey(where, "attacks"),
                    f"must be a non-empty list of {', '.join(known)}; got {self.attacks}")
            if self.version != "auto":
                check_members(self.version, self.attacks, subkey(where, "attacks"))


def check_members(version: str, attacks: list[str], where: str, row: str | None = None) -> None:
    """``attacks`` must all be members of ``version`` (the one a row gets, for ``version: auto``)."""
    from benchmark.config import ConfigError

    missing = [a for a in attacks if a not in SEQUENCES[version]]
    if missing:
        gets = f" that {row} gets" if row else ""
        raise ConfigError(f"{where}: {', '.join(missing)} not in the {version} version{gets} "
                          f"({', '.join(SEQUENCES[version])})")


# each version's attacks, in the order pyautoattack runs them
SEQUENCES = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "rand": ("apgd-ce", "apgd-dlr"),
             "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")}


def version_for(version: str, stochastic: bool) -> str:
    """The version a model gets: ``auto`` is ``rand`` for a stochastic one, else ``standard``."""
    if version != "auto":
        return version
    return "rand" if stochastic else "standard"


def resolve_version(version: str, model) -> str:
    return version_for(version, getattr(model, "stochastic", False))


@ATTACKS.register("autoattack", label="AA", paper="Croce & Hein, ICML 2020",
                  description="AutoAttack via pyautoattack: standard, or rand (EOT) for stochastic defenses")
class AutoAttackWrapper(Attack):
    Params = AutoAttackParams

    version = 3  # random rows: the suite's APGD with batched EOT (backend auto)
    batch_independent = False  # pyautoattack draws from torch's generator in the batch's shape

    def run(self, model, x, y, threat: Threat, generator):
        from pyautoattack import AutoAttack

        p = self.params
        version = resolve_version(p.version, model)
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        adversary = AutoAttack(model, norm="Linf", eps=threat.eps, version=version, seed=p.seed, device=x.device)
        adversary.verbose = False
        for apgd in (adversary.apgd, adversary.apgd_targeted):  # the version's settings, unless overridden
            if p.apgd_steps is not None:
                apgd.n_iter = apgd.n_iter_orig = p.apgd_steps
                apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * p.apgd_steps), 1), max(int(0.06 * p.apgd_steps), 1)
                apgd.size_decr = max(int(0.03 * p.apgd_steps), 1)
            if p.eot_iter is not None:
                apgd.eot_iter = p.eot_iter
        members = list(SEQUENCES[version])
        if p.attacks is not None:  # (a config has checked this per row already)
            check_members(version, p.attacks, "autoattack params.attacks", "this defense")
            members = [a for a in members if a in p.attacks]
        exact = judge_for(model, x, y).exact
        if exact and p.backend != "native":
            adversary.attacks_to_run = members
            with torch.no_grad(), _robust_after() as after:
                x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
            # robust samples after each member, as AutoAttack's own log gives them (a member it skipped
            # because nothing was left: 0)
            counts = {k: round(v * len(x)) for k, v in after.items()}
            info = {f"{ROBUST_AFTER}{m}": counts.get(m, 0) for m in ["clean", *members]}
            return AttackResult(x_adv.detach(), info=info)
        def part_for(m: str):
            if m.startswith("apgd") and p.backend != "pyautoattack":
                return lambda xs, ys: native_member(adversary, m, model, xs, ys, threat.eps, generator, exact)

            def member(xs, ys):  # pyautoattack's, drawing from torch's generator in the batch's shape
                return run_member(adversary, m, xs, ys, p.seed)

            member.whole_batch = True
            return member

        result = run_parts([part_for(m) for m in members], model, x, y, generator, fresh=True)
        # robust after each member under every scoring draw (a single member: the cell's own accuracy)
        result.info.update({f"{ROBUST_AFTER}{m}": int(k) for m, k in zip(members, result.info.get("survivors", []))})
        return result


ROBUST_AFTER = "robust_after:"  # attack_info keys: samples still robust after each member, summed over batches


@contextlib.contextmanager
def _robust_after():
    """pyautoattack's own robust accuracy after each member (the fractions its log prints), caught where
    ``run_standard_evaluation`` hands them to its Square sanity check."""
    from pyautoattack import autoattack as module

    seen: dict = {}
    original = module.checks.check_square_sr

    def catch(acc_dict, *args, **kwargs):
        seen.update(acc_dict)
        return original(acc_dict, *args, **kwargs)

    module.checks.check_square_sr = catch
    try:
        yield seen
    finally:
        module.checks.check_square_sr = original


def native_member(adversary, member: str, model, x: torch.Tensor, y: torch.Tensor, eps: float, generator,
                  until_fooled: bool) -> AttackResult:
    """An APGD member on the suite's core (attacks/apgd.py) with the version's settings as
    pyautoattack set them (iterations, restarts, EOT draws, target classes); its random starts from
    the attack's ``generator``, its EOT draws batched by the engine."""
    from attacks.apgd import apgd_images

    apgd = adversary.apgd_targeted if member == "apgd-t" else adversary.apgd
    loss = apgd.loss if member == "apgd-t" else member.split("-")[1]  # apgd-t: dlr-targeted
    images, _ = apgd_images(model, x, y, eps=eps, loss=loss, steps=apgd.n_iter, restarts=apgd.n_restarts,
                            eot=apgd.eot_iter, target_classes=getattr(apgd, "n_target_classes", 9),
                            rho=apgd.thr_decr, generator=generator, until_fooled=until_fooled)
    return AttackResult(images[0], candidates=images[1:])


def run_member(adversary, member: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> AttackResult:
    """One AutoAttack member on every sample, with its images for every sample (not only where its own
    check pass was fooled); torch's global generator seeded as pyautoattack seeds it, and restored."""
    images: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if member in ("apgd-ce", "apgd-dlr"):
            apgd = adversary.apgd
            apgd.loss, apgd.seed = member.split("-")[1], seed
            apgd.init_hyperparam(x)
            for _ in range(apgd.n_restarts):
                images += _apgd_run(apgd, x, y)
        elif member == "apgd-t":
            apgd = adversary.apgd_targeted
            apgd.seed = seed
            apgd.init_hyperparam(x)
            for target_class in range(2, apgd.n_target_classes + 2):
                for _ in range(apgd.n_restarts):
                    with torch.no_grad():
                        apgd.y_target = adversary.model(x).sort(dim=1)[1][:, -target_class]
                    images += _apgd_run(apgd, x, y)
        elif member == "square":
            square = adversary.square
            square.seed = seed
            square.init_hyperparam(x)
            for _ in range(square.n_restarts):
                with torch.no_grad():
                    images.append(square.attack_single_run(x, y)[1])
        elif member in ("fab", "fab-t"):  # FAB returns its image where it succeeded, the clean one elsewhere
            adversary.fab.targeted, adversary.fab.seed = member == "fab-t", seed
            images.append(adversary.fab.perturb(x, y))
        else:
            raise ValueError(f"unknown AutoAttack member {member!r}")
    images = [into_ball(i.detach(), x, adversary.epsilon) for i in images]
    return AttackResult(images[0], candidates=images[1:])


def into_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """pyautoattack's images clamped to the ball and [0,1] (its attacks round nothing but may step a
    hair past the ball in float arithmetic)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def _apgd_run(apgd, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One APGD run: its highest-loss point and its last point that a pass misclassified (the start
    where none did)."""
    if apgd.use_largereps:
        epss = [3.0 * apgd.eps_orig, 2.0 * apgd.eps_orig, 1.0 * apgd.eps_orig]
        iters = [math.ceil(0.3 * apgd.n_iter_orig)] * 2
        iters.append(apgd.n_iter_orig - sum(iters))
        best, _, _, best_adv = apgd.decr_eps_pgd(x, y, epss, iters)
    else:
        best, _, _, best_adv = apgd.attack_single_run(x, y)
    return [best, best_adv]


@dataclass
class SquareParams:
    n_queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    seed: int = 0

    def validate(self, where: str) -> None:
        from benchmark.config import require, subkey

        require(self.n_queries >= 1, subkey(where, "n_queries"), f"must be >= 1, got {self.n_queries}")
        require(0 < self.p_init <= 1, subkey(where, "p_init"), f"must be in (0, 1], got {self.p_init}")
        require(self.restarts >= 1, subkey(where, "restarts"), f"must be >= 1, got {self.restarts}")


@ATTACKS.register("square", label="Square", paper="Andriushchenko et al., ECCV 2020",
                  description="Square Attack (score-based, no gradients) via pyautoattack, margin loss")
class Square(Attack):
    """The gradient-free member of AutoAttack on its own: the reference the gradient-masking
    checks compare white-box attacks with (a black-box attack must not beat them)."""

    Params = SquareParams
    uses_gradients = False
    version = 2  # on random rows: its best point for every sample
    batch_independent = False  # pyautoattack draws from torch's generator in the batch's shape

    def run(self, model, x, y, threat: Threat, generator):
        from pyautoattack.square import SquareAttack

        p = self.params
        adversary = SquareAttack(model, norm="Linf", eps=threat.eps, n_queries=p.n_queries, p_init=p.p_init,
                                 n_restarts=p.restarts, seed=p.seed, device=x.device)
        # perturb() reseeds the global generators: keep its seeding from leaking into what follows
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
            if judge_for(model, x, y).exact:
                images = [adversary.perturb(x, y)]
            else:  # a random row: its best point for every sample (perturb returns the clean image where
                adversary.init_hyperparam(x)  # its own single check pass was not fooled)
                torch.manual_seed(p.seed)
                images = [adversary.attack_single_run(x, y)[1] for _ in range(p.restarts)]
        images = [into_ball(i.detach(), x, threat.eps) for i in images]
        return AttackResult(images[0], candidates=images[1:])
