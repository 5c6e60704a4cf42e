"""The packaged bundle as its consumers run it, unchanged: MONAI Deploy, MONAI Label, monai.bundle.

Fast (CI): the consumer config holds MONAI components only; the exported model.ts carries it
and the metadata; the unzipped package loads with `monai.bundle.load` and passes
`check_properties()` in a fresh interpreter without `scripts` on its path and without data;
the consumer pipeline (preprocessing, SliceInferer over model.ts, postprocessing) gives the
bundle's own inference mask, voxel for voxel, on a non-RAS grid at another spacing.

Marked `consumers` and `slow`: the real applications, each in its own virtual environment
(tests/consumer_envs.py: built on first use, then cached), on one phantom subject:
MONAI Deploy App SDK 4.0.0 (an app around MonaiBundleInferenceOperator) and MONAI Label 0.8.5
(the monaibundle app on 127.0.0.1, POST /infer). Both masks must equal the bundle's own. They
run only when selected (tests/conftest.py skips them otherwise, so a plain
`pytest tests/test_consumers.py` builds nothing); fast tests check that selection, the
recipes (nibabel for Deploy, itk and nibabel for Label, torch only as a constraint) and that a
consumer venv imports the running interpreter's torch.

    python -m pytest -q -m consumers tests/test_consumers.py
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle import BUNDLE_NAME, DEPLOY_CONFIG, export, package
from scripts.model.networks import MultiModalCAM

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("t1", "t1c", "t2", "flair")
FILE_TOKENS = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
SPACING, SPATIAL_SIZE = 3.0, [80, 80]  # the phantom's training geometry, recorded in the weights
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("PYTHONPATH", None)  # consumers get no path tricks


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    else:
        yield str(node)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Seeded weights (base 4) with the phantom geometry recorded. Each network's tumour map is
    the difference of two of its feature maps, healthy logit 0: on the phantom the mask covers
    about a fifth of the brain, one network keeps every slice, one about two thirds (the gate
    decides per slice), two none."""
    torch.manual_seed(3)
    net = MultiModalCAM(list(MODALITIES), base_channels=4, spacing=SPACING, spatial_size=SPATIAL_SIZE,
                        normalization="volume", slice_normalization="none")
    with torch.no_grad():
        for modality_net, (plus, minus) in zip(net.nets, [(1, 2), (0, 1), (1, 2), (3, 0)]):
            weight = modality_net.classifier.weight  # (2, 4, 1, 1): healthy, tumour
            weight.zero_()
            weight[1, plus], weight[1, minus] = 1.0, -1.0
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def bundle_dir(weights, tmp_path_factory) -> Path:
    """The distributable archive, unzipped as `monai.bundle download` would."""
    out = tmp_path_factory.mktemp("package")
    # max fusion: two of these seeded networks gate every slice out, so a mean of four maps stays
    # under 0.5 and the mask would be empty; the consumers must reproduce whichever read-out ships
    archive = package.build_archive(ROOT, out / "dist", weights, fusion="max")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(out / "bundles")
    return out / "bundles" / BUNDLE_NAME


def write_subject(folder: Path, name: str, shape=(50, 44, 20), spacing=(2.5, 3.5, 4.0), permuted=True) -> dict:
    """Four modality files of a small synthetic head: a bright 'lesion' in some modalities."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    affine = np.diag([*spacing, 1.0])
    if permuted:  # i -> posterior, j -> superior, k -> left (axis codes PSL)
        affine = np.array([[0, 0, -spacing[2], 40.0], [-spacing[0], 0, 0, 60.0], [0, spacing[1], 0, -30.0], [0, 0, 0, 1]])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    head = (grid ** 2).sum(0) < 0.8
    lesion = ((grid - np.array([0.3, -0.2, 0.1])[:, None, None, None]) ** 2).sum(0) < 0.08
    files = {}
    for k, modality in enumerate(MODALITIES):
        volume = np.where(head, 100 + 10 * k + rng.normal(0, 5, shape), 0.0)
        volume[lesion] += 60 * (k % 2 + 1)
        files[modality] = str(folder / f"{name}_{FILE_TOKENS[modality]}.nii.gz")
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), files[modality])
    return files


def own_mask(files: dict, weights: Path, out: Path) -> nib.Nifti1Image:
    """The bundle's own inference (configs/inference.yaml) in float32, its mask NIfTI."""
    wf = ConfigWorkflow(config_file=str(ROOT / "configs" / "inference.yaml"), meta_file=str(ROOT / "configs" / "metadata.json"),
                        workflow_type="infer", bundle_root=str(ROOT), files=dict(files), subject="case",
                        output_dir=str(out), ckpt_path=str(weights), precision="fp32", channels_last=False,
                        device="$torch.device('cpu')", fusion="max")  # as bundle_dir's export
    wf.initialize()
    wf.run()
    wf.finalize()
    return nib.load(out / "case" / "case_mask.nii.gz")


