"""The benchmark scripts run end to end at CPU size (their figures are not checked: noisy)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg"


def _script(*args, timeout=600):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(not (SHARED_CIFAR / "test.tar.xz").is_file(), reason="offline CIFAR-10 JPEG copy not present")
def test_attack_throughput_prints_its_table():
    pytest.importorskip("pyautoattack")
    out = _script("benchmarks/attack_throughput.py", "--n", "8", "--steps", "1", "--repeats", "1")
    assert "| none | ours fp32 |" in out and "| none | pyautoattack APGD-CE |" in out


def test_matrix_time_splits_training_and_evaluation():
    out = _script("benchmarks/matrix_time.py", "reports/quick-cifar10-dir")
    assert "| **training** | **888.3** |" in out and "| train target" in out and "evaluate EOT-PGD" in out
