"""L-inf projected gradient descent (Madry et al. 2018) as a plain function.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only,
so no parameter gradients are computed or accumulated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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
