"""L-inf projected gradient descent (Madry et al. 2018) as a plain function.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only,
so no parameter gradients are computed or accumulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.base import Attack, IterativeParams, Threat
from benchmark.config import require, subkey
from benchmark.registry import ATTACKS

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Project onto the L-inf ball of radius ``eps`` around ``x`` and then onto [0,1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return (x + (2.0 * noise - 1.0) * eps).clamp_(0.0, 1.0)


def input_gradient(model: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``loss_fn(model(x), y)`` (summed over the batch) w.r.t. ``x``; also the logits."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits.float(), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


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
    x_adv = uniform_start(x, eps, generator) if random_start else x.clone()
    for _ in range(steps):
        grad, _ = input_gradient(model, x_adv, y, loss_fn)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


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
    x_adv = (x + 0.001 * noise).clamp(0.0, 1.0)

    def kl(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

    for _ in range(steps):
        grad, _ = input_gradient(model, x_adv, x, kl)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


# ----------------------------------------------------------------------------- registered attack


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


@dataclass
class PGDParams(IterativeParams):
    restarts: int = 1
    random_start: bool = True
    eot: int = 1  # gradient samples per step (EOT); 1 = plain PGD

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.restarts >= 1, subkey(where, "restarts"), f"must be >= 1, got {self.restarts}")
        require(self.eot >= 1, subkey(where, "eot"), f"must be >= 1, got {self.eot}")


@ATTACKS.register("pgd", label="PGD", paper="Madry et al., ICLR 2018",
                  description="L-inf PGD: uniform random start, n steps, restarts (robust only if every restart fails)")
class PGD(Attack):
    Params = PGDParams

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        best = x.clone()
        todo = torch.arange(len(x), device=x.device)  # samples no restart has broken yet
        for restart in range(p.restarts):
            xs, ys = x[todo], y[todo]
            adv = uniform_start(xs, threat.eps, generator) if p.random_start else xs.clone()
            for _ in range(p.steps):
                grad = eot_gradient(model, adv, ys, ce_sum, p.eot)
                adv = project_linf(adv.detach() + p.step_size * grad.sign(), xs, threat.eps)
            best[todo] = adv
            if restart == p.restarts - 1:  # the harness re-scores the result: no pass of our own
                break
            with torch.no_grad():
                fooled = model(adv).argmax(1) != ys
            todo = todo[~fooled]
            if len(todo) == 0:
                break
        return best
