"""Every shipped config validates and plans its matrix; the paper configs hold the paper's rows."""

import re
from pathlib import Path

import pytest

from benchmark.experiment import load_config
from benchmark.runner import plan_cells

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs_of_every_profile():
    assert {p.parent.name for p in ALL} == {"smoke", "quick", "paper"}


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_config_validates_and_plans(path):
    cfg = load_config(path)
    assert cfg.profile == path.parent.name
    cells = plan_cells(cfg)
    assert cells and len({c.cell_id for c in cells}) == len(cells)


@pytest.mark.parametrize("name", ["cifar10_table1", "svhn_table1", "cifar10_table2"])
def test_paper_tables_hold_every_denoiser(name):
    cfg = load_config(CONFIGS / "paper" / f"{name}.yaml")
    registered = {d.registered for d in cfg.defenses}
    assert {"none", "apegan", "hgd", "nrp", "jatp", "dir"} <= registered
    assert {a.registered for a in cfg.attacks} >= {"clean", "pgd", "autoattack"}
    assert cfg.eval.n is None  # the full test set


def test_table2_transfers_denoisers_from_the_at_target():
    cfg = load_config(CONFIGS / "paper" / "cifar10_table2.yaml")
    assert [t.train.method for t in cfg.targets] == ["at", "trades", "mart"]
    assert all(d.trained_against == "at-resnet18" for d in cfg.defenses if d.registered != "none")


def test_cuda_smoke_holds_every_defense_and_attack_through_the_cuda_paths():
    from benchmark.registry import ATTACKS, DEFENSES

    cfg = load_config(CONFIGS / "smoke" / "cuda.yaml")
    # the suite's own (not a test's or the README example's plugin, which other tests register in this process)
    shipped = lambda registry: {name for name in registry  # noqa: E731
                                if registry.get(name).__module__.split(".")[0] in ("defenses", "attacks", "benchmark")}
    assert {d.registered for d in cfg.defenses} == shipped(DEFENSES)
    assert {a.registered for a in cfg.attacks} == shipped(ATTACKS)
    assert [d.name for d in cfg.datasets] == ["cifar10"] and cfg.datasets[0].n_train <= 8192
    assert 64 <= cfg.eval.n <= 128 and cfg.eval.batch_size == "auto" and cfg.eval.draws > 1
    assert cfg.eval.precision == "bf16" and cfg.eval.channels_last and cfg.eval.eot_batch > 1


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_reads_original_data_it_can_fetch(path):
    """No shipped config needs a private copy: the original datasets, fetched when missing (the offline
    JPEG copy of CIFAR-10 is an explicit override, `--set datasets.cifar10.name=cifar10-jpeg`)."""
    cfg = load_config(path)
    for ds in cfg.datasets:
        assert ds.name in ("digits", "cifar10", "svhn"), (path, ds.name)
        assert ds.name == "digits" or ds.download, (path, ds.name)


@pytest.mark.parametrize("path", sorted((CONFIGS / "quick").glob("*.yaml")), ids=lambda p: p.name)
def test_quick_targets_train_deterministically(path):
    """A quick part that retrains its target in another job gets the same target (same hash)."""
    cfg = load_config(path)
    assert all(t.train is not None and t.train.deterministic for t in cfg.targets)


@pytest.mark.parametrize("path", sorted((CONFIGS / "quick").glob("*.yaml")), ids=lambda p: p.name)
def test_every_quick_part_fits_a_short_gpu_job_and_the_parts_are_the_whole(path, tmp_path):
    """Each part of a quick config (the whole config where it has no parts) plans at most 8 minutes on
    one H100, with no guessed figure; merged, the parts hold exactly the whole config's cells and
    row checks, with the same identities (so their records merge into the whole's tables)."""
    from benchmark.experiment import select_part
    from benchmark.plan import PART_LIMIT_S, Planner
    from benchmark.runner import Runner, checks_hash

    cfg = load_config(path)
    parts = {p: select_part(cfg, p, str(path)) for p in cfg.parts} or {"whole": cfg}
    cells, rows = set(), set()
    for name, sub in parts.items():
        stages = Planner(Runner(sub, tmp_path / name, device="cpu", progress=False, plan_only=True)).stages()
        assert sum(s.seconds for s in stages) <= PART_LIMIT_S, (name, [(s.what, round(s.seconds)) for s in stages])
        assert not any(s.guess for s in stages), name
        cells |= {(c.cell_id, c.cell_hash) for c in plan_cells(sub)}
        rows |= {(t.name, d.name, checks_hash(sub, ds, t, d)) for ds in sub.datasets for t in sub.targets
                 for d in sub.defenses if d.targets is None or t.name in d.targets}
    assert cells == {(c.cell_id, c.cell_hash) for c in plan_cells(cfg)}
    assert rows == {(t.name, d.name, checks_hash(cfg, ds, t, d)) for ds in cfg.datasets for t in cfg.targets
                    for d in cfg.defenses if d.targets is None or t.name in d.targets}


