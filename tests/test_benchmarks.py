"""The benchmark scripts run end to end at CPU size (their figures are not checked: noisy)."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(*args, home: Path, timeout=600):
    """Run a benchmark script; its caches (the trained benchmark model) go under ``home``."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _tiny_cifar(root: Path, n: int = 8) -> Path:
    """CIFAR-10 python batches of random images, ``n`` per batch: the benchmarks' data at toy size."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def test_attack_throughput_prints_its_table_and_targets(tmp_path):
    pytest.importorskip("pyautoattack")
    root = _tiny_cifar(tmp_path)
    home = tmp_path / "home"
    out = _script("benchmarks/attack_throughput.py", "--n", "8", "--steps", "1", "--repeats", "1",
                  "--dataset", "cifar10", "--root", str(root), home=home)
    assert "model: PGD-AT ResNet-18 trained by this script (1 epochs" in out
    cards = list((home / ".cache" / "purifybench" / "bench").glob("at-resnet18-cifar10-*.json"))
    assert len(cards) == 1  # kept for the next call (and the DIR throughput step of gpu_speed.sh)
    assert "| none | ours fp32 |" in out and "| none | pyautoattack APGD-CE |" in out
    # On a CPU at toy size the speed targets are not judged; the accuracy agreement always is.
    assert "| PGD-1 on 8 images <= 3 s |" in out and "| n/a |" in out
    assert "| robust accuracy within 0.3 points of fp32 |" in out
    acc = {line.split("|")[2].strip(): float(line.split("|")[6]) for line in out.splitlines()
           if line.startswith("| none | ours")}
    assert acc["ours fp32"] == acc["ours channels_last"]  # fp32 options never change the result
    # The saved model is a suite checkpoint (hash-verified on load), and the pyautoattack model works too.
    again = _script("benchmarks/attack_throughput.py", "--n", "8", "--steps", "1", "--repeats", "1",
                    "--dataset", "cifar10", "--root", str(root), "--model", str(cards[0]), home=home)
    assert f"model: checkpoint {cards[0]}" in again
    natural = _script("benchmarks/attack_throughput.py", "--n", "8", "--steps", "1", "--repeats", "1",
                      "--dataset", "cifar10", "--root", str(root), "--model", "autoattack", home=home)
    assert "model: pyautoattack's natural ResNet-18" in natural


def test_attack_throughput_refuses_images_of_another_size(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/attack_throughput.py", "--dataset", "digits", "--n", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert r.returncode != 0 and "needs (3, 32, 32)" in r.stderr and "Traceback" not in r.stderr


def _gpu_speed_toy(tmp_path, **env_extra):
    """``gpu_speed.sh --toy`` on tiny CIFAR batches into ``tmp_path/out``: (result, out folder, env)."""
    root = _tiny_cifar(tmp_path / "data")
    out_dir = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, **env_extra}
    r = subprocess.run(["bash", "benchmarks/gpu_speed.sh", "--toy", str(root), str(out_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r, out_dir, env


@pytest.mark.slow
def test_gpu_speed_script_runs_every_step_at_toy_size(tmp_path):
    """The one-command GPU run, on a CPU at toy size: every step runs, its figures are printed and
    collected into one JSON file, which renders into a RESULTS.md section."""
    import json

    r, out_dir, env = _gpu_speed_toy(tmp_path, PURIFYBENCH_GIT_COMMIT="abc1234")
    assert not (out_dir / "failed.txt").exists() and not (out_dir / "skipped.txt").exists()
    logs = {p.stem: p.read_text() for p in out_dir.glob("*.log")}
    assert sorted(logs) == ["aa-rand", "determinism", "exact-memory", "profile", "throughput-dir", "throughput-none",
                            "training-dir"]
    assert "| native | 2 |" in logs["aa-rand"] and "| pyautoattack | 1 |" in logs["aa-rand"]
    assert "deterministic runs bit-identical: yes" in logs["determinism"]
    assert "| dir | ours fp32 |" in logs["throughput-dir"]
    assert "| DIR main training (Algorithm 1), batch 128 |" in logs["training-dir"]
    for section in logs["profile"].split("### ")[1:]:
        kinds = section.split("| kind of work |")[1].split("\n\n")[0].splitlines()[2:]
        shares = [float(line.split("|")[3].strip(" %")) for line in kinds]
        assert abs(sum(shares) - 100) < 0.5, section  # the kinds account for all the profiled time
        assert "| convolution |" in section and "TFLOP/s" in section
    assert {"pgd-none", "pgd-dir", "at"} == {sec.split(":")[0] for sec in logs["profile"].split("### ")[1:]}
    tail = r.stdout.split("== targets")[1]
    assert "DIR main epoch >= 10x faster" in tail and "robust accuracy within 0.3 points of fp32" in tail
    # The figures as data (the toy run writes them into its own folder, not benchmarks/gpu).
    (figures_file,) = [p for p in out_dir.glob("*-cpu.json")]
    doc = json.loads(figures_file.read_text())
    assert doc["device"] == "cpu" and doc["commit"] == "abc1234" and doc["torch"]
    assert json.loads((out_dir / "gpu-figures.json").read_text()) == doc
    expected = {"pgd20_resnet18_10k_seconds", "pgd20_robust_acc_diff_vs_fp32_points", "apgd_ce_vs_pyautoattack",
                "at_epoch_seconds", "dir_main_epoch_seconds", "pgd20_dir_seconds", "deterministic_same_hash",
                "determinism_cost_ratio", "gradient_peak_mib.default.ME-Net.exact", "aa_rand_dir_1k_seconds",
                "aa_rand_native_vs_pyautoattack"}
    assert expected <= set(doc["figures"]) and all(v > 0 or "diff" in k for k, v in doc["figures"].items())
    assert doc["conditions"]["pgd20_resnet18_10k_seconds"]["n"] == 8  # the size it ran at, not the name's
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\nkept\n")
    subprocess.run([sys.executable, "benchmarks/gpu_figures.py", "render", "--results", str(results),
                    "--gpu-dir", str(out_dir)], cwd=ROOT, check=True, env=env, capture_output=True)
    text = results.read_text()
    assert "kept" in text and "PGD-20, 10k images (s)" in text
    assert "| default | ME-Net | 4 |" in text  # the exact-gradient memory table
    row = [line for line in text.splitlines() if line.startswith("| 20")][0]
    assert "cpu" in row and "abc1234" in row and "(not at target size)" in row
    # Rendering again replaces the section instead of adding a second one.
    subprocess.run([sys.executable, "benchmarks/gpu_figures.py", "render", "--results", str(results),
                    "--gpu-dir", str(out_dir)], cwd=ROOT, check=True, env=env, capture_output=True)
    assert results.read_text() == text and text.count("gpu-figures:begin") == 1


def test_gpu_speed_script_skips_a_step_past_its_deadline(tmp_path):
    """A step that would start with less time left than it needs is skipped and said so, and the
    figures are still collected."""
    _, out_dir, _ = _gpu_speed_toy(tmp_path, DEADLINE="0")
    skipped = (out_dir / "skipped.txt").read_text()
    assert "throughput-none skipped: 0 s left of the 0 s deadline" in skipped and skipped.count("skipped") == 7
    assert (out_dir / "gpu-figures.json").is_file()


def test_matrix_time_splits_training_and_evaluation(tmp_path):
    out = _script("benchmarks/matrix_time.py", "reports/quick-cifar10-dir", home=tmp_path)
    assert "| **training** | **888.3** |" in out and "| train target" in out and "evaluate EOT-PGD" in out


def test_gpu_speed_script_stops_a_step_at_its_deadline(tmp_path):
    """A step still running at the deadline is stopped and said so (not counted as failed); the
    later steps are skipped and the figures are still collected."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\ncase \"$1\" in *gpu_figures.py|-c) exec {sys.executable} \"$@\";; esac\nsleep 120\n")
    fake.chmod(0o755)
    out_dir = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(fake), "DEADLINE": "35"}
    r = subprocess.run(["bash", "benchmarks/gpu_speed.sh", "--toy", str(tmp_path), str(out_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    skipped = (out_dir / "skipped.txt").read_text()
    assert "throughput-none stopped at the deadline" in skipped and skipped.count(" skipped: 0 s left") == 6
    assert not (out_dir / "failed.txt").exists() and (out_dir / "gpu-figures.json").is_file()


def test_exact_memory_measures_bpda_and_exact_gradients_of_the_smoke_rows(tmp_path):
    figures = tmp_path / "em.json"
    out = _script("benchmarks/exact_memory.py", "configs/smoke/default.yaml", "--rows", "ME-Net", "EBM",
                  "--batch", "4", "--json", str(figures), home=tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("| configs/")]
    assert len(lines) == 4 and not any("failed" in line or "timed out" in line for line in lines), out
    data = json.loads(figures.read_text())
    rows = {(row["row"], row["mode"]): row for row in data["rows"]}
    assert set(rows) == {(d, m) for d in ("ME-Net", "EBM") for m in ("bpda", "exact")}
    assert all(row["finite"] and row["nonzero"] > 0 and row["batch"] == 4 and row["peak_mib"] >= 0
               for row in rows.values())
    assert data["figures"]["gradient_peak_mib.default.EBM.exact"] == rows[("EBM", "exact")]["peak_mib"]


def test_derived_pass_costs_are_what_pass_flops_prints(tmp_path):
    """costs.yaml's FLOP-derived per-pass figures are the script's: rerunning it reproduces each to
    the two significant figures the table keeps (FLOP counts do not depend on the CPU)."""
    import re

    import yaml

    out = _script("benchmarks/pass_flops.py", home=tmp_path)
    printed = {m.group(1): float(m.group(2)) for m in
               re.finditer(r"^\| ([\w-]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|$", out, re.M)}
    table = yaml.safe_load((ROOT / "benchmark" / "costs.yaml").read_text())["pass_us"]
    derived = {k: v for k, v in table.items() if "pass_flops.py" in str(v.get("derived", ""))}
    assert set(derived) <= set(printed) and len(derived) >= 8, (sorted(derived), sorted(printed))
    for name, entry in derived.items():
        assert abs(entry["us"] - printed[name]) <= 0.06 * printed[name], (name, entry["us"], printed[name])


def test_quick_parts_script_runs_parts_under_a_deadline_and_packs_their_results(tmp_path):
    """``quick_parts.sh`` (a GPU job's parts of a config, in one call), on a CPU at toy size: each part
    runs into its own folder, is packed without its checkpoints, and is timed against its plan; a part
    that would not fit what is left of the deadline is skipped and said so."""
    import tarfile

    import yaml

    cfg = {"name": "parts-toy", "profile": "smoke", "device": "cpu",
           "plugins": [str(ROOT / "tests" / "purifybench_testing.py")],
           "datasets": [{"name": "digits", "options": {"size": 16}}], "threat": {"eps": 0.1, "step_size": 0.025},
           "eval": {"n": 30, "batch_size": 30, "checks": {"enabled": False}},
           "targets": [{"name": "at", "arch": "small-cnn", "train": {
               "method": "at", "epochs": 1, "batch_size": 64, "lr": 0.05, "augment": False, "attack_steps": 1,
               "deterministic": True, "progress": False}}],
           "defenses": [{"name": "none"}, {"name": "den", "defense": "test-denoiser", "options": {"width": 4},
                                            "train": {"epochs": 1}}],
           "attacks": [{"name": "clean"}, {"name": "pgd", "params": {"steps": 2}}],
           "parts": {"a": ["none"], "b": ["den"]}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, "PURIFYBENCH_GIT_COMMIT": "abc"}

    def parts(out, *items, **extra):
        r = subprocess.run(["bash", "benchmarks/quick_parts.sh", str(out), *items], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=env | extra)
        return r, (json.loads((out / "parts.json").read_text()) if (out / "parts.json").is_file() else None)

    r, done = parts(tmp_path / "out", f"{path}:a", f"{path}:b")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [(p["part"], p["rc"]) for p in done["parts"]] == [("a", 0), ("b", 0)] and done["commit"] == "abc"
    assert all(p["plan_s"] > 0 and p["wall_s"] >= 0 for p in done["parts"])
    with tarfile.open(tmp_path / "out" / "parts-toy-b.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.startswith("parts-toy-b/records/") for n in names) and "parts-toy-b/tables/results.md" in names
    assert not any("/artifacts" in n for n in names)
    r, skipped = parts(tmp_path / "late", f"{path}:a", DEADLINE="0")
    assert r.returncode == 0 and skipped["parts"][0]["skipped"] and "** parts-toy-a skipped" in r.stdout
    r, _ = parts(tmp_path / "bad", str(path))
    assert r.returncode == 2 and "is not CONFIG:PART" in r.stderr
