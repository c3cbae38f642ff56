"""APGD (Croce & Hein, ICML 2020) on the suite's attack core: the L-inf Auto-PGD of AutoAttack,
with its losses (CE, DLR, targeted DLR and CE), step-size schedule, momentum, checkpoints and
restarts, and EOT whose draws go through the engine (``eot_batch`` draws per forward pass, bf16 and
channels_last when the engine is asked for them).

The loop is AutoAttack's (``autopgd_base.APGDAttack.attack_single_run``, L-inf): a start uniform in
the ball scaled so its largest coordinate is at eps; step size 2 eps; each step a signed-gradient
step and a momentum of 0.75 on the previous move (none at the first); checkpoints after 22% of the
iterations, then every 3% fewer (at least 6%), where a sample whose loss rose in at most 75% of the
steps since the last checkpoint, or whose step size was not halved last time and whose best loss did
not improve, halves its step size and returns to its best point and that point's gradient.
Restarts and the targeted version's target classes (the 2nd to the 10th largest logit at the clean
image) repeat the run.

Where it departs from pyautoattack, only under EOT (on a deterministic model, E = 1, both compute
the same per sample; ``tests/test_apgd.py`` compares them image by image):

* the checkpoints read the loss averaged over the E draws of the step (pyautoattack: the last
  draw's), and the "last misclassified point" is the point with the highest fraction of the draws
  misclassifying (ties: the later), pyautoattack's last draw deciding alone;
* the draws are one batched pass of E copies where ``eot_batch`` asks for it (pyautoattack: E
  sequential passes), so a stochastic defense draws its randomness in another order.

A run returns two images per sample, as AutoAttack's: the highest-loss point and the last (most)
misclassified point; the harness scores both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attacks.core import batch_noise, project_linf, summed_gradients

LOSS_NAMES = ("ce", "dlr", "ce-targeted", "dlr-targeted")


def ce_indiv(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr_indiv(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample DLR, written as pyautoattack writes it (the same float operations)."""
    z, idx = logits.sort(dim=1)
    top_is_true = (idx[:, -1] == y).float()
    u = torch.arange(len(y), device=logits.device)
    return -(logits[u, y] - z[:, -2] * top_is_true - z[:, -1] * (1.0 - top_is_true)) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted_indiv(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    z = logits.sort(dim=1).values
    u = torch.arange(len(y), device=logits.device)
    return -(logits[u, y] - logits[u, target]) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def ce_targeted_indiv(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits, target, reduction="none")


def per_sample_loss(name: str, target: torch.Tensor | None = None) -> Callable:
    """``loss(logits, y) -> per-sample losses`` for a loss name; targeted losses read ``target``
    (repeated to the batch when the engine replicates the images for EOT)."""
    if name == "ce":
        return ce_indiv
    if name == "dlr":
        return dlr_indiv
    if target is None:
        raise ValueError(f"loss {name!r} needs target classes")
    fn = dlr_targeted_indiv if name == "dlr-targeted" else ce_targeted_indiv
    return lambda logits, y: fn(logits, y, target.repeat(len(y) // len(target)))


def check_oscillation(losses: torch.Tensor, j: int, k: int, rho: float) -> torch.Tensor:
    """Per sample, 1 where the loss rose in at most ``rho`` of the last ``k`` steps (AutoAttack's
    test, which reads row -1, still zero, at the first checkpoint)."""
    rises = torch.zeros(losses.shape[1], device=losses.device)
    for c in range(k):
        rises += (losses[j - c] > losses[j - c - 1]).float()
    return (rises <= k * rho * torch.ones_like(rises)).float()


class _Evaluate:
    """The gradient of the summed per-sample loss, averaged over ``eot`` draws batched as the engine
    asks; also each sample's loss (mean over the draws) and the fraction of draws misclassifying it."""

    def __init__(self, model, y: torch.Tensor, loss: Callable, eot: int) -> None:
        self.model, self.y, self.loss, self.eot = model, y, loss, eot
        self.passes = 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits: list[torch.Tensor] = []
        grad = summed_gradients(self.model, [x] * self.eot, self.y, lambda z, t: self.loss(z, t).sum(),
                                logits_out=logits)
        self.passes += self.eot
        z = torch.cat(logits).float()  # (eot, n, classes)
        y = self.y
        losses = torch.stack([self.loss(z[i], y) for i in range(len(z))])
        wrong = (z.argmax(2) != y).float().mean(0)
        return grad / self.eot, losses.mean(0), wrong


def apgd_run(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, loss: str = "ce",
             target: torch.Tensor | None = None, eot: int = 1, rho: float = 0.75,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One L-inf APGD run from a random start: (highest-loss point, last most-misclassified point,
    forward + input-gradient passes taken)."""
    evaluate = _Evaluate(model, y, per_sample_loss(loss, target), eot)
    n = len(x)
    view = (-1, *([1] * (x.dim() - 1)))
    t = 2 * batch_noise(x.shape, x, generator) - 1
    x_adv = (x + eps * t / (t.abs().flatten(1).max(1).values.view(view) + 1e-12)).clamp(0.0, 1.0)
    n_check = max(int(0.22 * steps), 1)
    n_min, decrease = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)

    grad, losses, wrong = evaluate(x_adv)
    x_best, x_best_adv, grad_best = x_adv.clone(), x_adv.clone(), grad.clone()
    loss_best, rate = losses.clone(), wrong.clone()
    loss_steps = torch.zeros(steps, n, device=x.device)
    step_size = 2.0 * eps * torch.ones(n, *([1] * (x.dim() - 1)), device=x.device)
    x_old = x_adv.clone()
    k, counter = n_check, 0
    loss_best_last, reduced_last = loss_best.clone(), torch.ones_like(loss_best)
    for i in range(steps):
        with torch.no_grad():
            move = x_adv - x_old
            x_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            x1 = project_linf(x_adv + step_size * torch.sign(grad), x, eps)
            x_adv = project_linf(x_adv + (x1 - x_adv) * a + move * (1 - a), x, eps)
        grad, losses, wrong = evaluate(x_adv)
        fooled = (wrong > 0) & (wrong >= rate)
        x_best_adv[fooled], rate = x_adv[fooled], torch.where(fooled, wrong, rate)
        with torch.no_grad():
            loss_steps[i] = losses
            better = losses > loss_best
            x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], losses[better]
            counter += 1
            if counter == k:
                osc = check_oscillation(loss_steps, i, k, rho)
                osc = torch.max(osc, (1.0 - reduced_last) * (loss_best_last >= loss_best).float())
                reduced_last, loss_best_last = osc.clone(), loss_best.clone()
                halve = osc > 0
                if bool(halve.any()):
                    step_size[halve] /= 2.0
                    x_adv[halve], grad[halve] = x_best[halve].clone(), grad_best[halve].clone()
                k, counter = max(k - decrease, n_min), 0
    return x_best.detach(), x_best_adv.detach(), evaluate.passes


def apgd_images(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, loss: str = "ce", steps: int = 100,
                restarts: int = 1, eot: int = 1, target_classes: int = 9, rho: float = 0.75,
                generator: torch.Generator | None = None, until_fooled: bool = False) -> tuple[list, int]:
    """Every image of an APGD member: ``restarts`` runs (targeted losses: for each of the
    ``target_classes`` largest non-top logits at ``x``, 2nd to 10th), two images per run; and the
    passes taken. ``until_fooled`` (a deterministic model): later runs attack only the samples no
    earlier image fooled, as AutoAttack's own loop does; the others keep their images."""
    images: list[torch.Tensor] = []
    passes = 0
    targeted = loss.endswith("-targeted")
    targets: list[torch.Tensor | None] = [None]
    if targeted:
        with torch.no_grad():
            order = model(x).sort(dim=1)[1]
        targets = [order[:, -c] for c in range(2, target_classes + 2)]
    todo = torch.arange(len(x), device=x.device)
    for target in targets:
        for _ in range(restarts):
            if len(todo) == 0:
                return images, passes
            rows = todo
            best, best_adv, used = apgd_run(model, x[rows], y[rows], eps=eps, steps=steps, loss=loss,
                                            target=None if target is None else target[rows], eot=eot, rho=rho,
                                            generator=generator)
            passes += used * len(rows)
            for img in (best, best_adv):
                full = x.clone()
                full[rows] = img
                images.append(full)
            if until_fooled:
                with torch.no_grad():
                    fooled = model(best_adv).argmax(1) != y[rows]
                todo = rows[~fooled]
    return images, passes
