"""The distributable archive `<name>_v<version>.zip`, laid out as MONAI's download expects.

It unzips to `<name>/` (MONAI's bundle specification, "Archive Format"):

    <name>/LICENSE
    <name>/configs/metadata.json, *.yaml, logging.conf, methods/, presets/
    <name>/configs/train.json                   generated from train.yaml (see below)
    <name>/configs/inference.json               configs/inference_deploy.yaml with the model's
                                                settings: what consumers run, no `scripts.`
    <name>/models/model.pt, model.ts            weights; TorchScript exported from them now
    <name>/docs/...                             model card, data licence, notes
    <name>/scripts/**/*.py                      the bundle's Python package (data, model, method,
                                                workflows, stage2); developer tools (tools/: the
                                                benchmark, the experiments) are not shipped

`monai.bundle.load` builds `network_def` only from `configs/{workflow_type}.json` (".json" is
hard-coded there) and MONAI Label's bundle app reads `configs/inference.json` first, so JSON
configs are generated into the archive; the repository keeps YAML as the single source. The
inference one is the consumer config (MONAI components around models/model.ts, see
bundle/export.py), so MONAI Label, MONAI Deploy and `monai.bundle.load` need no `scripts`
on the path; the bundle's own inference stays `configs/inference.yaml`. Tests, packaging
code, developer tools, data and run outputs stay out.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

from . import BUNDLE_NAME, META_FILE, ROOT, export

logger = logging.getLogger(__name__)

TRAIN_JSON = "train"  # workflow type monai.bundle.load looks up by file name (inference: the consumer config)
_SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


def archive_name(meta: dict, name: str = BUNDLE_NAME) -> str:
    return f"{name}_v{meta['version']}.zip"


def _files(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or _SKIP_PARTS.intersection(path.parts) or path.name.startswith("."):
            continue
        if suffixes is None or path.name.endswith(suffixes):
            found.append(path)
    return found


def bundle_files(root: Path, model: Path) -> dict[str, Path]:
    """Archive-relative path -> source file."""
    files: dict[str, Path] = {}
    license_file = root / "LICENSE"
    if license_file.is_file():
        files["LICENSE"] = license_file
    else:
        logger.warning("no LICENSE at the bundle root: the archive has none (model-zoo bundles need one)")
    for path in _files(root / "configs", (".yaml", ".yml", ".json", ".conf")):
        files[path.relative_to(root).as_posix()] = path
    for path in _files(root / "scripts", (".py",)):
        files[path.relative_to(root).as_posix()] = path
    for path in _files(root / "docs"):
        files[path.relative_to(root).as_posix()] = path
    large_files = root / "large_files.yml"
    if large_files.is_file():
        files["large_files.yml"] = large_files
    files["models/model.pt"] = model
    return files


def json_config(yaml_file: Path) -> str:
    """A YAML workflow config as JSON text (MONAI's own loader, so the content is what MONAI reads)."""
    from monai.bundle import ConfigParser

    return json.dumps(ConfigParser.load_config_file(str(yaml_file)), indent=2) + "\n"


def build_archive(root: str | Path = ROOT, out_dir: str | Path | None = None, model: str | Path | None = None,
                  name: str = BUNDLE_NAME, **override) -> Path:
    """Write `<out_dir>/<name>_v<version>.zip` (default out_dir: <root>/dist) and return its path."""
    root = Path(root).resolve()
    meta = json.loads((root / META_FILE).read_text())
    model = Path(model) if model else root / "models" / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"no weights at {model}: the archive needs models/model.pt (train first, or pass --model)")
    files = bundle_files(root, model)
    settings = export.model_settings(root, model)
    generated = {  # written over any file of the same name
        "configs/inference.json": json.dumps(export.consumer_config(settings, root), indent=2) + "\n",
        "configs/metadata.json": json.dumps(export.consumer_metadata(settings, root), indent=4) + "\n",
    }
    if (root / "configs" / f"{TRAIN_JSON}.yaml").is_file():
        generated[f"configs/{TRAIN_JSON}.json"] = json_config(root / "configs" / f"{TRAIN_JSON}.yaml")
    out_dir = Path(out_dir) if out_dir else root / "dist"
    target = out_dir / archive_name(meta, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")  # renamed when complete: never a half archive
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # model.ts from the shipped weights, so the archive never pairs weights with an older export
            files["models/model.ts"] = export.export_torchscript(root, model, Path(tmp) / "model.ts", **override)
            with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for relative in sorted({*files, *generated}):
                    arcname = f"{name}/{relative}"
                    if relative in generated:
                        archive.writestr(arcname, generated[relative])
                    else:
                        archive.write(files[relative], arcname)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %s (%d files)", target, len(files) + len(generated))
    return target

