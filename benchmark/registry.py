"""One generic registry for defenses, attacks, architectures and datasets.

Modelled on timm's model registry: a decorator registers a name with metadata,
``get`` answers an unknown name with the valid names and the closest match,
``names`` lists (optionally with a glob pattern), and third-party packages add
entries through the entry-point groups ``purifybench.<kind>``::

    [project.entry-points."purifybench.defenses"]
    my-defense = "my_pkg.defense:MyDefense"

An entry point's object is registered under the entry point's name unless
importing it already registered it (through the decorator, under its own name).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from benchmark.errors import BenchError, UnknownNameError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "builtin"  # "builtin" or "plugin:<distribution or entry point value>"


class Registry:
    """A named collection of objects of one kind (e.g. ``"defense"``)."""

    def __init__(self, kind: str, group: str, builtins: Iterable[str] = ()) -> None:
        self.kind = kind
        self.group = group
        self._builtins = tuple(builtins)
        self._entries: dict[str, Entry] = {}
        self._builtins_loaded = False
        self._plugins_loaded = False
        self._plugin_errors: dict[str, str] = {}
        self._loading = ""

    # -- registration -----------------------------------------------------------------
    def register(self, name: str | None = None, **metadata: Any) -> Callable[[Any], Any]:
        """Decorator: ``@REGISTRY.register("name", key=value)`` registers the object."""

        def decorator(obj: Any) -> Any:
            self.add(name or getattr(obj, "__name__", None), obj, **metadata)
            return obj

        return decorator

    def add(self, name: str | None, obj: Any, **metadata: Any) -> None:
        if not name or not isinstance(name, str):
            raise BenchError(f"{self.kind} registry: a name must be a non-empty string, got {name!r}")
        if name in self._entries and self._entries[name].obj is not obj:
            raise BenchError(
                f"{self.kind} {name!r} is registered twice "
                f"({self._entries[name].source} and {self._loading or 'builtin'})"
            )
        self._entries[name] = Entry(name, obj, dict(metadata), self._loading or "builtin")

    # -- discovery --------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self._builtins:
                importlib.import_module(module)
        if not self._plugins_loaded:
            self._plugins_loaded = True
            self.load_plugins()

    def load_plugins(self) -> None:
        """Import every entry point of this registry's group; a broken plugin warns."""
        for ep in _entry_points(self.group):
            if ep.name in self._entries:
                continue
            self._loading = f"plugin:{ep.value}"
            try:
                obj = ep.load()
                already = any(e.obj is obj for e in self._entries.values())
                if not already:  # the module did not register it with the decorator
                    self.add(ep.name, obj)
            except Exception as exc:  # a third party's bug must not break the suite
                reason = f"{type(exc).__name__}: {exc}"
                self._plugin_errors[ep.name] = reason
                warnings.warn(
                    f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {reason}",
                    stacklevel=2,
                )
            finally:
                self._loading = ""

    # -- lookup -----------------------------------------------------------------------
    def names(self, pattern: str = "*") -> list[str]:
        self._ensure_loaded()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def entry(self, name: str) -> Entry:
        self._ensure_loaded()
        if not isinstance(name, str):
            raise UnknownNameError(
                f"{self.kind} name must be a string, got {type(name).__name__} {name!r}"
            )
        if name in self._entries:
            return self._entries[name]
        if name in self._plugin_errors:
            raise UnknownNameError(
                f"{self.kind} {name!r} is a plugin that failed to load: {self._plugin_errors[name]}"
            )
        raise UnknownNameError(self.unknown_message(name))

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def metadata(self, name: str) -> dict[str, Any]:
        return dict(self.entry(name).metadata)

    def unknown_message(self, name: str) -> str:
        valid = self.names()
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(valid) or '(none)'}"


def discover(package: str, path: Iterable[str], builtins: Iterable[str]) -> None:
    """Import every module of ``package`` (its folder ``path``): the built-in ones, then any other
    module saved there (a researcher's ``defenses/my_defense.py`` registers itself when imported).
    Modules whose names start with ``_`` are skipped. A built-in module that fails to import is an
    error; another module's failure is a warning naming its file, and the rest of the suite loads."""
    builtins = tuple(builtins)
    for name in builtins:
        importlib.import_module(f"{package}.{name}")
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if info.name in builtins or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except Exception as exc:  # a researcher's module must not break the suite
            where = Path(getattr(info.module_finder, "path", "")) / f"{info.name}.py"
            warnings.warn(f"{where} was not loaded: {type(exc).__name__}: {exc}", stacklevel=2)


def _entry_points(group: str) -> list[Any]:
    return list(importlib_metadata.entry_points(group=group))


DATASETS = Registry("dataset", "purifybench.datasets", ["benchmark.data.sources"])
MODELS = Registry("model", "purifybench.models", ["benchmark.models"])
DEFENSES = Registry("defense", "purifybench.defenses", ["defenses"])
ATTACKS = Registry("attack", "purifybench.attacks", ["attacks"])

REGISTRIES = {"datasets": DATASETS, "models": MODELS, "defenses": DEFENSES, "attacks": ATTACKS}
