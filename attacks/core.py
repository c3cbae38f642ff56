"""The one iterative L-inf core that every gradient attack of the suite is built on.

An iterative attack is three choices around one loop:

* the **objective**: the loss (cross-entropy, or any ``loss(logits, y)`` summed over the
  batch) of a model, and how its input gradient is estimated: one pass, or the mean over
  ``eot`` passes that each draw fresh randomness of a stochastic defense (expectation over
  transformation). BPDA, exact gradients through a purifier and fixed masks or randomness
  are switches of the defended model (``DefendedModel.gradients``, ``fixed_masks``,
  ``fixed_randomness``), not of the loop;
* the **step rule**: the signed gradient (PGD), the signed momentum of L1-normalised
  gradients (MI-FGSM), or momentum with a Nesterov look-ahead and variance tuning (VNI-FGSM);
* the **ball**: its centre (the clean image, or DIR's restored image for the representation
  attack), its radius and the start (the centre, or uniform inside the ball).

:func:`linf_attack` runs ``steps`` of ``x <- proj(x + step_size * rule(x))`` and returns the last
iterate. An attack returns an :class:`AttackResult` when its threat ball is not centred on the
clean input or when it is scored its own way; a plain tensor means "scored by a fresh pass of the
defended model, centred on the clean input".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Project onto the L-inf ball of radius ``eps`` around ``x`` and then onto [0,1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return (x + (2.0 * noise - 1.0) * eps).clamp_(0.0, 1.0)


def ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def input_gradient(model: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``loss_fn(model(x), y)`` (summed over the batch) w.r.t. ``x``; also the logits."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits.float(), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def summed_gradients(model: Callable, inputs: list[torch.Tensor], y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """Sum of the input gradients at each of ``inputs`` (same shape as each other). The engine's
    ``eot_batch`` (read from ``model``) sets how many of them share one forward pass: the inputs
    are concatenated, so a stochastic defense draws independent randomness for each copy."""
    per_pass = max(1, int(getattr(model, "eot_batch", 1) or 1))
    total = torch.zeros_like(inputs[0])
    for start in range(0, len(inputs), per_pass):
        chunk = inputs[start:start + per_pass]
        if len(chunk) == 1:
            total += input_gradient(model, chunk[0], y, loss_fn)[0]
        else:
            grad, _ = input_gradient(model, torch.cat(chunk), y.repeat(len(chunk)), loss_fn)
            total += grad.view(len(chunk), *inputs[0].shape).sum(0)
    return total


def eot_gradient(model: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, samples: int) -> torch.Tensor:
    """Expectation over transformation: the mean input gradient over ``samples`` forward passes
    (each draws fresh randomness from a stochastic defense)."""
    if samples == 1:
        return input_gradient(model, x, y, loss_fn)[0]
    return summed_gradients(model, [x] * samples, y, loss_fn) / samples


# ----------------------------------------------------------------------------- the objective
@dataclass
class Objective:
    """What the attack ascends: ``loss(model(x), y)``, its gradient estimated over ``eot`` passes."""

    model: Callable
    y: torch.Tensor
    loss: LossFn = ce_sum
    eot: int = 1

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        return eot_gradient(self.model, x, self.y, self.loss, self.eot)

    def summed(self, points: list[torch.Tensor]) -> torch.Tensor:
        return summed_gradients(self.model, points, self.y, self.loss)


# ----------------------------------------------------------------------------- step rules
class SignStep:
    """PGD: the sign of the gradient."""

    def direction(self, objective: Objective, x: torch.Tensor) -> torch.Tensor:
        return objective.gradient(x).sign()


def l1_normalize(g: torch.Tensor) -> torch.Tensor:
    return g / g.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


@dataclass
class Momentum:
    """MI-FGSM (Dong et al. 2018): g <- decay g + grad / ||grad||_1; the step follows sign(g)."""

    decay: float = 1.0
    g: torch.Tensor | None = None

    def direction(self, objective: Objective, x: torch.Tensor) -> torch.Tensor:
        grad = objective.gradient(x)
        self.g = l1_normalize(grad) if self.g is None else self.decay * self.g + l1_normalize(grad)
        return self.g.sign()


@dataclass
class VarianceTuned:
    """VNI-FGSM (Wang & He 2021): momentum with a Nesterov look-ahead of ``step_size * decay * g``,
    the gradient tuned by the variance v of the gradients at ``neighbors`` uniform points within
    ``radius`` of the current iterate (v from the previous step)."""

    decay: float
    step_size: float
    neighbors: int
    radius: float
    generator: torch.Generator | None = None
    g: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def direction(self, objective: Objective, x: torch.Tensor) -> torch.Tensor:
        if self.g is None:
            self.g, self.v = torch.zeros_like(x), torch.zeros_like(x)
        grad = objective.gradient(x + self.step_size * self.decay * self.g)  # Nesterov look-ahead
        self.g = self.decay * self.g + l1_normalize(grad + self.v)
        # gradient variance around x_t: the draws in a fixed order, the passes batched by the engine
        around = [x + (torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=self.generator) * 2 - 1)
                  * self.radius for _ in range(self.neighbors)]
        self.v = objective.summed(around) / self.neighbors - grad
        return self.g.sign()


# ----------------------------------------------------------------------------- the loop
def linf_attack(objective: Objective, center: torch.Tensor, *, eps: float, step_size: float, steps: int,
                start: torch.Tensor | None = None, rule=None) -> torch.Tensor:
    """``steps`` of ``x <- proj_{B(center, eps) & [0,1]}(x + step_size * rule.direction(x))`` from
    ``start`` (default: the centre); returns the last iterate, detached."""
    rule = rule or SignStep()
    x = center.clone() if start is None else start
    for _ in range(steps):
        x = project_linf(x.detach() + step_size * rule.direction(objective, x), center, eps)
    return x.detach()


# ----------------------------------------------------------------------------- what an attack returns
@dataclass
class AttackResult:
    """Adversarial images and how the harness checks and scores them.

    ``center``: the centre of the threat ball the images must lie in (default: the clean input).
    ``score``: ``score(model, x_adv) -> logits`` that the accuracy is computed from (default: a fresh
    pass of the defended model). ``random_score``: whether that scoring draws randomness (default:
    whether the defended model is stochastic). ``info``: what the attack reports (stored in the
    record, e.g. the survivors of each member of a worst-of)."""

    x_adv: torch.Tensor
    center: torch.Tensor | None = None
    score: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    random_score: bool | None = None
    info: dict = field(default_factory=dict)