def test_reading_a_config_builds_no_defense_and_reads_no_checkpoint(monkeypatch, tmp_path):
    """Options are checked against each defense's Options dataclass at the edge, without side
    effects; checkpoints are verified when a run starts (its preflight), not when a config is read."""
    from benchmark.registry import DEFENSES

    for name in DEFENSES.names():
        monkeypatch.setattr(DEFENSES.get(name), "__init__", _no_build)
    cfg = load_config(CONFIGS / "smoke" / "cuda.yaml")  # every registered defense
    assert {d.registered for d in cfg.defenses} >= {"none", "dir", "apegan", "hgd", "nrp", "jatp", "menet", "menet-a",
                                                     "ebm", "aid"}
    text = (CONFIGS / "smoke" / "default.yaml").read_text()
    missing = tmp_path / "nope"
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("defenses:", f"defenses:\n  - {{name: HGD-ckpt, defense: hgd, checkpoint: {missing}}}", 1))
    assert any(d.checkpoint for d in load_config(bad).defenses)  # read without touching the file


def _no_build(self, **options):
    raise AssertionError("a defense was built while the config was read")


@pytest.mark.parametrize("options,expected", [
    ({"image_size": 15}, "options.image_size: 15 is not divisible by patch_size 2"),
    ({"mask_ratio": 1.5}, "options.mask_ratio: must be in (0, 1)"),
    ({"head": "mlp"}, "options.head: 'mlp' is not allowed"),
    ({"depthh": 3}, "unknown key 'depthh' (did you mean 'depth'?)"),
])
def test_defense_options_errors_name_the_key(tmp_path, options, expected):
    from benchmark.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndatasets: [{name: digits}]\ntargets: [{name: t, train: {}}]\n"
                   f"defenses: [{{name: DIR, defense: dir, options: {options}}}]\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(bad)


