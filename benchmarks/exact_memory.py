"""Peak memory and time of one input gradient through an iterative purifier: exact (checkpointed
back-propagation through the whole purification, ``gradient: exact``) against BPDA.

For every row of the given configs whose defense declares exact gradients (EBM, AID-Purifier,
ME-Net), at the row's options and the config's evaluation batch, it builds the defense in front of
the config's target architecture and takes one gradient of the summed cross-entropy with respect
to a batch of images, once through BPDA and once exactly. Each measurement runs in a fresh process,
so that one does not inherit the other's peak:

* on CUDA, the peak of ``torch.cuda.max_memory_allocated`` above what was allocated before;
* on the CPU, the peak resident set size of the process (``VmHWM``, reset just before) above
  its size then.

Weights are untrained and images uniform noise: memory and time of a gradient do not depend on
their values (ME-Net's SVD and AID's loop run the same shapes). The figures are memory of the
gradient pass itself, not of a whole attack (which adds the attack's few image-sized tensors).

    python benchmarks/exact_memory.py [CONFIG ...] [--batch N] [--rows NAME ...] [--json PATH]

Defaults: ``configs/smoke/default.yaml`` and ``configs/quick/cifar10_table3.yaml``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import add_json_arg, describe, pick_device, write_figures  # noqa: E402

from benchmark.experiment import build_defense, load_config  # noqa: E402
from benchmark.models import create_model  # noqa: E402
from benchmark.registry import DEFENSES  # noqa: E402
from defenses.base import DefendedModel  # noqa: E402

DEFAULT_CONFIGS = ("configs/smoke/default.yaml", "configs/quick/cifar10_table3.yaml")
# (channels, size) of a dataset as its loader gives it by default; anything else is 3 x 32 x 32.
# A dataset's ``size`` / ``channels`` options (digits: size 16 in the smoke config) take precedence.
SHAPES = {"digits": (1, 16), "fashion-mnist": (1, 28)}
MODES = ("bpda", "exact")


def _shape(ds) -> tuple[int, int]:
    channels, size = SHAPES.get(ds.name, (3, 32))
    channels = ds.options.get("channels") or channels
    size = ds.options.get("size", size) or (8 if ds.name == "digits" else size)  # size null: digits' native 8x8
    return int(channels), int(size)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(config: str, row: str, mode: str, batch: int | None) -> dict:
    """One gradient (in this process): its peak memory in MiB above the start, and its seconds."""
    cfg = load_config(ROOT / config)
    spec = next(d for d in cfg.defenses if d.name == row)
    channels, size = _shape(cfg.datasets[0])
    target_spec = next((t for t in cfg.targets if spec.targets is None or t.name in spec.targets), cfg.targets[0])
    device = pick_device()
    torch.manual_seed(0)
    target = create_model(target_spec.arch, in_channels=channels).to(device).eval()
    defense = build_defense(spec, f"defenses[{row}]", data_shape=(channels, size))
    if hasattr(defense, "attach_classifier"):
        defense.attach_classifier(target)
    defense.to(device).eval()
    model = DefendedModel.for_defense(defense, target)
    n = batch or cfg.eval.batch_size
    if not isinstance(n, int):  # "auto": the measurement needs a size
        n = 128
    n = min(n, spec.eval_n or n)
    x = torch.rand(n, channels, size, size, device=device)
    y = torch.randint(0, 10, (n,), device=device)

    def step():
        xi = x.clone().requires_grad_(True)
        with model.gradients(bpda=mode == "bpda", exact=mode == "exact"):
            loss = torch.nn.functional.cross_entropy(model(xi), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xi)
        return grad

    if device.type == "cuda":
        # One gradient first: cuDNN's autotuning (benchmark mode) allocates workspaces of several GiB on
        # its first call of each shape, which would otherwise count as the gradient's peak.
        step()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
        before = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    grad = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = _rss_kib("VmHWM") * 1024 - before
    seconds = time.perf_counter() - t0
    return {"config": config, "row": row, "defense": spec.registered, "mode": mode, "batch": n,
            "options": spec.options, "peak_mib": peak / 2**20, "seconds": seconds,
            "finite": bool(torch.isfinite(grad).all()), "nonzero": float((grad != 0).float().mean()),
            "device": describe(device), "memory": "cuda max_memory_allocated" if device.type == "cuda"
            else "cpu peak RSS (VmHWM)"}


def rows_of(config: str, only: list[str] | None) -> list[str]:
    cfg = load_config(ROOT / config)
    return [d.name for d in cfg.defenses if DEFENSES.get(d.registered).exact_gradient
            and (not only or d.name in only)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--batch", type=int, default=None, help="images per gradient (default: the config's eval batch)")
    ap.add_argument("--rows", nargs="*", default=None, help="only these rows (defense names of the configs)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per measurement before it is given up")
    ap.add_argument("--one", nargs=3, metavar=("CONFIG", "ROW", "MODE"), help=argparse.SUPPRESS)
    add_json_arg(ap)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.batch)))
        return 0
    results = []
    print("| Config | Row | Batch | Gradient | Peak MiB | Seconds | Finite | Non-zero |")
    print("|---|---|---:|---|---:|---:|---|---:|")
    for config in args.configs:
        for row in rows_of(config, args.rows):
            for mode in MODES:
                cmd = [sys.executable, __file__, "--one", config, row, mode]
                if args.batch:
                    cmd += ["--batch", str(args.batch)]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                except subprocess.TimeoutExpired:
                    print(f"| {config} | {row} | | {mode} | timed out after {args.timeout:g} s | | | |")
                    continue
                if done.returncode != 0:
                    err = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                    print(f"| {config} | {row} | | {mode} | failed: {err} | | | |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(r)
                print(f"| {config} | {row} | {r['batch']} | {mode} | {r['peak_mib']:.1f} | {r['seconds']:.2f} "
                      f"| {r['finite']} | {100 * r['nonzero']:.0f}% |", flush=True)
                # Written after each measurement: a job stopped at its deadline keeps what it measured.
                name = f"gradient_peak_mib.{Path(r['config']).stem}.{r['row']}.{r['mode']}"
                write_figures(args.json, {name: r["peak_mib"]},
                              {name: {k: r[k] for k in ("config", "batch", "options", "seconds", "device", "memory")}},
                              [r])
    if results:
        print(f"\n{results[0]['device']}; memory: {results[0]['memory']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
