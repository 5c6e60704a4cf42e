"""The bundle as MONAI sees it: metadata verified offline, network in/out, TorchScript export,
the distributable archive (MONAI download + load), and the workflow properties of
train.yaml and inference.yaml."""

import copy
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle import BUNDLE_NAME, SCHEMA_PATH, export, package, verify
from bundle.__main__ import main as bundle_cli

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
META = json.loads((ROOT / "configs" / "metadata.json").read_text())
# tiny phantom settings for the workflows that build their datasets
TINY = {"phantom#subjects": 6, "phantom#spacing": 6.0, "split": [2, 2, 2], "spatial_size": [32, 32], "base_channels": 4}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A state dict of inference.yaml's network_def (random weights, the shipped architecture)."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _no_download(monkeypatch):
    import monai.apps.utils

    def refuse(*args, **kwargs):
        raise AssertionError("verification tried to download something")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", refuse)


# --------------------------------------------------------------------------- metadata


def test_metadata_verifies_offline_with_the_shipped_schema(monkeypatch):
    _no_download(monkeypatch)
    assert SCHEMA_PATH.is_file()
    meta = verify.verify_metadata(ROOT)
    assert meta["version"] in meta["changelog"]


def test_metadata_versions_are_the_installed_ones():
    assert verify.version_differences(META) == []


