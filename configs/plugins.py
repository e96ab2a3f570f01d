"""Stage plugin files named by a config's ``plugins:`` list: imported once by path, their config sections found.

A plugin is one Python file outside the project that defines a stage (a subclass of ``pipelines.engine.stages.Stage``,
see examples/stage_plugin/). Its config section is the stage's ``Params`` model under the stage's ``name``: the
config validates it like a built-in section (``--set <stage>.<key>=VALUE``, one-line errors naming the key). Nothing here
imports a project module: the plugin file imports what it needs itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

# (resolved path, file digest) -> module: a plugin is imported once per content (an edited file imports anew).
_modules: dict[tuple[str, str], ModuleType] = {}


class PluginError(ValueError):
    """A plugin file is missing, does not import, or defines no valid stage; the message is one line."""


def import_plugin(path: str) -> ModuleType:
    """Return the module of plugin file ``path`` (absolute), imported once per content of the file."""
    file = Path(path)
    if file.suffix != ".py" or not file.is_file():
        raise PluginError(f"{path}: expected a Python file (.py) defining a stage")
    key = (str(file), hashlib.sha256(file.read_bytes()).hexdigest())
    if key in _modules:
        return _modules[key]
    name = f"structxlip_plugin_{file.stem}_{key[1][:12]}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of a user's file is the same one-line error
        sys.modules.pop(name, None)
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise PluginError(f"{path}: the plugin failed to import ({text})") from None
    _modules[key] = module
    return module


def stage_classes(module: ModuleType) -> list[type]:
    """Return the stage classes a plugin module defines: classes of its own with a ``name`` and a ``Params`` model."""
    found = [value for value in vars(module).values()
             if isinstance(value, type) and value.__module__ == module.__name__
             and isinstance(getattr(value, "name", None), str)
             and isinstance(getattr(value, "Params", None), type) and issubclass(value.Params, BaseModel)]
    if not found:
        raise PluginError(f"{module.__file__}: defines no stage (expected a Stage subclass with a name and a Params "
                          "model)")
    return found


def plugin_sections(paths: list[str]) -> dict[str, type[BaseModel]]:
    """Return ``{section name: Params model}`` of the stages the plugin files define, in file order."""
    sections: dict[str, type[BaseModel]] = {}
    for path in paths:
        for stage in stage_classes(import_plugin(path)):
            if stage.name in sections:
                raise PluginError(f"{path}: stage {stage.name!r} is defined twice among the plugins")
            sections[stage.name] = stage.Params
    return sections
