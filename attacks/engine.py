"""Speed options of the attack engine, applied without changing what an attack computes.

Every attack already takes input-only gradients (``torch.autograd.grad`` with respect to the
images, parameters frozen). On top of that the engine offers, per evaluation:

* ``precision: bf16``: the attack's forward and backward passes under bf16 autocast; logits are
  returned in fp32 so losses are fp32; the harness re-scores the final adversarial images with a
  plain fp32 pass (the reported accuracy never comes from a bf16 pass);
* ``channels_last``: model weights and inputs in NHWC (faster convolutions on tensor cores);
* ``compile``: ``torch.compile`` of the classifier inside the defended model and of the defense's
  networks (``Defense.compile_modules``: DIR's ViT, the denoisers);
* ``eot_batch``: EOT draws replicated into one forward (``eot_batch`` draws per pass) instead of
  one pass per draw. Every stochastic defense draws its randomness per row, so a replicated batch
  holds independent draws; for a deterministic model the result equals the sequential one;
* ``batch_size: auto`` (in ``eval``): the largest batch that fits in free GPU memory, from a probe.

What the engine never changes: the threat model, the number of steps or samples, the loss, and
the fp32 re-scoring; ``tests/test_engine.py`` checks that fp32 results are identical with and
without the options that apply on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("purifybench")


@dataclass
class EngineOptions:
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    eot_batch: int = 1  # EOT draws per forward pass (replicated batch); 1 = one pass per draw (checked in eval)

    @property
    def is_default(self) -> bool:
        return self == EngineOptions()

    def changes_results(self) -> dict:
        """The options that can change an attack's output (bf16; batched EOT changes which random
        numbers a stochastic defense draws); they belong in a cell's identity."""
        out = {}
        if self.precision != "fp32":
            out["precision"] = self.precision
        if self.eot_batch != 1:
            out["eot_batch"] = self.eot_batch
        return out


class AttackView(nn.Module):
    """What an attack calls: the defended model under the engine's options. It forwards nothing
    implicitly: ``defended`` is the model behind it (what :func:`attacks.base.defended_of` returns),
    ``stochastic`` and ``eot_batch`` are what attacks read."""

    def __init__(self, model: nn.Module, options: EngineOptions, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.options = options
        self.device_type = device.type
        self.eot_batch = options.eot_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.options.precision == "bf16":
            with torch.autocast(self.device_type, dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x)

    @property
    def defended(self) -> nn.Module:
        return self.model

    @property
    def stochastic(self) -> bool:
        return bool(getattr(self.model, "stochastic", False))


def prepare_model(defended: nn.Module, options: EngineOptions) -> nn.Module:
    """Apply the options that change the model itself (memory layout, compilation), once."""
    if options.channels_last:
        defended.to(memory_format=torch.channels_last)
    if options.compile and not getattr(defended, "_engine_compiled", False):
        if not hasattr(defended, "classifier"):
            raise ValueError("eval.compile needs a defended model (defense + classifier)")
        defended.classifier = torch.compile(defended.classifier)
        for module in defended.defense.compile_modules():  # the denoiser too (in place: same weights)
            module.compile()
        defended._engine_compiled = True
    return defended


def auto_batch_size(model: nn.Module, sample: torch.Tensor, y: torch.Tensor, n: int, *,
                    replicas: int = 1, fraction: float = 0.7, cap: int = 4096, cpu_default: int = 500) -> int:
    """The largest batch whose attack step (forward + input gradient, ``replicas`` EOT copies per
    image) fits in ``fraction`` of free GPU memory, measured with a probe batch. On a CPU:
    ``cpu_default``. Never more than ``n`` or ``cap``."""
    device = sample.device
    if device.type != "cuda":
        return max(1, min(n, cpu_default))
    probe = max(1, min(len(sample), 32))
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = sample[:probe].detach().repeat(replicas, 1, 1, 1).requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), y[:probe].repeat(replicas), reduction="sum")
    torch.autograd.grad(loss, x)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - before) / probe)
    free, _ = torch.cuda.mem_get_info(device)
    size = int(fraction * free / per_image)
    chosen = max(1, min(n, cap, size))
    # Said once it limits the batch (every cell probes: at info level it filled the CUDA smoke's log)
    (log.info if chosen < n else log.debug)(
        "auto batch size: %d (probe %.1f MiB per image with %d EOT copies, %.1f GiB free)",
        chosen, per_image / 2**20, replicas, free / 2**30)
    return chosen
