"""Synthetic multi-modal brain-tumour phantom: the bundle's embedded default dataset.

Real BraTS cannot be shipped, so each subject is simulated from physics, calibrated so
that its tumour contrasts and textures match real BraTS-space MRI in numbers
(`python -m scripts.data.phantom report --data DIR` measures them; docs/phantom.md holds the
report, the target bands and the sources):

- anatomy (anatomy.py): the MNI ICBM152 2009a tissue maps of the nilearn wheel in the
  BraTS field of view, a per-subject affine + elastic warp, age-related CSF widening;
- tumour (tumour.py): an irregular, sometimes multifocal core that pushes tissue aside;
  high grade = necrosis mixed with non-enhancing tumour inside an enhancing rim, low
  grade = non-enhancing tumour; cysts in some; oedema along white matter that fades
  into normal tissue beyond its label;
- confounders (confounders.py): white-matter hyperintensities, enhancing choroid plexus
  and surface vessels on T1c, CSF flow on FLAIR;
- physics (physics.py): per-subject field strength (1.5 / 3 T), relaxation times from
  published relaxometry, T1 / T1c as spin echo or MPRAGE, T2 turbo spin echo, FLAIR with a
  CSF-nulling inversion;
- image formation (render.py): multi-scale texture of T1 / T2 / PD per tissue, partial
  volume, slice thickness and in-plane blur, bias field, Rician noise, scanner scaling.

Images are int16 (like BraTS), labels uint8 with BraTS 2019 values 1 = necrotic /
non-enhancing core, 2 = oedema, 4 = enhancing tumour; RAS affine, MNI millimetres.
Everything is deterministic given (seed, subject index): subject i is the same whatever
the number of subjects generated.
"""

from scripts.data.phantom.anatomy import grid_affine, grid_shape
from scripts.data.phantom.generate import (generate_dataset, generate_subject, load_subject, subject_grades,
                                          subject_id, write_subject)
from scripts.data.phantom.render import MODALITY_FILES
from scripts.data.phantom.tumour import GRADES, LABEL_ENHANCING, LABEL_NECROTIC_CORE, LABEL_OEDEMA

__all__ = ["GRADES", "LABEL_ENHANCING", "LABEL_NECROTIC_CORE", "LABEL_OEDEMA", "MODALITY_FILES", "generate_dataset",
           "generate_subject", "grid_affine", "grid_shape", "load_subject", "subject_grades", "subject_id",
           "write_subject"]