def four_channel_image(files: dict, target: Path) -> Path:
    """The four modality files as one 4D NIfTI (channels t1, t1c, t2, flair): MONAI Label's input."""
    volumes = [nib.load(files[m]) for m in MODALITIES]
    data = np.stack([np.asarray(v.dataobj, dtype=np.float32) for v in volumes], axis=-1)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, volumes[0].affine), target)
    return target


def assert_same_mask(mask: np.ndarray, affine: np.ndarray, own: nib.Nifti1Image, report: str) -> None:
    reference = np.asarray(own.dataobj)
    assert mask.shape == reference.shape, (mask.shape, reference.shape)
    np.testing.assert_allclose(affine, own.affine, atol=1e-4)
    differing = int((np.asarray(mask) > 0.5).astype(np.uint8).__ne__(reference).sum())
    print(f"{report}: {differing} of {reference.size} voxels differ from the bundle's own mask "
          f"({int(reference.sum())} tumour voxels)")
    assert 0 < reference.sum() < reference.size  # neither empty nor everything
    assert differing == 0


# --------------------------------------------------------------------------- fast (CI)


def test_consumer_config_holds_monai_components_only():
    config = ConfigParser.load_config_file(str(ROOT / DEPLOY_CONFIG))
    assert not [s for s in _strings(config) if "scripts" in s]
    targets = [s for key, s in _walk_targets(config)]
    from monai.bundle.config_item import ComponentLocator

    locator = ComponentLocator()
    for target in targets:
        component = locator.get_component_module_name(target)
        assert component is not None and all(m.startswith("monai.") for m in np.atleast_1d(component)), target
    for section in ("preprocessing", "postprocessing"):
        names = [t["_target_"] for t in config[section]["transforms"]]
        assert all(not any(ch in n for ch in "$@.") for n in names), names  # MONAI transform names, nothing else
    for key in ("bundle_root", "device", "dataset_dir", "dataset", "evaluator", "network_def", "inferer"):
        assert key in config, key


def _walk_targets(node, path=""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node["_target_"]
        for key, value in node.items():
            yield from _walk_targets(value, f"{path}#{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk_targets(value, f"{path}#{index}")


def test_exported_model_carries_the_consumer_config_and_metadata(bundle_dir):
    from monai.data import load_net_with_metadata

    ts_file = bundle_dir / "models" / "model.ts"
    net, meta, extra = load_net_with_metadata(str(ts_file), more_extra_files=("inference.json",))
    config = json.loads(extra["inference.json"])
    assert "scripts" not in extra["inference.json"].decode() and "scripts." not in json.dumps(meta)
    assert config == json.loads((bundle_dir / "configs" / "inference.json").read_text())
    assert config["spacing"] == [SPACING] * 3 and config["spatial_size"] == SPATIAL_SIZE
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert list(meta["network_data_format"]["outputs"]) == ["pred"]
    assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": "background", "1": "whole tumour"}
    x = torch.randn(2, 4, 40, 40)
    x[1] = 0  # a slice without brain: empty map
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 1, 40, 40) and float(out[1].abs().max()) == 0.0 and 0 <= float(out.min()) <= float(out.max()) <= 1
    eager = export.eager_network(ROOT, bundle_dir / "models" / "model.pt", fusion="max")  # as bundle_dir's
    assert export.max_export_difference(ts_file, eager, torch.randn(3, 4, 48, 40)) <= 1e-5


LOAD_SCRIPT = r"""
import json, sys, torch
from monai.bundle import ConfigWorkflow, load
net = load(name=sys.argv[1], bundle_dir=sys.argv[2], workflow_type="inference", device="cpu")
with torch.no_grad():
    shape = list(net(torch.randn(2, 4, 40, 40)).shape)
workflow = ConfigWorkflow(config_file="configs/inference.json", workflow_type="infer", logging_file=False)
workflow.initialize()
print("REPORT " + json.dumps({"shape": shape, "type": type(net).__name__, "missing": workflow.check_properties(),
                             "scripts_imported": sorted(m for m in sys.modules if m.split(".")[0] == "scripts"),
                             "path": sys.path}))
"""


def test_packaged_bundle_loads_and_has_its_properties_in_a_fresh_process(bundle_dir):
    """`python -I`: no PYTHONPATH, no current directory on sys.path; run from the bundle root, no data."""
    assert not (bundle_dir / "data").exists()
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_SCRIPT, BUNDLE_NAME, str(bundle_dir.parent)],
                          cwd=bundle_dir, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    assert report["shape"] == [2, 1, 40, 40] and report["type"] == "RecursiveScriptModule"
    assert report["missing"] == [] and report["scripts_imported"] == []
    assert not any(Path(p or ".").resolve() == bundle_dir.resolve() for p in report["path"])


