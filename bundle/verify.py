"""Bundle checks, each one MONAI's own function with this bundle's paths.

- `verify_metadata`: `monai.bundle.verify_metadata` against the shipped schema
  (bundle/schema/meta_schema.json: the file exists, so MONAI downloads nothing), plus the
  few rules a JSON schema cannot state (`consistency_problems`).
- `verify_net`: `monai.bundle.verify_net_in_out` on `network_def` of inference.yaml.
- `missing_properties`: `ConfigWorkflow(...).check_properties()` for a train or infer workflow
  (what MONAI Label and other bundle tools rely on). It instantiates the workflow, so the
  train check builds the training dataset (the phantom is generated when dataset_dir is empty).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from . import INFER_CONFIG, META_FILE, NET_ID, ROOT, SCHEMA_PATH


def _paths(root, names) -> list[str]:
    names = [names] if isinstance(names, (str, Path)) else list(names)
    return [str(Path(root) / n) for n in names]


LABEL_FORMATS = ("segmentation", "labels")  # one channel whose values the channel_def names


def consistency_problems(meta: dict) -> list[str]:
    """Rules beyond the schema: the changelog names the version, channel_def matches num_channels
    (one entry per channel; a one-channel label of format "segmentation" names its values instead,
    as MONAI Label reads it: {"0": "background", "1": ...})."""
    problems = []
    if meta.get("version") not in meta.get("changelog", {}):
        problems.append(f"changelog has no entry for version {meta.get('version')!r}")
    for side in ("inputs", "outputs"):
        for key, spec in meta.get("network_data_format", {}).get(side, {}).items():
            channels = spec.get("channel_def", {})
            label_values = spec.get("format") in LABEL_FORMATS and spec.get("num_channels") == 1 and len(channels) >= 2
            if len(channels) != spec.get("num_channels") and not label_values:
                problems.append(f"{side}#{key}: {len(channels)} channel_def entries for num_channels {spec.get('num_channels')}")
            if sorted(int(k) for k in channels) != list(range(len(channels))):
                problems.append(f"{side}#{key}: channel_def keys must be 0..{len(channels) - 1}")
    return problems


def version_differences(meta: dict) -> list[str]:
    """Where the installed monai / torch / numpy / required packages differ from the metadata."""
    from importlib import metadata as importlib_metadata

    wanted = {"monai": meta.get("monai_version"), "torch": meta.get("pytorch_version"),
              "numpy": meta.get("numpy_version"), **meta.get("required_packages_version", {})}
    differences = []
    for package, version in wanted.items():
        try:
            installed = importlib_metadata.version(package).split("+")[0]
        except importlib_metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differences.append(f"{package}: metadata {version}, installed {installed}")
    return differences


def verify_metadata(root: str | Path = ROOT, meta_file: str = META_FILE, schema: str | Path = SCHEMA_PATH) -> dict:
    """Validate metadata.json with MONAI's verify_metadata and the offline schema; return the metadata."""
    from monai.bundle import verify_metadata as monai_verify_metadata

    schema = Path(schema)
    if not schema.is_file():  # MONAI would try to download the schema named in the metadata
        raise FileNotFoundError(f"schema {schema} not found: it ships in bundle/schema/")
    meta_path = Path(root) / meta_file
    monai_verify_metadata(meta_file=str(meta_path), filepath=str(schema))
    meta = json.loads(meta_path.read_text())
    problems = consistency_problems(meta)
    if problems:
        raise ValueError(f"{meta_path}: " + "; ".join(problems))
    return meta


def verify_net(root: str | Path = ROOT, config_file: str | Sequence[str] = INFER_CONFIG, meta_file: str = META_FILE,
               size: int = 64, device: str = "cpu", **override) -> None:
    """MONAI's verify_net_in_out: random (1, C, size, size) input, checks output channels and dtype."""
    from monai.bundle import verify_net_in_out

    with bundle_on_path(root):
        verify_net_in_out(net_id=NET_ID, meta_file=str(Path(root) / meta_file), config_file=_paths(root, config_file),
                          device=device, any=size, **override)


def missing_properties(workflow_type: str, config_file: str | Sequence[str], root: str | Path = ROOT,
                       meta_file: str = META_FILE, **override) -> list[str]:
    """Names of required (or wrongly referenced optional) properties the workflow lacks; [] when complete."""
    from monai.bundle import ConfigWorkflow

    with bundle_on_path(root):
        workflow = ConfigWorkflow(config_file=_paths(root, config_file), meta_file=str(Path(root) / meta_file),
                                  logging_file=False, workflow_type=workflow_type, **override)
        workflow.initialize()
        missing = workflow.check_properties()
    return list(missing or [])


class bundle_on_path:
    """Put the bundle root first on sys.path (as ConfigWorkflow.run does) so `scripts` imports."""

    def __init__(self, root: str | Path):
        self.root = str(Path(root).resolve())
        self.added = False

    def __enter__(self):
        if self.root not in sys.path:
            sys.path.insert(0, self.root)
            self.added = True
        return self

    def __exit__(self, *exc) -> None:
        if self.added and self.root in sys.path:
            sys.path.remove(self.root)
