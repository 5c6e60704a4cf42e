"""NIfTI header checks: what a reader would otherwise assume silently.

nibabel (and so MONAI's NibabelReader) reads a voxel size of 0 as 1 mm and a header without
orientation (qform_code and sform_code 0) with its fallback affine (x flipped: LAS). The first
rescales the brain against the training spacing (a 4 mm axis read as 1 mm is 4x too large
after resampling), so it is an error; the second keeps the voxel grid and writes the outputs
with the same affine, so it is a warning: left and right are only as right as that guess.
"""

from __future__ import annotations

import logging

import numpy as np

from scripts.data.subjects import NIFTI_SUFFIXES, DataError

logger = logging.getLogger(__name__)


def _raw_header(path: str):
    """The header as stored: nib.load repairs pixdim 0 to 1 before anyone can see it."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    for kind in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with ImageOpener(path) as handle:
                return kind.from_fileobj(handle, check=False)
        except Exception:  # the other NIfTI version, or not readable at all
            continue
    raise ValueError(f"{path}: no NIfTI header")


def check_nifti_header(path: str, subject: str, role: str, log: bool = True) -> list[str]:
    """Raise DataError for a voxel size of 0 (or not finite); return (and log) a warning
    for a header without orientation. Files that are not NIfTI, or that nibabel cannot read
    (the loader then names the problem), pass.

    Args:
        path: the image file.
        subject: the subject id, for the messages.
        role: the modality (or "seg", "4D image"), for the messages.
        log: also log the warning.
    """
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        return []
    try:
        header = _raw_header(path)
        pixdim = np.asarray(header["pixdim"], dtype=np.float64).reshape(-1)[1:4]
        qform, sform = int(header["qform_code"]), int(header["sform_code"])
    except Exception:  # unreadable: load_volume's reader raises the DataError naming the file
        return []
    bad = [axis for axis, size in enumerate(pixdim) if not np.isfinite(size) or size <= 0]
    if bad:  # MONAI's reader rescales even an sform to the (repaired, 1 mm) pixdim
        sizes = ", ".join(f"{s:g}" for s in pixdim)
        raise DataError(f"subject {subject}: {role} file {path} has voxel size {pixdim[bad[0]]:g} along axis {bad[0]} in "
                        f"its header (pixdim {sizes} mm); read as 1 mm, the brain would be "
                        f"rescaled against the training spacing. Fix: write the voxel size into the header (e.g. "
                        f"nibabel: img.header.set_zooms(...); then save), or re-export the scan from the scanner data.")
    if qform == 0 and sform == 0:
        message = (f"subject {subject}: {role} file {path} has no orientation in its header (qform_code and sform_code "
                   f"0): it is read with nibabel's fallback (voxel axes as LAS, x flipped) and the outputs are written "
                   f"with that affine. Check left and right in the outputs; fix the header (set the qform / sform from "
                   f"the scanner export) to be sure.")
        if log:
            logger.warning(message)
        return [message]
    return []
