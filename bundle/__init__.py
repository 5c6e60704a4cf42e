"""Packaging side of the bundle: the offline metadata schema and thin entry points.

    python -m bundle verify    # metadata schema, network in/out, workflow properties
    python -m bundle export    # models/model.pt -> self-contained models/model.ts, checked
    python -m bundle package   # dist/<name>_v<version>.zip for monai.bundle download/load

Each step calls MONAI's own implementation (`monai.bundle.verify_metadata`,
`verify_net_in_out`, `ckpt_export`, `ConfigWorkflow.check_properties`); this package only
supplies paths, the shipped schema (so nothing is downloaded) and the archive layout.
"""

from __future__ import annotations

from pathlib import Path

BUNDLE_NAME = "wss_cmer_brats"  # folder name of the distributed bundle (snake_case, model-zoo style)
ROOT = Path(__file__).resolve().parent.parent  # the repository root is the bundle root
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "meta_schema.json"
NET_ID = "network_def"
TRAIN_CONFIG = "configs/train.yaml"
INFER_CONFIG = "configs/inference.yaml"
DEPLOY_CONFIG = "configs/inference_deploy.yaml"  # what consumers run: MONAI components only
META_FILE = "configs/metadata.json"
