import importlib.metadata
import sys

import pytest
import torch

from benchmark.errors import BenchError
from benchmark.models import zoo


def test_missing_robustbench_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    with pytest.raises(BenchError, match=r"need the 'zoo' extra"):
        zoo.load_robustbench("Standard")


def _robustbench_installed() -> bool:
    try:  # a stale robustbench/ folder (dropped by torchattacks' wheel) has no distribution metadata
        importlib.metadata.version("robustbench")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _robustbench_installed(), reason="zoo extra not installed")
def test_robustbench_model_loads_offline_from_model_dir(tmp_path):
    zoo._alias_autoattack()
    model_zoo = pytest.importorskip("robustbench.model_zoo.cifar10", reason="robustbench install is broken")
    from robustbench.model_zoo.enums import ThreatModel

    cifar_10_models = model_zoo.cifar_10_models

    torch.manual_seed(0)
    net = cifar_10_models[ThreatModel.Linf]["Standard"]["model"]()
    path = tmp_path / "cifar10" / "Linf"
    path.mkdir(parents=True)
    torch.save(net.state_dict(), path / "Standard.pt")
    model = zoo.load_robustbench("Standard", model_dir=str(tmp_path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)


def test_a_robustbench_model_is_a_config_target_loaded_from_local_files(tmp_path, monkeypatch):
    """``targets: [{name: ..., robustbench: NAME, model_dir: DIR}]``: the model RobustBench's ``load_model``
    gives (here a stand-in module that reads the local weights file the way it does offline: RobustBench
    itself cannot be installed in working order, nor its weights downloaded, on these machines), its card
    with the weights' hash, and one-line errors for a wrong config."""
    import types

    from benchmark.config import ConfigError
    from benchmark.experiment import DatasetSpec, TargetSpec, from_dict, prepare_target

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    folder = tmp_path / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "Carmon2019Unlabeled.pt")
    asked = {}

    def load_model(model_name, dataset, threat_model, model_dir):
        asked.update(name=model_name, dataset=dataset, threat=threat_model, dir=model_dir)
        path = f"{model_dir}/{dataset}/{threat_model}/{model_name}.pt"
        loaded = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        loaded.load_state_dict(torch.load(path, weights_only=True))
        return loaded.eval()

    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model
    monkeypatch.setitem(sys.modules, "robustbench", types.ModuleType("robustbench"))
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    spec = from_dict(TargetSpec, {"name": "carmon", "robustbench": "Carmon2019Unlabeled",
                                  "model_dir": str(tmp_path / "models")}, "cfg.yaml: targets[0]")
    model, card, reused = prepare_target(DatasetSpec(name="cifar10"), spec, None, torch.device("cpu"), tmp_path)
    assert reused and asked == {"name": "Carmon2019Unlabeled", "dataset": "cifar10", "threat": "Linf",
                                "dir": str(tmp_path / "models")}
    from benchmark.io import sha256_file

    assert card["sha256"] == sha256_file(folder / "Carmon2019Unlabeled.pt")
    assert card["arch"] == "robustbench:Carmon2019Unlabeled" and card["method"] == "robustbench"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-6)
    with pytest.raises(ConfigError, match=r"targets\[0\]: give exactly one of train, checkpoint, pretrained, "
                                          r"robustbench \(got \['train', 'robustbench'\]\)"):
        from_dict(TargetSpec, {"name": "c", "robustbench": "X", "train": {}}, "cfg.yaml: targets[0]")
    with pytest.raises(ConfigError, match=r"model_dir: is the folder of a robustbench model's weights"):
        from_dict(TargetSpec, {"name": "c", "checkpoint": "c.json", "model_dir": "m"}, "cfg.yaml: targets[0]")
    utils.load_model = lambda **kw: (_ for _ in ()).throw(FileNotFoundError("no such file models/cifar10/Linf/X.pt"))
    with pytest.raises(BenchError, match=r"RobustBench model 'Carmon2019Unlabeled' \(cifar10, Linf\) could not be "
                                         r"loaded: FileNotFoundError"):
        prepare_target(DatasetSpec(name="cifar10"), spec, None, torch.device("cpu"), tmp_path)
