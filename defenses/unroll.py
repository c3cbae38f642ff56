"""Exact gradients through an iterative purifier, in memory that grows with the square root of its steps.

A purifier that runs ``z_{t+1} = step(z_t, x, t)`` for T steps (EBM's Langevin chain,
AID-Purifier's signed-gradient loop) is differentiable, but back-propagating through it naively
keeps every step's activations: memory linear in T, and each step may itself hold a gradient of a
network (Langevin: z - grad E(z)), so the backward needs second derivatives.

:func:`unroll` splits the T steps into segments of about sqrt(T) steps. The forward pass runs each
segment without keeping its graph and stores only the segment's input state and the state of the
random generator at its start. The backward pass re-runs one segment at a time with its graph
(``create_graph`` for the step's inner gradient) from the stored state and the same random draws,
and takes the vector-Jacobian product. Memory: about sqrt(T) stored states plus one segment's graph.
The randomness of the draw is held fixed: the recomputation replays the noise of the forward pass
from a copy of the generator's state at the segment's start; the forward pass draws from the
caller's generator exactly as the plain loop does, so its result equals the plain purification's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# step(z, x, t, generator, create_graph) -> next z; ``generator`` may be None (a deterministic loop)
Step = Callable[[torch.Tensor, torch.Tensor, int, "torch.Generator | None", bool], torch.Tensor]


def _copy(generator: torch.Generator | None, state: torch.Tensor | None) -> torch.Generator | None:
    if generator is None:
        return None
    g = torch.Generator(device=generator.device)
    g.set_state(state)
    return g


def _run(step: Step, z: torch.Tensor, x: torch.Tensor, t0: int, n: int, generator, graph: bool) -> torch.Tensor:
    """``n`` steps from ``z``: with ``graph`` the graph of all of them is kept (for the backward),
    else each step's result is detached (the step may still take an inner gradient)."""
    for t in range(t0, t0 + n):
        if graph:
            z = step(z, x, t, generator, True)
        else:
            z = step(z.detach().requires_grad_(True), x.detach(), t, generator, False).detach()
    return z


class _Segment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, x, step, t0, n, generator, state):
        ctx.step, ctx.t0, ctx.n, ctx.generator, ctx.state = step, t0, n, generator, state
        kind = z.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.save_for_backward(z, x)
        with torch.enable_grad():  # the caller's generator advances as in the plain loop
            return _run(step, z, x, t0, n, generator, graph=False)

    @staticmethod
    def backward(ctx, grad):
        z, x = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast  # the re-run takes the forward's precision (bf16 attacks)
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            zi = z.detach().requires_grad_(True)
            xi = x.detach().requires_grad_(True)
            out = _run(ctx.step, zi, xi, ctx.t0, ctx.n, _copy(ctx.generator, ctx.state), graph=True)
            gz, gx = torch.autograd.grad(out, (zi, xi), grad, allow_unused=True)
        gz = torch.zeros_like(z) if gz is None else gz
        gx = torch.zeros_like(x) if gx is None else gx
        return gz, gx, None, None, None, None, None


def unroll(step: Step, z: torch.Tensor, x: torch.Tensor, steps: int, generator: torch.Generator | None = None,
           segment: int | None = None) -> torch.Tensor:
    """``steps`` applications of ``step`` from ``z`` (``x``: the input the steps may also depend on,
    e.g. the centre of a projection), differentiable with respect to ``z`` and ``x`` exactly, with
    checkpointed segments of ``segment`` steps (default ceil(sqrt(steps))). Without gradients it
    is the plain loop. ``generator`` ends where the plain loop would leave it."""
    if steps <= 0:
        return z
    if not torch.is_grad_enabled() or not (z.requires_grad or x.requires_grad):
        with torch.enable_grad():
            return _run(step, z, x, 0, steps, generator, graph=False)
    seg = segment or math.isqrt(steps - 1) + 1
    t = 0
    while t < steps:
        n = min(seg, steps - t)
        state = generator.get_state() if generator is not None else None
        z = _Segment.apply(z, x, step, t, n, generator, state)
        t += n
    return z
