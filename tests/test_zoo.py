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
