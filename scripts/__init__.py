"""The bundle's own Python package (MONAI convention: configs import it).

Submodules are imported lazily so that `$import scripts` in a config stays cheap and
`scripts.trainer`, `scripts.datasets`, ... resolve on first use.
"""

import importlib

__all__ = [
    "common", "phantom", "datasets", "networks", "equivariance", "losses",
    "trainer", "handlers", "maps", "evaluation", "figures", "inference", "workflow",
]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'scripts' has no attribute {name!r}")
