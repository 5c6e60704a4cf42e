"""The bundle's own Python package (MONAI convention: configs import it).

Submodules are imported lazily so that `$import scripts` in a config stays cheap and
`scripts.trainer`, `scripts.datasets`, ... resolve on first use.
"""

import importlib
import importlib.util


def __getattr__(name):
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'scripts' has no attribute {name!r}")
