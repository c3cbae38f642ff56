import importlib.util
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


@pytest.mark.skipif(importlib.util.find_spec("robustbench") is None, reason="zoo extra not installed")
def test_robustbench_model_loads_offline_from_model_dir(tmp_path):
    zoo._alias_autoattack()
    from robustbench.model_zoo.cifar10 import cifar_10_models
    from robustbench.model_zoo.enums import ThreatModel

    torch.manual_seed(0)
    net = cifar_10_models[ThreatModel.Linf]["Standard"]["model"]()
    path = tmp_path / "cifar10" / "Linf"
    path.mkdir(parents=True)
    torch.save(net.state_dict(), path / "Standard.pt")
    model = zoo.load_robustbench("Standard", model_dir=str(tmp_path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)
