"""The README's "Writing a defense" example, run as it is printed: it trains, resumes after a kill
bit-identically through the shared Trainer, and a config names it like any other defense."""

import copy
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from benchmark.records import load_records
from benchmark.registry import DEFENSES
from benchmark.resume import EpochCheckpoint
from defenses.base import TrainContext

ROOT = Path(__file__).resolve().parent.parent


def _code() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Writing a defense"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _example():
    """The class the README's code block defines (registered once per process)."""
    if "residual-denoiser" not in DEFENSES:
        exec(compile(_code(), "README.md (Writing a defense)", "exec"), {"__name__": "readme_example"})
    return DEFENSES.get("residual-denoiser")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_benchmark.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_readme_defense_saved_in_defenses_is_found():
    """The README says: put it in ``defenses/``. A fresh process finds it there, with no other line."""
    file = ROOT / "defenses" / f"pbtest_readme_example_{uuid.uuid4().hex[:8]}.py"  # (conftest: STRAY)
    file.write_text(_code(), encoding="utf-8")
    try:
        out = _cli("list", "defenses")
    finally:
        file.unlink()
    assert out.returncode == 0, out.stderr
    assert "residual-denoiser" in out.stdout and "README example" in out.stdout


def test_a_broken_module_in_defenses_warns_and_the_rest_loads():
    file = ROOT / "defenses" / f"pbtest_broken_{uuid.uuid4().hex[:8]}.py"
    file.write_text("raise RuntimeError('half-written')\n", encoding="utf-8")
    try:
        out = _cli("list", "defenses")
    finally:
        file.unlink()
    assert out.returncode == 0, out.stderr
    assert f"{file.name} was not loaded: RuntimeError: half-written" in out.stderr
    assert "dir-official" in out.stdout


def test_a_config_imports_its_plugins_before_it_is_checked(tmp_path):
    from test_runner import BASE, _write

    from benchmark.experiment import load_config

    (tmp_path / "my_defense.py").write_text(_code().replace('"residual-denoiser"', '"plugged-denoiser"'),
                                            encoding="utf-8")
    cfg = json.loads(json.dumps(BASE))
    cfg["plugins"] = ["my_defense.py"]
    cfg["defenses"] = [{"name": "mine", "defense": "plugged-denoiser", "options": {"width": 4}}]
    loaded = load_config(_write(tmp_path, cfg))
    file = tmp_path / "my_defense.py"
    assert loaded.plugins == [str(file.resolve())] and "plugged-denoiser" in DEFENSES  # the path a manifest keeps
    # a worker (a cluster job, `umap`) rebuilds the config from the manifest in a new process: it imports
    # the plugin again from where the manifest says it is
    from dataclasses import asdict

    (tmp_path / "manifest.json").write_text(json.dumps(asdict(loaded)))
    code = ("import json, sys; from benchmark.experiment import config_from_dict; "
            "print(config_from_dict(json.load(open(sys.argv[1])), 'manifest').defenses[0].registered)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "manifest.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "plugged-denoiser", out.stderr[-1500:]
    assert load_config(_write(tmp_path, cfg)).plugins == [str(file.resolve())]  # loaded twice: imported once
    cfg["plugins"] = ["no_such_module_here"]
    with pytest.raises(Exception, match=r"plugins\[0\] \(no_such_module_here\): importing it failed: "
                                        "ModuleNotFoundError"):
        load_config(_write(tmp_path, cfg))
    cfg["plugins"] = ["missing.py"]
    with pytest.raises(Exception, match=r"plugins\[0\] \(missing.py\): no such file"):
        load_config(_write(tmp_path, cfg))


class Killed(Exception):
    pass


def test_the_readme_defense_trains_and_resumes_bit_identically(trained_pair, digits_train, tmp_path):
    cls = _example()
    clf = copy.deepcopy(trained_pair["at"][0]).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    data = digits_train.subset(192, seed=0)
    cfg = cls.TrainConfig(epochs=3, batch_size=64, eps=0.1, attack_steps=2, progress=False)

    def fresh():
        torch.manual_seed(0)
        return cls(in_channels=1, width=8)

    ref = fresh()
    result = ref.fit(clf, data, TrainContext("cpu", 0), cfg)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert not ref.training

    def stop_after_2(row):
        if row["epoch"] == 2:
            raise Killed

    partial = EpochCheckpoint(tmp_path / "partial", "k")
    with pytest.raises(Killed):
        fresh().fit(clf, data, TrainContext("cpu", 0, checkpoint=partial, on_epoch=stop_after_2), cfg)
    seen = []
    torch.manual_seed(123)  # whatever ran in between must not matter
    resumed = fresh()
    resumed.fit(clf, data, TrainContext("cpu", 0, checkpoint=partial, on_epoch=seen.append), cfg)
    assert [row["epoch"] for row in seen] == [3]  # only the last epoch ran again
    for (k, v), w in zip(resumed.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, w), k


def test_a_config_names_the_readme_defense_like_any_other(tmp_path):
    from test_runner import BASE, _run, _write

    _example()
    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"] = [{"name": "mine", "defense": "residual-denoiser", "options": {"width": 4},
                        "train": {"epochs": 1, "eps": 0.1, "attack_steps": 1, "progress": False}}]
    out = tmp_path / "run"
    _run(_write(tmp_path, cfg), out)
    records = load_records(out)
    assert {r.cell.attack for r in records} == {"clean", "pgd"} and all(r.defense == "residual-denoiser"
                                                                       for r in records)
    assert all(r.defense_checkpoint_sha256 for r in records)