def test_consumer_pipeline_gives_the_bundles_own_mask(bundle_dir, weights, tmp_path):
    """What every consumer runs (preprocessing without the file step, SliceInferer over model.ts,
    postprocessing), in process, equals configs/inference.yaml's mask on a permuted, anisotropic grid."""
    files = write_subject(tmp_path / "in", "case")
    own = own_mask(files, weights, tmp_path / "own")
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    parser["device"] = "$torch.device('cpu')"
    preprocessing = parser.get_parsed_content("preprocessing")
    image = four_channel_image(files, tmp_path / "case_4d.nii.gz")
    data = preprocessing({"image": str(image), "request_option": "kept"})
    assert data["request_option"] == "kept"
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], parser.get_parsed_content("network"))[0]
    data = parser.get_parsed_content("postprocessing")(data)
    assert_same_mask(np.asarray(data["pred"][0]), np.asarray(data["pred"].affine), own, "consumer pipeline")


def test_the_bundles_own_file_step_keeps_every_incoming_key(tmp_path):
    """LoadSubjectd (configs/inference.yaml's `loading`) on a MONAI-Label-style request record."""
    from scripts.workflows.inference import LoadSubjectd

    image = four_channel_image(write_subject(tmp_path / "in", "case", shape=(12, 10, 6)), tmp_path / "case_4d.nii.gz")
    request = {"image": str(image), "model": BUNDLE_NAME, "model_filename": ["model.pt"], "device": "cpu"}
    loaded = LoadSubjectd()(request)
    kept = ("model", "model_filename", "device")
    assert {k: loaded[k] for k in kept} == {k: request[k] for k in kept}
    assert loaded["image"].shape == (4, 12, 10, 6) and loaded["subject"] == "case_4d"


# --------------------------------------------------------------------------- the applications