def test_threat_fills_unset_training_eps_and_attack_steps(tmp_path):
    """Training eps / step size and attack step sizes left unset follow the threat; set ones win."""
    import yaml

    cfg = {"name": "t", "datasets": [{"name": "digits"}], "threat": {"eps": 0.1, "step_size": 0.025},
           "targets": [{"name": "at", "arch": "small-cnn", "train": {"method": "at", "epochs": 1}}],
           "defenses": [{"name": "none"}, {"name": "HGD", "defense": "hgd", "train": {"epochs": 1}},
                        {"name": "AID", "defense": "aid", "train": {"epochs": 1, "step_size": 0.0125}},
                        {"name": "EBM", "defense": "ebm", "train": {"iterations": 1}}],
           "attacks": [{"name": "clean"}, {"name": "pgd", "params": {"steps": 3}},
                       {"name": "mi", "attack": "mi-fgsm", "params": {"steps": 3, "step_size": 0.05}}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    c = load_config(path)
    assert (c.targets[0].train.eps, c.targets[0].train.step_size) == (0.1, 0.025)
    d = {s.name: s.train for s in c.defenses}
    assert d["HGD"]["eps"] == 0.1 and d["HGD"]["step_size"] == 0.025
    assert d["AID"]["step_size"] == 0.0125 and d["AID"]["eps"] == 0.1  # its own step size wins
    assert "eps" not in d["EBM"]  # its training has no eps
    a = {s.name: s.params for s in c.attacks}
    assert a["pgd"] == {"steps": 3, "step_size": 0.025} and a["mi"]["step_size"] == 0.05
    # at the built-in default nothing is added (configs keep their artifact and cell keys)
    cfg["threat"] = {"eps": 8 / 255, "step_size": 2 / 255}
    path.write_text(yaml.safe_dump(cfg))
    c = load_config(path)
    assert "eps" not in c.defenses[1].train and "step_size" not in c.attacks[1].params


def test_set_overrides_by_name_and_index(tmp_path, capsys):
    from benchmark.cli import main

    out = tmp_path / "run"
    argv = ["run", "--plan", "--device", "cpu", "--out", str(out), "--set", "threat.eps=0.2",
            "--set", "defenses.DIR.train.epochs=1", "--set", "attacks.1.params.steps=3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "defense digits/DIR (3 pre-training + 1 main epochs)" in text and not out.exists()
    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke" / "default.yaml",
                    {"threat.eps": 0.2, "defenses.HGD.train.epochs": 1, "attacks.1.params.steps": 3})
    assert c.threat.eps == 0.2 and c.attacks[1].params["steps"] == 3
    assert {s.name: s.train for s in c.defenses}["HGD"] == {"epochs": 1, "batch_size": 64, "augment": False,
                                                          "eps": 0.2, "step_size": 0.025}
    assert main(argv[:6] + ["--set", "defenses.XYZ.train.epochs=1"]) == 2
    assert "override defenses.XYZ.train.epochs: no item 'XYZ' in defenses; items: ['none'" in capsys.readouterr().err
    assert main(argv[:6] + ["--set", "threat.eps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_no_product_text_points_at_development_material():
    """A user has the package, its configs and the README: none of it may send them to an issue tracker
    entry or a development document they do not have."""
    root = CONFIGS.parent
    pointers = re.compile(r"\bissues?\b\s*#?\d+|\bsee the issues?\b|\bthe issue'?s?\b|shared/docs|defenses\.md|"
                          r"\.\./shared/", re.I)
    files = [root / "README.md", root / "run_benchmark.py", root / "benchmarks" / "RESULTS.md"]
    for folder in ("benchmark", "attacks", "defenses", "configs"):  # (benchmarks/: measuring tools, GPU-machine notes)
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md", ".sh")]
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pointers.search(line)]
    assert not found, "\n".join(found)


def test_where_data_is_read_from_changes_no_hash_and_plan_says_what_is_missing(tmp_path):
    """The offline override keeps the config's download: true; neither it nor root enters a hash, so a run
    on the JPEG copy made before the shipped configs said download: true keeps its records and artifacts."""
    from benchmark.experiment import DatasetSpec, data_identity, target_key
    from benchmark.plan import data_line

    cfg = load_config(CONFIGS / "quick" / "cifar10_table1.yaml", {"datasets.cifar10.name": "cifar10-jpeg"})
    ds = cfg.datasets[0]
    assert ds.name == "cifar10-jpeg" and ds.download
    plain = DatasetSpec(name="cifar10-jpeg", root="/elsewhere")
    assert data_identity(ds) == data_identity(plain)
    assert target_key(ds, cfg.targets[0], 0) == target_key(plain, cfg.targets[0], 0)
    line = data_line(DatasetSpec(name="cifar10-jpeg", root=str(tmp_path), download=True))
    assert "MISSING" in line and "cannot be downloaded" in line and "fetches" not in line
    assert "missing: download: true fetches it" in data_line(DatasetSpec(name="cifar10", root=str(tmp_path),
                                                                         download=True))
    assert "no root given" in data_line(DatasetSpec(name="imagefolder"))
    assert data_line(DatasetSpec(name="digits")).endswith("(present)")


def test_fractions_are_numbers_wherever_they_are_written():
    cfg = load_config(CONFIGS / "smoke" / "default.yaml", {"attacks.pgd.params.step_size": "1/40",
                                                          "defenses.DIR.train.eps": "8/255"})
    pgd = next(a for a in cfg.attacks if a.name == "pgd")
    assert pgd.params["step_size"] == 1 / 40  # a free-form mapping: the number, in the hash too
    assert next(d for d in cfg.defenses if d.name == "DIR").train["eps"] == 8 / 255
