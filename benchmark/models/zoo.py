"""RobustBench model zoo (the optional ``zoo`` extra).

robustbench 1.1.1 on PyPI imports a module named ``autoattack``, but depends on
``pyautoattack``, whose module has that other name, so a plain ``import
robustbench.eval`` fails. We register ``pyautoattack`` under the name
``autoattack`` before importing robustbench (the two share the API robustbench
uses: ``AutoAttack`` and ``state.EvaluationState``). Weights come from
RobustBench's own download links (Google Drive), which need internet; with
``model_dir`` pointing at already-downloaded files, loading works offline.
"""

from __future__ import annotations

import importlib
import sys

from benchmark.errors import BenchError
from benchmark.models import Classifier


def _alias_autoattack() -> None:
    if "autoattack" in sys.modules:
        return
    try:
        pyaa = importlib.import_module("pyautoattack")
    except ImportError:
        return
    sys.modules["autoattack"] = pyaa
    for sub in ("state", "autopgd_base", "fab_pt", "square", "checks", "other_utils"):
        try:
            sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
        except ImportError:
            pass


def load_robustbench(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                     model_dir: str = "models") -> Classifier:
    """Load RobustBench model ``name`` as a :class:`Classifier` taking [0,1] images.

    RobustBench models normalize inside themselves, so the wrapper's normalization is the identity.
    """
    _alias_autoattack()
    try:
        from robustbench.utils import load_model
    except ImportError as exc:
        raise BenchError(
            f"RobustBench models need the 'zoo' extra (pip install 'purifybench[zoo]'); import failed: {exc}"
        ) from None
    try:
        net = load_model(model_name=name, dataset=dataset, threat_model=threat_model, model_dir=model_dir)
    except Exception as exc:  # unknown name, no internet for the download, bad file
        raise BenchError(f"RobustBench model {name!r} ({dataset}, {threat_model}) could not be loaded: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    channels = 3
    return Classifier(net, (0.0,) * channels, (1.0,) * channels).eval()
