"""Model: the CAM networks and the one set of CAM primitives (normalise, probability, gate, fuse, GradCAM++, TTA)."""

from scripts._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
