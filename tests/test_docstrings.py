"""Docstrings in MONAI's style for what the configs build.

Every `_target_` in configs/ that names something in scripts/ must document each of its
parameters in an `Args:` section (the class docstring or its `__init__`'s; self, *args and
**kwargs excepted), so a config's keys can be looked up where they are consumed. The
trainer's `_iteration` must say what it returns (engine.state.output, read by the handlers).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for pattern in ("configs/*.yaml", "configs/*/*.yaml", "configs/*.json", "configs/*/*.json")
                 for p in ROOT.glob(pattern))


def _targets(node, found: dict[str, set[str]], source: str) -> None:
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target.startswith("scripts."):
            found.setdefault(target, set()).add(source)
        for value in node.values():
            _targets(value, found, source)
    elif isinstance(node, list):
        for value in node:
            _targets(value, found, source)


def config_targets() -> dict[str, set[str]]:
    """`scripts.` target -> the config files that name it."""
    found: dict[str, set[str]] = {}
    for path in CONFIGS:
        _targets(ConfigParser.load_config_file(str(path)), found, str(path.relative_to(ROOT)))
    return found


def documented_args(doc: str) -> set[str]:
    """Parameter names with an entry in the `Args:` sections of a Google-style docstring."""
    names: set[str] = set()
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "Args:":
            continue
        indent = len(line) - len(line.lstrip())
        entry_indent = None
        for body in lines[i + 1:]:
            if not body.strip():
                continue
            depth = len(body) - len(body.lstrip())
            if depth <= indent:
                break
            entry_indent = depth if entry_indent is None else entry_indent
            match = re.match(r"\s*([\w*][\w*, ]*?)\s*(\([^)]*\))?:", body) if depth == entry_indent else None
            if match:
                names.update(n.strip().lstrip("*") for n in match.group(1).split(","))
    return names


def _docstring(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "__init__" in vars(obj):
        doc += "\n" + (inspect.getdoc(obj.__init__) or "")
    return doc


def _parameters(obj) -> list[str]:
    function = obj.__init__ if inspect.isclass(obj) else obj
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(function).parameters.values() if p.name != "self" and p.kind not in skip]


def _resolve(target: str):
    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_the_configs_build_things_from_scripts():
    targets = config_targets()
    assert "scripts.method.trainer.CMERTrainer" in targets and "scripts.model.networks.MultiModalCAM" in targets


@pytest.mark.parametrize("target", sorted(config_targets()))
def test_every_config_target_documents_every_parameter(target):
    obj = _resolve(target)
    doc = _docstring(obj)
    missing = [name for name in _parameters(obj) if name not in documented_args(doc)]
    assert not missing, (f"{target} (built by {sorted(config_targets()[target])}) has no `Args:` entry for "
                         f"{missing}: add one per parameter to its docstring")


def test_documented_args_reads_google_style():
    doc = "Summary.\n\nArgs:\n    a: one.\n        continued: not a name.\n    b (int): two.\n    c, d: both.\n\nReturns:\n    x: no."
    assert documented_args(doc) == {"a", "b", "c", "d"}


def test_the_trainer_iteration_says_what_it_returns():
    from scripts.method.trainer import CMERTrainer

    doc = inspect.getdoc(CMERTrainer._iteration) or ""
    assert {"engine", "batchdata"} <= documented_args(doc)
    assert "Returns:" in doc and "Keys.LOSS" in doc
