"""The method's training: the transform family, the loss terms, the K-network trainer, schedules, DDP."""

from scripts._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
