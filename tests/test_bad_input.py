"""Table-driven bad input: each case is one line on stderr naming the problem, exit code 2, no
traceback, and nothing written to the results folder."""

import io
import shutil
import tarfile

import pytest
import torch
import yaml
from purifybench_testing import OldSignature  # noqa: F401  (registers the test-only defenses)

from benchmark.checkpoint import save_checkpoint
from benchmark.cli import main
from benchmark.models import create_model

BASE = {"name": "bad", "profile": "smoke", "device": "cpu", "datasets": [{"name": "digits"}],
        "targets": [{"name": "t", "train": {"epochs": 1}}], "eval": {"n": 10}}


def _config(tmp_path, **changes):
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node, *path = dotted.split("__")
        parent = cfg
        keys = [node, *path]
        for k in keys[:-1]:
            parent = parent[int(k)] if isinstance(parent, list) else parent[k]
        last = keys[-1]
        if isinstance(parent, list):
            parent[int(last)] = value
        else:
            parent[last] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _checkpoint(tmp_path, damage=None):
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=(0.3,), std=(0.3,)).eval()
    card = save_checkpoint(model, tmp_path / "ckpt" / "target",
                           {"arch": "small-cnn", "num_classes": 10, "in_channels": 1, "mean": [0.3], "std": [0.3],
                            "method": "natural", "metrics": {}})
    weights = next((tmp_path / "ckpt").glob("*.safetensors"))
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "card":
        card.write_text("{not json")
    return str(card)