def test_metadata_describes_the_network_of_the_configs():
    from scripts.model.networks import DEFAULT_SETTINGS, ModelSettings

    # inference.yaml reads the network from the checkpoint (null here); its architecture defaults
    # for tools without a checkpoint are training's
    assert ConfigParser.load_config_file(str(ROOT / "configs" / "inference.yaml"))["modalities"] is None
    modalities = ConfigParser.load_config_file(str(ROOT / "configs" / "train.yaml"))["modalities"]
    assert modalities == DEFAULT_SETTINGS.modalities
    # every default a checkpoint-less tool uses is training's default (a drift here made the
    # archive's train workflow build a top-k net around gap-recorded weights)
    train = ConfigParser()
    train.read_config(str(ROOT / "configs" / "train.yaml"))
    for name, default in DEFAULT_SETTINGS.as_dict().items():
        assert ModelSettings.from_dict({name: train.get_parsed_content(name)}).as_dict()[name] == default, name
    names = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}
    image = META["network_data_format"]["inputs"]["image"]
    pred = META["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == len(modalities)
    for index, modality in enumerate(modalities):
        assert image["channel_def"][str(index)].split(" ")[0] == names[modality]
    # consumers' output: the fused map as a one-channel whole-tumour label (MONAI Label's labels)
    assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": "background", "1": "whole tumour"}
    assert pred["value_range"] == [0, 1] and pred["dtype"] == image["dtype"] == "float32"
    assert BUNDLE_NAME in META["description"]
    if not (ROOT / "docs" / "results.md").is_file():  # no numbers may be claimed before results exist
        assert "PENDING" in json.dumps(META["eval_metrics"])


@pytest.mark.parametrize("damage", ["drop_network_data_format", "drop_channel_def", "bad_dtype", "bad_version",
                                    "version_not_in_changelog", "channel_count"])
def test_broken_metadata_is_rejected(damage, tmp_path, monkeypatch):
    _no_download(monkeypatch)
    meta = copy.deepcopy(META)
    image = meta["network_data_format"]["inputs"]["image"]
    if damage == "drop_network_data_format":
        del meta["network_data_format"]
    elif damage == "drop_channel_def":
        del image["channel_def"]
    elif damage == "bad_dtype":
        image["dtype"] = "float"
    elif damage == "bad_version":
        meta["version"] = "first"
    elif damage == "version_not_in_changelog":
        meta["version"] = "9.9.9"
    elif damage == "channel_count":
        image["num_channels"] = 3
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        verify.verify_metadata(tmp_path)


# --------------------------------------------------------------------------- network + export


def test_network_in_out_matches_metadata():
    verify.verify_net(ROOT, size=32)


def test_export_command_writes_torchscript_equal_to_eager(weights, tmp_path, capsys):
    from monai.data import load_net_with_metadata

    ts_file = tmp_path / "model.ts"
    assert bundle_cli(["export", "--ckpt", str(weights), "--out", str(ts_file)]) == 0
    assert "torch.jit.load reproduces the eager network" in capsys.readouterr().out
    _, meta, extra = load_net_with_metadata(str(ts_file), more_extra_files=("inference.json",))
    assert meta["version"] == META["version"] and "inference.json" in extra
    # the comparison itself, here too: random slices, gated maps as shipped
    eager = export.eager_network(ROOT, weights)
    inputs = torch.randn(3, 4, 48, 40, generator=torch.Generator().manual_seed(1))
    assert export.max_export_difference(ts_file, eager, inputs) <= 1e-5


def test_export_without_gate_reproduces_non_trivial_maps(weights, tmp_path):
    """A config override reaches the export; the maps compared are not all empty."""
    ts_file = export.export_torchscript(ROOT, weights, tmp_path / "model.ts", gate=False)
    eager = export.eager_network(ROOT, weights, gate=False)
    inputs = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (eager(inputs).amax(dim=(2, 3)) > 0).any(dim=1).all()  # every sample has a non-empty map
    assert export.max_export_difference(ts_file, eager, inputs) <= 1e-5


# --------------------------------------------------------------------------- archive + MONAI load

LOAD_SCRIPT = r"""
import json, sys, torch
import scripts
from monai.bundle import load
name, bundle_dir, weights = sys.argv[1:4]
report = {"scripts_from": scripts.__file__}
for workflow_type in ("inference", "train"):
    net = load(name=name, bundle_dir=bundle_dir, workflow_type=workflow_type, device="cpu")
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 4, 40, 40))
    expected = torch.load(weights, weights_only=True)
    same = all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    report[workflow_type] = {"type": type(net).__name__, "shape": list(out.shape), "dtype": str(out.dtype),
                             "same_weights": same and set(net.state_dict()) <= set(expected)}
print("REPORT " + json.dumps(report))
"""


def test_archive_downloads_and_loads_with_monai(weights, tmp_path):
    from monai.bundle import download

    archive = package.build_archive(ROOT, tmp_path / "dist", weights)
    assert archive.name == f"{BUNDLE_NAME}_v{META['version']}.zip"
    names = zipfile.ZipFile(archive).namelist()
    assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names)
    for required in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/train.yaml",
                     "configs/inference.yaml", "configs/inference_deploy.yaml", "configs/logging.conf",
                     "models/model.pt", "models/model.ts", "scripts/model/networks.py", "docs/README.md"):
        assert f"{BUNDLE_NAME}/{required}" in names, required
    assert (f"{BUNDLE_NAME}/LICENSE" in names) == (ROOT / "LICENSE").is_file()
    assert not any(n.split("/")[1] in ("tests", "bundle", "data", "runs") or "__pycache__" in n for n in names)
    generated = json.loads(zipfile.ZipFile(archive).read(f"{BUNDLE_NAME}/configs/inference.json"))
    assert generated == export.consumer_config(export.model_settings(ROOT, weights), ROOT)  # the consumers' config

    bundles = tmp_path / "bundles"
    download(name=BUNDLE_NAME, url=archive.resolve().as_uri(), bundle_dir=str(bundles), progress=False)
    bundle_root = bundles / BUNDLE_NAME
    assert (bundle_root / "configs" / "metadata.json").is_file()

    # a fresh interpreter outside the repository: `scripts` must come from the bundle (model-zoo PYTHONPATH;
    # the train workflow needs it, the inference one is TorchScript: tests/test_consumers.py loads it without)
    env = {**os.environ, "PYTHONPATH": str(bundle_root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, BUNDLE_NAME, str(bundles), str(weights)],
                            cwd=bundle_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert Path(report["scripts_from"]).resolve().is_relative_to(bundle_root.resolve())
    assert report["inference"] == {"type": "RecursiveScriptModule", "shape": [2, 1, 40, 40], "dtype": "torch.float32",
                                   "same_weights": True}  # models/model.ts: the fused map
    assert report["train"] == {"type": "MultiModalCAM", "shape": [2, 4, 40, 40], "dtype": "torch.float32",
                               "same_weights": True}


def test_archive_ships_no_developer_tools(tmp_path):
    """The benchmark and the experiments live in tools/ (not packaged); nothing shipped imports them."""
    files = package.bundle_files(ROOT, tmp_path / "model.pt")
    assert any(name.startswith("scripts/") for name in files)
    for name in files:
        assert not name.startswith("tools/"), name
        assert not any(word in Path(name).stem for word in ("benchmark", "experiments")), name
    for name, source in files.items():
        if name.endswith(".py"):
            text = source.read_text()
            assert not re.search(r"^\s*(from|import) tools\b", text, re.MULTILINE), f"{name} imports tools"
    for name in ("configs/train.yaml", "configs/evaluate.yaml", "configs/inference.yaml"):
        assert "tools." not in (ROOT / name).read_text(), f"{name} names a developer tool"


def test_archive_needs_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        package.build_archive(ROOT, tmp_path, tmp_path / "missing.pt")


# --------------------------------------------------------------------------- workflow properties


def test_train_and_infer_workflows_have_every_property(tmp_path):
    """MONAI's check_properties (what MONAI Label relies on) finds nothing missing."""
    from monai.utils import set_determinism

    try:
        missing = verify.missing_properties("train", ["configs/train.yaml", "configs/presets/phantom_quick.yaml"],
                                            ROOT, bundle_root=str(tmp_path), **TINY)
        assert missing == []
        dataset_dir = tmp_path / "data" / "phantom_quick"  # the phantom the train workflow generated
        missing = verify.missing_properties("infer", ["configs/inference.yaml"], ROOT, dataset_dir=str(dataset_dir))
        assert missing == []
    finally:
        set_determinism(seed=None)


def test_verify_command_checks_metadata_and_network(capsys):
    assert bundle_cli(["verify", "--only", "metadata", "net"]) == 0
    out = capsys.readouterr().out
    assert "metadata: valid" in out and "network in/out: matches" in out


def test_verify_command_reports_failures(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    assert bundle_cli(["--root", str(tmp_path), "verify", "--only", "metadata"]) == 1
    assert "verify failed" in capsys.readouterr().err


# --------------------------------------------------------------------------- model card


def test_model_card_names_the_bundle_and_its_commands():
    card = (ROOT / "docs" / "README.md").read_text()
    assert BUNDLE_NAME in card
    for command in ("python -m monai.bundle run training", "configs/multi_gpu_train.yaml", "torchrun",
                    "python -m bundle verify", "python -m bundle export", "python -m bundle package",
                    "monailabel start_server", "--tracking configs/mlflow.yaml", "configs/evaluate.yaml",
                    "configs/inference.yaml"):
        assert command in card, command
    if not (ROOT / "docs" / "results.md").is_file():
        assert "pending" in card.lower()
