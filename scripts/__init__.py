"""The bundle's own Python package (MONAI convention: configs import it), laid out by stage.

    common, runtime, precision   process-wide pieces (modality names, atomic writes, checks, numerics)
    data/       subjects, datalists, volumes + cache, slice datasets, the phantom
    model/      CAM networks and the one set of CAM primitives
    method/     equivariance, losses, the K-network trainer, schedules, distributed training
    workflows/  map engine, validation, evaluation, inference, checkpoints, reports, writers
    stage2/     the segmentation network trained on the CAM pseudo-masks

Submodules are imported lazily so that `$import scripts` in a config stays cheap and
`scripts.method.trainer`, `scripts.data.slices`, ... resolve on first use.
"""

from scripts._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
