"""Per-epoch training checkpoints, so that a killed training resumes from its last complete epoch.

A folder holds ``epoch-NNNN.safetensors`` (model weights, optimizer buffers, random
generator states: tensors only, nothing to unpickle) and ``state.json`` (the epoch,
the loop's history, the scheduler's and optimizer's plain settings, the sha256 of
the tensors file and the key of the training it belongs to). Each file is written
atomically and ``state.json`` last, naming the tensors file it goes with, so a kill at
any point leaves the previous complete epoch readable. A state whose key or hash
does not match is ignored (training starts over), never trusted.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from benchmark import distributed
from benchmark.io import atomic_write, atomic_write_json, sha256_file

log = logging.getLogger("purifybench")
FORMAT = "purifybench-train-state/1"


def _generators(gens: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = {f"rng.{k}": g.get_state() for k, g in gens.items()}
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def pack(modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         gens: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, plain settings) of everything a training loop needs to continue."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"optimizers": {}}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().to("cpu").contiguous().clone()
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        plain_state = {}
        for idx, st in sd["state"].items():
            plain_state[str(idx)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{name}.{idx}.{k}"] = v.detach().to("cpu").contiguous().clone()
                else:
                    plain_state[str(idx)][k] = v
        meta["optimizers"][name] = {"param_groups": sd["param_groups"], "state": plain_state}
    tensors.update(_generators(gens))
    return tensors, meta


def unpack(tensors: dict[str, torch.Tensor], meta: dict, modules: dict[str, nn.Module],
           optimizers: dict[str, torch.optim.Optimizer], gens: dict[str, torch.Generator]) -> None:
    for name, m in modules.items():
        prefix = f"model.{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in optimizers.items():
        saved = meta["optimizers"][name]
        state: dict = {}
        for idx, plain in saved["state"].items():
            state[int(idx)] = dict(plain)
        prefix = f"opt.{name}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                idx, field = k[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[field] = v
        opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    for k, g in gens.items():
        g.set_state(tensors[f"rng.{k}"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                              key=lambda s: int(s.rsplit(".", 1)[1]))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


class EpochCheckpoint:
    """The per-epoch state of one training (``key`` names what is being trained)."""

    def __init__(self, folder: str | Path, key: str) -> None:
        self.folder = Path(folder)
        self.key = key

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def save(self, epoch: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        name = f"epoch-{epoch:04d}.safetensors"
        atomic_write(self.folder / name, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_json(self.state_path, {"format": FORMAT, "key": self.key, "epoch": epoch, "tensors": name,
                                            "sha256": sha256_file(self.folder / name), **meta})
        for old in self.folder.glob("epoch-*.safetensors"):  # only after state.json names the new one
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """(epoch, tensors, meta) of the last complete epoch, or None if there is none to trust."""
        if not self.state_path.is_file():
            return None
        try:
            meta = json.loads(self.state_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT or meta.get("key") != self.key:
                raise ValueError("it belongs to another training")
            path = self.folder / Path(meta["tensors"]).name
            if sha256_file(path) != meta["sha256"]:
                raise ValueError(f"{path.name} fails its checksum")
            tensors = load_file(str(path))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            log.warning("training state in %s ignored (%s); starting from epoch 0", self.folder, exc)
            return None
        return int(meta["epoch"]), tensors, meta

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class LoopState:
    """A defense's training loop wired to the per-epoch state of its training context
    (``context.checkpoint``, ``context.on_epoch``; both None outside a run).

    ``first, history = state.resume()`` restores the last complete epoch, if any;
    ``state.epoch_done(epoch, epochs, history)`` saves after each epoch but the last. Everything
    the loop draws from must be in ``optimizers``, ``gens`` and ``schedulers``; the defense's
    own weights (all its submodules) always are. ``layout`` (saved with the state) says how the loop
    counts its epochs when that is not the plain way: a state saved under another layout is refused."""

    def __init__(self, defense: nn.Module, name: str, context, *, optimizers: dict[str, torch.optim.Optimizer],
                 gens: dict[str, torch.Generator], schedulers: dict | None = None,
                 modules: dict[str, nn.Module] | None = None, layout: str | None = None) -> None:
        self.ckpt: EpochCheckpoint | None = context.checkpoint
        self.layout = layout
        self.hook = context.on_epoch
        self.name = name
        self.state = {"modules": {"defense": defense, **(modules or {})}, "optimizers": optimizers,
                      "gens": {k: g for k, g in gens.items() if g is not None}}
        self.schedulers = schedulers or {}

    def resume(self) -> tuple[int, list[dict]]:
        if self.ckpt is None or (saved := self.ckpt.load()) is None:
            return 0, []
        epoch, tensors, meta = saved
        if not self._fits(tensors, meta):  # e.g. a target's state from before its loop was a Trainer's
            log.warning("%s: training state in %s is laid out for another loop (an older version); starting from "
                        "epoch 0", self.name, self.ckpt.folder)
            return 0, []
        unpack(tensors, meta, **self.state)
        for k, sched in self.schedulers.items():
            sched.load_state_dict(meta["schedulers"][k])
        log.info("%s: resuming after epoch %d (%s)", self.name, epoch, self.ckpt.folder)
        return epoch, list(meta["history"])

    def _fits(self, tensors: dict[str, torch.Tensor], meta: dict) -> bool:
        """Whether a saved state holds every module, optimizer, generator and scheduler of this loop
        (checked before anything is loaded)."""
        names = ([f"model.{m}." for m, module in self.state["modules"].items() if module.state_dict()]
                 + [f"rng.{g}" for g in self.state["gens"]])
        return (all(any(k.startswith(n) for k in tensors) for n in names)
                and set(self.state["optimizers"]) <= set(meta.get("optimizers", {}))
                and set(self.schedulers) <= set(meta.get("schedulers", {})) and "history" in meta
                and meta.get("layout") == self.layout)

    def epoch_done(self, epoch: int, epochs: int, history: list[dict], save: bool = True) -> None:
        """After each epoch: save the state (unless ``save`` is false, or it was the last epoch) and
        call the context's ``on_epoch`` with the epoch's history row."""
        if save and self.ckpt is not None and epoch < epochs and distributed.is_main():  # data-parallel: rank 0
            tensors, meta = pack(**self.state)
            layout = {} if self.layout is None else {"layout": self.layout}
            self.ckpt.save(epoch, tensors, meta | layout | {"history": history, "schedulers": {
                k: s.state_dict() for k, s in self.schedulers.items()}})
        if self.hook is not None and history:
            self.hook(history[-1])
