"""A MONAI Deploy App SDK application around the bundle's models/model.ts (run by
tests/test_consumers.py inside its MONAI Deploy virtual environment, never imported by the suite).

    python deploy_app.py FILES_JSON OUT_NPY     (HOLOSCAN_MODEL_PATH=.../models/model.ts)

FILES_JSON maps t1, t1c, t2, flair to one subject's NIfTI files. `LoadModalities` stacks them
as the four channels of one image (channel last, the first file's geometry: what LoadImage
gives for a 4D NIfTI); MONAI's `MonaiBundleInferenceOperator` runs the bundle from the
TorchScript file alone (its embedded inference.json and metadata.json); `SaveMask` writes the
mask it returns as (X, Y, Z) uint8 .npy with the affine beside it.
"""

import json
import sys

import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from monai.transforms import LoadImage

MODALITIES = ("t1", "t1c", "t2", "flair")


class LoadModalities(Operator):
    """Emit one subject's four modality files as one channel-last `Image`.

    Args:
        fragment: the application.
        files: {modality: NIfTI path} for t1, t1c, t2, flair.
    """

    def __init__(self, fragment, *args, files: dict, **kwargs):
        self.files = files
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        volumes = [LoadImage(image_only=True)(self.files[m]) for m in MODALITIES]
        meta = dict(volumes[0].meta)
        meta["original_channel_dim"] = -1  # channels last, as LoadImage reports a 4D NIfTI
        array = np.stack([np.asarray(v, dtype=np.float32) for v in volumes], axis=-1)
        op_output.emit(Image(array, metadata=meta), "image")


class SaveMask(Operator):
    """Write the received mask `Image` ((Z, Y, X) in the SDK's convention) as (X, Y, Z) .npy.

    Args:
        fragment: the application.
        out_file: target .npy path (the affine goes to <out_file>.affine.npy).
    """

    def __init__(self, fragment, *args, out_file: str, **kwargs):
        self.out_file = out_file
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("pred")

    def compute(self, op_input, op_output, context):
        image = op_input.receive("pred")
        np.save(self.out_file, np.swapaxes(image.asnumpy(), 0, 2))
        # The operator passes the preprocessed input's metadata on: "affine" is the model grid's,
        # "original_affine" the input file's, on which the mask lies (Invertd).
        affine = image.metadata().get("original_affine")
        np.save(self.out_file + ".affine.npy", np.asarray(affine, dtype=np.float64))


class BundleApp(Application):
    """Loader -> MonaiBundleInferenceOperator (the bundle, unchanged) -> mask writer.

    Args:
        files: {modality: NIfTI path}.
        out_file: where SaveMask writes the mask.
    """

    def __init__(self, *args, files: dict, out_file: str, **kwargs):
        self.files, self.out_file = files, out_file
        super().__init__(*args, **kwargs)

    def compose(self):
        app_context = Application.init_app_context({})  # the model path: HOLOSCAN_MODEL_PATH
        load = LoadModalities(self, CountCondition(self, 1), files=self.files, name="load")
        infer = MonaiBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="bundle",
        )
        save = SaveMask(self, out_file=self.out_file, name="save")
        self.add_flow(load, infer, {("image", "image")})
        self.add_flow(infer, save, {("pred", "pred")})


if __name__ == "__main__":
    BundleApp(files=json.loads(sys.argv[1]), out_file=sys.argv[2]).run()
