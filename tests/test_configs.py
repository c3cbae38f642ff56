"""Every shipped config validates and plans its matrix; the paper configs hold the paper's rows."""

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
