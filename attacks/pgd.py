"""L-inf projected gradient descent (Madry et al. 2018): the training-time function and the
registered attack, both on the suite's one iterative core (:mod:`attacks.core`).

Gradients are taken with ``torch.autograd.grad`` with respect to the input only,
so no parameter gradients are computed or accumulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.base import Attack, IterativeParams, Threat
from attacks.core import (  # noqa: F401  (re-exported: the helpers' historical home)
    LOSSES,
    LossFn,
    Objective,
    ce_sum,
    eot_gradient,
    input_gradient,
    linf_attack,
    linf_search,
    project_linf,
    run_parts,
    summed_gradients,
    uniform_start,
)
from benchmark.config import require, subkey
from benchmark.registry import ATTACKS


def pgd_linf(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    loss_fn: LossFn = ce_sum,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L-inf PGD; returns the last iterate (the training-time convention)."""
    x = x.detach()
    start = uniform_start(x, eps, generator) if random_start else None
    return linf_attack(Objective(model, y, loss_fn), x, eps=eps, step_size=step_size, steps=steps, start=start)


def trades_kl_linf(
    model: Callable,
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRADES inner maximization: ascend KL(p(x) || p(x_adv)) from ``x + 0.001 N(0, I)``."""
    x = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    start = (x + 0.001 * noise).clamp(0.0, 1.0)

    def kl(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

    return linf_attack(Objective(model, x, kl), x, eps=eps, step_size=step_size, steps=steps, start=start)


# ----------------------------------------------------------------------------- registered attack


@dataclass
class PGDParams(IterativeParams):
    restarts: int = 1
    random_start: bool = True
    eot: int = 1  # gradient samples per step (EOT); 1 = plain PGD
    loss: str = "ce"  # ce (cross-entropy), dlr (Croce & Hein's ratio) or margin (Carlini-Wagner)

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.restarts >= 1, subkey(where, "restarts"), f"must be >= 1, got {self.restarts}")
        require(self.eot >= 1, subkey(where, "eot"), f"must be >= 1, got {self.eot}")
        check_loss(self.loss, where)


def check_loss(loss: str, where: str) -> None:
    require(loss in LOSSES, subkey(where, "loss"), f"must be one of {', '.join(LOSSES)}, got {loss!r}")


@ATTACKS.register("pgd", label="PGD", paper="Madry et al., ICLR 2018",
                  description="L-inf PGD: uniform random start, n steps, restarts (robust only if every restart fails)")
class PGD(Attack):
    """Each restart keeps per sample its last iterate and its best (the iterate that fooled the most
    of the passes its gradients took); the harness scores every image, and a sample is robust only
    if it survives all of them. Restarts run as the parts of :func:`attacks.core.run_parts`: after
    the first, only on the samples still correct where one pass decides, on every sample where the
    scoring draws randomness."""

    Params = PGDParams
    version = 2  # the best iterate of each restart is scored too; restarts decide with the scoring draws

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        objective_loss = LOSSES[p.loss]

        def once(xs, ys):
            start = uniform_start(xs, threat.eps, generator) if p.random_start else None
            return linf_search(Objective(model, ys, objective_loss, p.eot), xs, eps=threat.eps,
                               step_size=p.step_size, steps=p.steps, start=start).result()

        if p.restarts == 1:
            return once(x, y)
        return run_parts([once] * p.restarts, model, x, y, generator, fresh=False)
