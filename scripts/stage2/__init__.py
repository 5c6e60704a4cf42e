"""Stage 2: a segmentation network trained on the CAM pseudo-masks, its inference and report."""

from scripts._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
