import sys
import textwrap
import warnings

import pytest

from benchmark.errors import BenchError, UnknownNameError
from benchmark.registry import ATTACKS, DATASETS, DEFENSES, MODELS, Registry


def test_register_get_list_and_metadata():
    reg = Registry("widget", "purifybench.test-widgets-none")

    @reg.register("alpha", speed="fast")
    def alpha():
        return 1

    @reg.register()
    def beta():
        return 2

    assert reg.get("alpha") is alpha and reg.get("beta") is beta
    assert reg.names() == ["alpha", "beta"]
    assert reg.names("a*") == ["alpha"]
    assert reg.metadata("alpha") == {"speed": "fast"}
    assert "alpha" in reg and "gamma" not in reg
    assert len(reg) == 2


def test_unknown_name_lists_valid_names_and_closest_match():
    reg = Registry("widget", "purifybench.test-widgets-none")
    reg.add("resnet18", object())
    reg.add("wrn-28-10", object())
    with pytest.raises(UnknownNameError) as info:
        reg.get("resnet-18")
    msg = str(info.value)
    assert "unknown widget 'resnet-18'" in msg
    assert "did you mean 'resnet18'" in msg
    assert "resnet18, wrn-28-10" in msg
    assert "\n" not in msg and not msg.startswith('"')
    with pytest.raises(UnknownNameError, match="must be a string"):
        reg.get(3)


def test_duplicate_registration_is_an_error():
    reg = Registry("widget", "purifybench.test-widgets-none")
    reg.add("x", object())
    with pytest.raises(BenchError, match="registered twice"):
        reg.add("x", object())


def test_builtin_registries_are_populated():
    assert {"digits", "cifar10", "cifar10-jpeg", "svhn", "fashion-mnist", "imagefolder"} <= set(DATASETS.names())
    assert {"resnet18", "preact-resnet18", "wrn-28-10", "small-cnn"} <= set(MODELS.names())
    assert DEFENSES.names() is not None and ATTACKS.names() is not None


def _write_plugin(root, dist, module, group, body, entry_name):
    pkg = root / module
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry_name} = {module}:Thing\n")


def test_plugin_discovery_through_entry_points(tmp_path, monkeypatch):
    group = "purifybench.test-plugins"
    _write_plugin(tmp_path, "pb_plugin_ok", "pb_plugin_ok", group,
                  "class Thing:\n    kind = 'from-plugin'\n", "my-thing")
    _write_plugin(tmp_path, "pb_plugin_bad", "pb_plugin_bad", group,
                  "raise RuntimeError('boom in plugin')\n", "broken-thing")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("thing", group)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = reg.names()
    assert "my-thing" in names
    assert reg.get("my-thing").kind == "from-plugin"
    assert reg.entry("my-thing").source.startswith("plugin:")
    assert any("broken-thing" in str(w.message) and "boom in plugin" in str(w.message) for w in caught)
    with pytest.raises(UnknownNameError, match="plugin that failed to load.*boom in plugin"):
        reg.get("broken-thing")
    for mod in ("pb_plugin_ok", "pb_plugin_bad"):
        sys.modules.pop(mod, None)


def test_plugin_that_registers_itself_with_the_decorator(tmp_path, monkeypatch):
    group = "purifybench.test-plugins-2"
    reg = Registry("thing", group)
    monkeypatch.setitem(sys.modules, "pb_test_registry_holder", type(sys)("pb_test_registry_holder"))
    sys.modules["pb_test_registry_holder"].REG = reg
    _write_plugin(tmp_path, "pb_plugin_deco", "pb_plugin_deco", group, """
        from pb_test_registry_holder import REG

        @REG.register("decorated-name", paper="X 2024")
        class Thing:
            pass
        """, "ep-name")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reg.names() == ["decorated-name"]
    assert reg.metadata("decorated-name") == {"paper": "X 2024"}
    sys.modules.pop("pb_plugin_deco", None)
