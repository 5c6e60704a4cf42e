"""Lazy submodule access for the bundle's packages.

Configs say `$import scripts` and then name `scripts.data.slices.SliceDataset`; importing every
module up front would pull in matplotlib, nibabel, ... for a config that needs none of them.
"""

import importlib
import importlib.util


def lazy_submodules(package: str):
    """A module-level `__getattr__` for `package` that imports a submodule on first access."""

    def __getattr__(name):
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
