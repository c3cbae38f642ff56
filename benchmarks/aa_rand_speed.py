"""AutoAttack's rand version on a stochastic row: the suite's APGD, whose EOT draws go through the
engine as one batched pass (``eval.eot_batch``), against pyautoattack's APGD, which runs them as
sequential passes; same model, same images, same device, same run.

    python benchmarks/aa_rand_speed.py [--n N] [--iterations I] [--eot E] [--eot-batch B] [--json PATH]

AutoAttack-rand is APGD-CE and APGD-DLR, 100 iterations, EOT 20 (``--iterations``/``--eot`` shrink
it for a CPU check). Model: the benchmarks' PGD-AT ResNet-18 (``bench_common.target_model``) behind
an untrained, full-size DIR, whose random masks make the row stochastic (as ``attack_throughput.py
--through dir``). On a random row every AutoAttack member attacks every sample, whatever the
classifier gets right, so the seconds do not depend on DIR being trained; they grow linearly with
the images, and the script scales them to 1000 images (the figure ``aa_rand_dir_1k_seconds``).
Prints one table per backend: seconds (one timed run after a warm-up on a few images), robust
accuracy under the harness's scoring draws, image-passes and calls through the defended model.
Defaults are CPU-sized; on CUDA: ``--n 100`` (about a minute natively on an H100-class GPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import (
    describe,
    parse_with_test_images,
    sync,
    target_model,
    write_figures,
)

from attacks.base import Threat
from attacks.engine import EngineOptions
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS
from defenses.base import DefendedModel


class CallCounter:
    """Forward calls of a module (a batched EOT pass is one call)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=100, help="APGD iterations (AutoAttack-rand: 100)")
    ap.add_argument("--eot", type=int, default=20, help="EOT draws per APGD iteration (AutoAttack-rand: 20)")
    ap.add_argument("--eot-batch", type=int, default=None, help="draws per batched pass, native (default: --eot)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: all n images in one batch")
    ap.add_argument("--draws", type=int, default=10, help="scoring draws per adversarial image (quick/paper: 10)")
    ap.add_argument("--backends", default="native,pyautoattack")
    args, device, data = parse_with_test_images(ap)
    x, y = data.as_float(), data.labels
    threat = Threat("linf", 8 / 255)
    bs = args.batch_size or len(x)
    eot_batch = args.eot_batch or args.eot
    classifier, what, _ = target_model(args, device)
    from defenses.dir import DIR

    model = DefendedModel(DIR().to(device), classifier).to(device).eval()
    print(f"{describe(device)}; n = {len(x)} ({data.copy}); AutoAttack rand (APGD-CE, APGD-DLR), {args.iterations} "
          f"iterations, EOT {args.eot}; batch {bs}; {args.draws} scoring draws")
    print(f"model: {what}, behind an untrained full-size DIR (stochastic)")
    rows = []
    for backend in args.backends.split(","):
        attack = ATTACKS.get("autoattack")(version="rand", backend=backend, apgd_steps=args.iterations,
                                           eot_iter=args.eot)
        engine = EngineOptions(eot_batch=eot_batch if backend == "native" else 1)
        run_attack(attack, model, x[:2], y[:2], threat, batch_size=2, seed=1, engine=engine)  # warm-up
        counter = CallCounter(model)
        sync(device)
        t0 = time.perf_counter()
        out = run_attack(attack, model, x, y, threat, batch_size=bs, seed=0, engine=engine, draws=args.draws)
        sync(device)
        seconds = time.perf_counter() - t0
        counter.close()
        rows.append({"backend": backend, "eot_batch": engine.eot_batch, "seconds": seconds,
                     "robust_acc_percent": 100 * out.n_correct / out.n, "image_passes": out.forwards,
                     "calls": counter.calls, "n": len(x), "iterations": args.iterations, "eot": args.eot})
    print()
    print("| backend | EOT batch | seconds | seconds per 1000 images | robust acc % | image-passes | calls |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['eot_batch']} | {r['seconds']:.2f} | {r['seconds'] * 1000 / r['n']:,.0f} | "
              f"{r['robust_acc_percent']:.1f} | {r['image_passes']:,} | {r['calls']:,} |")
    got = {r["backend"]: r for r in rows}
    figures, conditions = {}, {}
    size = {"n": len(x), "iterations": args.iterations, "eot": args.eot, "batch": bs, "draws": args.draws,
            "model": "PGD-AT ResNet-18 behind an untrained full-size DIR", "scaled_to": 1000}
    for backend, r in got.items():
        key = "aa_rand_dir_1k_seconds" + ("" if backend == "native" else f"_{backend}")
        figures[key] = r["seconds"] * 1000 / r["n"]
        conditions[key] = size | {"backend": backend, "eot_batch": r["eot_batch"]}
    if {"native", "pyautoattack"} <= got.keys():
        native, ref = got["native"], got["pyautoattack"]
        figures["aa_rand_native_vs_pyautoattack"] = ref["seconds"] / native["seconds"]
        conditions["aa_rand_native_vs_pyautoattack"] = size | {
            "meaning": "pyautoattack backend seconds / native backend seconds",
            "robust_acc_points_native_minus_pyautoattack": native["robust_acc_percent"] - ref["robust_acc_percent"],
            "calls_native": native["calls"], "calls_pyautoattack": ref["calls"]}
        print(f"\nnative / pyautoattack: {ref['seconds'] / native['seconds']:.2f}x faster, calls "
              f"{native['calls']:,} against {ref['calls']:,}, robust accuracy {native['robust_acc_percent']:.1f} "
              f"against {ref['robust_acc_percent']:.1f}% (random draws: equal only in distribution)")
    write_figures(args.json, figures, conditions, rows)


if __name__ == "__main__":
    main()