def _archive(tmp_path, members):
    root = tmp_path / "folder"
    root.mkdir()
    with tarfile.open(root / "test.tar.xz", "w:xz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(root)


def _run(tmp_path, **changes):
    return ["run", str(_config(tmp_path, **changes)), "--out", str(tmp_path / "out")]


CASES = {
    # names
    "unknown defense, near miss": (lambda t: _run(t, defenses=[{"name": "nrpp"}]), "did you mean 'nrp'"),
    "unknown attack, near miss": (lambda t: _run(t, attacks=[{"name": "autoatack"}]), "did you mean 'autoattack'"),
    "unknown dataset, near miss": (lambda t: _run(t, datasets=[{"name": "cifar-10"}]), "unknown dataset 'cifar-10'"),
    "unknown model": (lambda t: _run(t, targets=[{"name": "t", "arch": "resnet81", "train": {}}]), "unknown model"),
    "path traversal in a row name": (lambda t: _run(t, defenses=[{"name": "../../x", "defense": "none"}]),
                                     "is not allowed"),
    "duplicate row names": (lambda t: _run(t, defenses=[{"name": "none"}, {"name": "none"}]), "duplicate names"),
    "UMAP of a row that is not there": (lambda t: _run(t, report={"umap": ["DIR"]}),
                                        "report.umap: ['DIR'] are not defenses of this config"),
    "AutoAttack member a stochastic row's version lacks": (
        lambda t: _run(t, defenses=[{"name": "none"}, {"name": "ME-Net", "defense": "menet"}],
                       attacks=[{"name": "autoattack", "params": {"attacks": ["apgd-ce", "apgd-t"]}}]),
        "attacks[0] (autoattack).params.attacks: apgd-t not in the rand version that row 'ME-Net' gets"),
    "AutoAttack member that does not exist": (
        lambda t: _run(t, attacks=[{"name": "autoattack", "params": {"attacks": ["fab-x"]}}]),
        "attacks[0] (autoattack).params.attacks: must be a non-empty list of"),
    "unknown top-level key": (lambda t: _run(t, thread={"eps": 0.1}), "unknown key 'thread'"),
    "unknown attack parameter": (lambda t: _run(t, attacks=[{"name": "pgd", "params": {"stepz": 3}}]), "stepz"),
    "unknown defense option": (lambda t: _run(t, defenses=[{"name": "dir", "options": {"depthh": 3}}]), "depthh"),
    "unknown defense training key": (lambda t: _run(t, defenses=[{"name": "hgd", "train": {"epochz": 1}}]),
                                     "epochz"),
    "a plugin with the old fit signature": (lambda t: _run(t, defenses=[{"name": "old", "defense": "test-old-fit"}]),
                                            "fit(self, classifier, train, device, config, seed), the signature before the training context"),
    "trained_against an unknown target": (lambda t: _run(t, defenses=[{"name": "none", "trained_against": "x"}]),
                                          "trained_against: 'x' is not a target"),
    "worst-of with an unknown member": (lambda t: _run(t, attacks=[{"name": "worst-of", "params": {
        "attacks": [{"name": "pgdd"}]}}]), "did you mean 'pgd'"),
    # types and ranges
    "wrong type for n": (lambda t: _run(t, eval={"n": "ten"}), "eval.n"),
    "negative eps": (lambda t: _run(t, threat={"eps": -0.1}), "threat.eps: must be in (0, 1]"),
    "eps above 1": (lambda t: _run(t, threat={"eps": 8}), "threat.eps: must be in (0, 1]"),
    "zero step size": (lambda t: _run(t, threat={"eps": 0.1, "step_size": 0}), "threat.step_size"),
    "NaN eps": (lambda t: _run(t, threat={"eps": float("nan")}), "threat.eps"),
    "unknown profile": (lambda t: _run(t, profile="fast"), "profile"),
    "zero batch size": (lambda t: _run(t, eval={"n": 10, "batch_size": 0}), "eval.batch_size: must be >= 1 or auto"),
    "unknown precision": (lambda t: _run(t, eval={"precision": "fp16"}), "eval.precision"),
    "zero eot_batch": (lambda t: _run(t, eval={"eot_batch": 0}), "eval.eot_batch: must be >= 1"),
    "zero eval_n of a row": (lambda t: _run(t, defenses=[{"name": "none", "eval_n": 0}]), "eval_n: must be >= 1"),
    "negative attack steps": (lambda t: _run(t, attacks=[{"name": "pgd", "params": {"steps": -1}}]), "steps"),
    "empty matrix": (lambda t: _run(t, defenses=[]), "must list at least one entry"),
    "n larger than the dataset": (lambda t: _run(t, eval={"n": 100000}), "is larger than the digits test split"),
    "--n-eval larger than the dataset": (lambda t: _run(t) + ["--n-eval", "99999"], "larger than"),
    # files
    "missing config": (lambda t: ["run", str(t / "nope.yaml"), "--out", str(t / "out")], "not found"),
    "YAML syntax error": (lambda t: ["run", str((t / "x.yaml").write_text("a: [b") and t / "x.yaml"),
                                     "--out", str(t / "out")], "YAML syntax error"),
    "config that is a list": (lambda t: ["run", str((t / "x.yaml").write_text("- a\n- b\n") and t / "x.yaml"),
                                         "--out", str(t / "out")], "bad"),
    "missing checkpoint": (lambda t: _run(t, targets=[{"name": "t", "checkpoint": str(t / "no.json")}]),
                           "not found"),
    "corrupt checkpoint card": (lambda t: _run(t, targets=[{"name": "t", "checkpoint": _checkpoint(t, "card")}]),
                                "is not valid JSON"),
    "truncated checkpoint weights": (lambda t: _run(t, targets=[{"name": "t", "checkpoint": _checkpoint(
        t, "truncate")}]), "does not match the card"),
    "checkpoint whose hash does not match": (lambda t: _run(t, targets=[{"name": "t", "checkpoint": _checkpoint(
        t, "flip")}]), "does not match the card"),
    "non-image archive": (lambda t: _run(t, datasets=[{"name": "imagefolder", "root": _archive(
        t, [("test/cat/0.jpg", b"text, not a jpeg")])}]), "is not a readable image"),
    "path-traversal archive member": (lambda t: _run(t, datasets=[{"name": "imagefolder", "root": _archive(
        t, [("../../evil.png", b"x")])}]), "would write outside"),
    "device cuda without CUDA": (lambda t: _run(t) + ["--device", "cuda"], "CUDA is not available"),
    "unknown device": (lambda t: _run(t) + ["--device", "tpu"], "device 'tpu'"),
    "report of a folder that is no run": (lambda t: ["report", str(t)], "is not a run folder"),
    "report with an unknown preset": (lambda t: ["report", str((t / "records").mkdir() or t), "--preset", "t9"],
                                      "unknown preset"),
    "eval of a missing checkpoint": (lambda t: ["eval", str(t / "missing")], "not found"),
    # cluster options
    "--partition without --executor": (lambda t: _run(t) + ["--partition", "gpu"], "--partition needs --executor"),
    "--executor slurm without sbatch": (lambda t: _run(t) + ["--executor", "slurm"], "sbatch is not on PATH"),
    "--jobs 0": (lambda t: _run(t) + ["--executor", "local", "--jobs", "0"], "--jobs must be at least 1"),
    "--slurm-arg with the local executor": (lambda t: _run(t) + ["--executor", "local", "--slurm-arg", "qos=x"],
                                            "--slurm-arg applies only to --executor slurm"),
    "--slurm-arg without '='": (lambda t: _run(t) + ["--executor", "slurm", "--slurm-arg", "account"],
                                "expected KEY=VALUE"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(tmp_path, capsys, case):
    build, expected = CASES[case]
    if case == "device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "--executor slurm without sbatch" and shutil.which("sbatch"):
        pytest.skip("this machine has Slurm")
    argv = build(tmp_path)
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_every_row_error_is_reported_by_its_name(tmp_path, capsys):
    path = _config(tmp_path, defenses=[{"name": "none"}, {"name": "DIR", "defense": "dir", "options": {"depth": 0}},
                                       {"name": "HGD", "defense": "hgd", "train": {"epochs": 0}}])
    assert main(["run", str(path), "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err  # one line, every bad row in order
    assert err.index("defenses[1] (DIR).options.depth: must be >= 1") < err.index(
        "; ") < err.index("defenses[2] (HGD).train.epochs: must be >= 1")
    assert not (tmp_path / "out").exists()
