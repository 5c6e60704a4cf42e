"""Workflows around the model: the map engine, validation, evaluation, inference, checkpoints, reports."""

from scripts._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