@pytest.fixture(scope="module")
def phantom_subject(tmp_path_factory) -> dict:
    """One phantom subject at 2 mm (the bundle resamples it to its 3 mm training grid)."""
    out = tmp_path_factory.mktemp("phantom")
    done = subprocess.run([sys.executable, "-m", "scripts.data.phantom", "--out", str(out), "--subjects", "1", "--seed", "0",
                           "--spacing", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (t1,) = out.glob("*/*/*_t1.nii.gz")
    stem = str(t1)[: -len("_t1.nii.gz")]
    return {m: f"{stem}_{FILE_TOKENS[m]}.nii.gz" for m in MODALITIES}


@pytest.fixture(scope="module")
def phantom_own_mask(phantom_subject, weights, tmp_path_factory) -> nib.Nifti1Image:
    return own_mask(phantom_subject, weights, tmp_path_factory.mktemp("own"))


@pytest.mark.slow
@pytest.mark.consumers
def test_monai_deploy_app_gives_the_bundles_own_mask(bundle_dir, phantom_subject, phantom_own_mask, tmp_path):
    from tests.consumer_envs import consumer_python

    python = consumer_python("deploy")
    out = tmp_path / "deploy_mask.npy"
    env = {**ENV, "HOLOSCAN_MODEL_PATH": str(bundle_dir / "models" / "model.ts"),
           "HOLOSCAN_INPUT_PATH": str(tmp_path), "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "output")}
    started = time.perf_counter()
    done = subprocess.run([str(python), str(ROOT / "tests" / "consumer_apps" / "deploy_app.py"), json.dumps(phantom_subject),
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and out.is_file(), (done.stdout + done.stderr)[-4000:]
    print(f"MONAI Deploy app: {time.perf_counter() - started:.1f} s")
    affine = np.load(str(out) + ".affine.npy")
    assert_same_mask(np.load(out), affine, phantom_own_mask, "MONAI Deploy")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, log: Path, seconds: float = 300) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"MONAI Label stopped (exit {server.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(2)
    raise AssertionError(f"MONAI Label did not answer {url} within {seconds} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.consumers
def test_monai_label_infer_returns_the_bundles_own_mask(bundle_dir, phantom_subject, phantom_own_mask, tmp_path):
    import shutil

    from tests.consumer_envs import consumer_python

    python = consumer_python("label")
    label_cli = [str(python), "-m", "monailabel.main"]
    done = subprocess.run([*label_cli, "apps", "--download", "--name", "monaibundle", "--output", str(tmp_path / "apps")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    app = tmp_path / "apps" / "monaibundle"
    shutil.copytree(bundle_dir, app / "model" / BUNDLE_NAME)
    studies = tmp_path / "studies"
    four_channel_image(phantom_subject, studies / "case.nii.gz")
    port = _free_port()
    log = tmp_path / "server.log"
    command = [*label_cli, "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
               "--port", str(port), "--conf", "models", BUNDLE_NAME, "--conf", "zoo_source", "github",
               "--conf", "sam2", "false", "--conf", "skip_trainers", "true"]
    started = time.perf_counter()
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=tmp_path, env={**ENV, "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")},
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        info = _wait_for(f"http://127.0.0.1:{port}/info/", server, log)
        model = info["models"][BUNDLE_NAME]
        assert model["labels"] == {"whole tumour": 1} and model["type"] == "segmentation", model
        request = urllib.request.Request(f"http://127.0.0.1:{port}/infer/{BUNDLE_NAME}?image=case&output=image",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=600) as response:
            assert response.status == 200
            (tmp_path / "label.nii.gz").write_bytes(response.read())
        print(f"MONAI Label: server up and one /infer in {time.perf_counter() - started:.1f} s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    label = nib.load(tmp_path / "label.nii.gz")
    assert re.search(r"Infer Request", log.read_text())
    assert_same_mask(np.asarray(label.dataobj), label.affine, phantom_own_mask, "MONAI Label")


# --------------------------------------------------------------------------- selection and recipes (fast)


def test_the_application_tests_run_only_when_selected_by_marker():
    """`pytest tests/test_consumers.py` (pytest.ini selects no marker) must not build 2.6 GB of venvs."""
    from tests.conftest import consumers_selected

    assert consumers_selected("consumers") and consumers_selected("slow") and consumers_selected("slow and consumers")
    assert not any(consumers_selected(e) for e in ("", None, "not slow", "not consumers", "not  slow"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_consumers.py", "-k", "monai_deploy_app or monai_label_infer"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "2 skipped" in done.stdout and "select with -m consumers (or -m slow)" in done.stdout, done.stdout[-2000:]


def _requirements() -> dict:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


def test_recipes_name_what_each_consumer_needs_and_never_install_torch():
    from tests.consumer_envs import CONSTRAINTS, DEPLOY, LABEL

    pins = _requirements()
    deploy = {a for step in DEPLOY for a in step}
    label = {a for step in LABEL for a in step}
    assert f"nibabel=={pins['nibabel']}" in deploy
    assert {f"itk=={pins['itk']}", f"nibabel=={pins['nibabel']}"} <= label
    assert f"torch=={pins['torch']}" in CONSTRAINTS and f"numpy=={pins['numpy']}" in CONSTRAINTS
    requested = [a for a in deploy | label if re.match(r"^(torch|torchvision|numpy)\b", a)]
    assert requested == []  # torch and numpy only as constraints (pip -c), the installed CPU build reused
    card = (ROOT / "docs" / "README.md").read_text()
    assert not re.search(r"venv --system-site-packages", card) and "00_project_site_packages.pth" in card
    for line in (line for line in card.splitlines() if line.startswith("pip install")):
        assert "-c constraints.txt" in line and "torch==" not in line, line
    assert re.search(r"pip install .*monai-deploy-app-sdk.*nibabel==" + re.escape(pins["nibabel"]), card)
    assert re.search(r"pip install .*monai==1\.6\.1 nibabel==\S+ itk==" + re.escape(pins["itk"]), card)


def test_a_consumer_venv_reuses_the_running_interpreters_packages(tmp_path):
    """The venv's python imports this interpreter's torch (no second torch), nibabel and itk."""
    from tests.consumer_envs import make_venv

    python = make_venv(tmp_path / "venv", tmp_path / "build.log", with_pip=False)
    probe = ("import importlib.util, json, sys, torch, nibabel; print(json.dumps({'torch': torch.__file__, "
             "'version': torch.__version__, 'itk': importlib.util.find_spec('itk') is not None, 'prefix': sys.prefix}))")
    done = subprocess.run([str(python), "-c", probe], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["torch"] == torch.__file__ and seen["version"] == torch.__version__ and seen["itk"]
    assert Path(seen["prefix"]) == tmp_path / "venv"
