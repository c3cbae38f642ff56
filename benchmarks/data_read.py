"""Seconds to read a dataset's two splits in its original format, the ``data`` stage of a plan.

Writes full-size files in each original format (CIFAR-10's python batches, SVHN's .mat files) filled
with random pixels into a temporary folder, then times the suite's loader on them: the same bytes
to parse as the real files (the pixel values do not change the work). The real datasets cannot be
downloaded on the machines the suite is developed on; this measures the code path they take.

    python benchmarks/data_read.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import describe, pick_device, timed  # noqa: E402

from benchmark.data import load_dataset  # noqa: E402


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 10_000)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def write_svhn(root: Path, rng: np.random.Generator) -> None:
    from scipy.io import savemat

    root.mkdir(parents=True)
    for split, n in (("train", 73_257), ("test", 26_032)):
        savemat(str(root / f"{split}_32x32.mat"),
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                 "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(describe(pick_device()))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in (("cifar10", write_cifar10), ("svhn", write_svhn)):
            root = Path(tmp) / name
            write(root, rng)

            def both(name=name, root=root):
                return [load_dataset(name, split, root=str(root)) for split in ("train", "test")]

            seconds, splits = timed(both, pick_device(), args.repeats)
            print(f"{name}: {seconds:.2f} s for {sum(len(s) for s in splits):,} images (train and test, median of "
                  f"{args.repeats})")


if __name__ == "__main__":
    main()
