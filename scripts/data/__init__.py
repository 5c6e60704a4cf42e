"""Data stage: subjects and datalists, volumes and their cache, slice datasets, the phantom."""

from scripts._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
