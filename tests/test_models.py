import pytest
import torch
from purifybench_testing import SHARED_CIFAR

from benchmark.errors import BenchError
from benchmark.models import Classifier, create_model
from benchmark.registry import MODELS


@pytest.mark.parametrize("arch", ["resnet18", "preact-resnet18", "small-cnn", "wrn-16-4"])
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32), (3, 28), (1, 16)])
def test_shapes_on_several_input_sizes(arch, channels, size):
    model = create_model(arch, num_classes=7, in_channels=channels).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.features(x).dim() == 2


def test_wrn_28_10_builds_with_the_expected_size():
    model = create_model("wrn-28-10", num_classes=10).eval()
    assert 36_000_000 < sum(p.numel() for p in model.parameters()) < 37_000_000
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_resnet18_has_the_cifar_stem_and_parameter_count():
    model = create_model("resnet18")
    net = model.net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) == 11_173_962


def test_normalization_lives_inside_the_wrapper():
    torch.manual_seed(0)
    net = create_model("small-cnn", in_channels=3).net.eval()
    model = Classifier(net, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    x = torch.rand(4, 3, 16, 16)
    manual = net((x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(model(x), manual, atol=1e-6)


def test_model_errors():
    with pytest.raises(BenchError, match="unknown model 'resnet19'.*did you mean 'resnet18'"):
        create_model("resnet19")
    with pytest.raises(BenchError, match="one per channel"):
        create_model("resnet18", in_channels=3, mean=(0.5,), std=(0.5,))
    with pytest.raises(BenchError, match="bad options"):
        create_model("resnet18", depth=50)
    assert "wrn-28-10" in MODELS.names("wrn*")


@pytest.mark.skipif(not (SHARED_CIFAR / "test.tar.xz").is_file(), reason="offline CIFAR-10 JPEG copy not present")
def test_pyautoattack_pretrained_resnet18_classifies_cifar():
    from benchmark.checkpoint import load_pretrained
    from benchmark.data import load_dataset

    model, card = load_pretrained("autoattack-resnet18-natural")
    data = load_dataset("cifar10-jpeg", "test", root=str(SHARED_CIFAR), n=200, seed=0)
    with torch.no_grad():
        acc = float((model(data.as_float()).argmax(1) == data.labels).float().mean())
    assert acc > 0.75  # measured 85.6% on 500 images of the JPEG copy
    assert card["method"] == "natural" and card["arch"] == "resnet18"
