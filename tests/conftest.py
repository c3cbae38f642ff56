import os
from pathlib import Path

import pytest
import torch

# Keep caches written by tests out of the user's home.
os.environ.setdefault("PURIFYBENCH_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "purifybench"))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# Modules a discovery test saves in defenses/ (tests/test_readme_example.py) are removed in its own
# finally; one left by a killed test run would be found by every later run: gone before anything imports.
STRAY = "pbtest_"
for _stray in (Path(__file__).resolve().parent.parent / "defenses").glob(f"{STRAY}*.py"):
    _stray.unlink(missing_ok=True)



@pytest.fixture(scope="session")
def digits_train():
    from benchmark.data import load_dataset

    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    from benchmark.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def trained_pair(digits_train, digits_test):
    """A naturally trained and a PGD-trained small CNN on digits (shared by several tests)."""
    from benchmark.models import create_model
    from benchmark.training import TrainConfig, train_classifier

    out = {}
    for method in ("natural", "at"):
        torch.manual_seed(0)
        model = create_model("small-cnn", in_channels=1, mean=digits_train.mean, std=digits_train.std)
        cfg = TrainConfig(method=method, epochs=6, batch_size=64, lr=0.05, eps=0.1, step_size=0.025,
                          augment=False, progress=False, eval_n=200, eval_pgd_steps=10)
        result = train_classifier(model, digits_train, cfg, torch.device("cpu"), eval_data=digits_test)
        out[method] = (model.eval(), result)
    return out
