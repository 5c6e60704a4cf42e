"""Virtual environments of the bundle's consumers, built by the consumer tests and cached.

Each environment is a `python -m venv` whose site-packages holds a `.pth` file listing the
site-packages of the interpreter running the tests (`project_site_dirs`: a project venv's,
not only the base interpreter's, which `--system-site-packages` would give), so it reuses the
project's own torch 2.13.0 (CPU), monai 1.6.1, nibabel and itk and adds only the consumer's
packages; the venv's own installs come first on sys.path. Every install runs under the
constraints torch==2.13.0 and numpy==2.4.6 (`-c`, never as a requirement), so pip never swaps
them (a different torch would be a multi-GB CUDA download). What each consumer needs beyond
the applications is named: nibabel for Deploy (the app reads NIfTI), itk and nibabel for Label
(MONAI's LoadImage readers). Where: $WSS_CMER_CONSUMER_VENVS, else
~/.cache/wss_cmer_brats-consumer-venvs/<name>; a venv is reused while its `.ready` file holds
the same recipe, rebuilt otherwise. Network access to PyPI is needed on the first build only.
The tests that build them run only when selected (`-m consumers` or `-m slow`, tests/conftest.py).

MONAI Deploy App SDK 4.0.0:
  - `monai.deploy` lives inside the `monai` package, so the venv needs its own copy of
    monai 1.6.1 (the system one would shadow `monai.deploy`): reinstalled without deps;
  - holoscan's wheel makes its library symlinks from a `.pth` hook that imports filelock
    before the system site-packages are on sys.path: filelock goes into the venv too.

MONAI Label 0.8.5 (installed without its dependency list, then the packages it imports):
  - its requirements pull sam2 (an sdist that builds against a downloaded torch), holoscan,
    numpymaxflow and torchvision; none is on the bundle app's inference path
    (`--conf sam2 false`), so they are left out;
  - pydicom<3, dicomweb-client<0.60 and pynetdicom<3 (its DICOM modules need the older APIs);
  - pydicom-seg 0.4.1 pins numpy<2 and jsonschema<4 but only its import runs (DICOM SEG
    output is not used with a NIfTI studies folder): installed without its dependencies, which
    keeps numpy 2.4.6 (MONAI Label alone would downgrade numpy to 1.26.4);
  - torchvision: the PyPI wheel for torch 2.13.0 (0.28.0) is a CUDA build (its `_C.so` needs
    libtorch_cuda), so `import torchvision` fails on CPU torch (`torchvision::nms` does not
    exist), and PyPI has no CPU build. MONAI Label imports `torchvision.utils.make_grid` /
    `save_image` at module level only; the stand-in in tests/consumer_apps/torchvision_stub
    provides those two names and raises if they are ever called.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONSTRAINTS = ["torch==2.13.0", "numpy==2.4.6"]  # pip -c: never installed, never replaced inside a consumer venv
PTH_NAME = "00_project_site_packages.pth"  # first .pth processed (holoscan's own hook comes later)

DEPLOY = [
    ["monai-deploy-app-sdk==4.0.0", "highdicom==0.28.2", "pydicom==3.0.2", "monai==1.6.1", "nibabel==5.4.2"],
    ["--no-deps", "--ignore-installed", "monai==1.6.1", "filelock==4.3.1"],
]
LABEL = [
    ["--no-deps", "monailabel==0.8.5", "pydicom-seg==0.4.1"],
    ["monai==1.6.1", "nibabel==5.4.2", "itk==5.4.7", "pydicom==2.4.5", "dicomweb-client==0.59.3", "pynetdicom==2.1.1",
     "SimpleITK==2.5.7", "scikit-image==0.26.0", "psutil", "uvicorn>=0.29.0", "fastapi>=0.110.2",
     "pydantic>=2.7.0", "pydantic-settings>=2.2.1", "python-dotenv", "python-multipart", "httpx", "schedule",
     "timeloop", "expiringdict", "expiring_dict", "cachetools", "watchdog", "pynrrd", "einops", "filelock",
     "passlib", "pyjwt", "bcrypt", "shapely", "requests", "requests-toolbelt", "urllib3", "google-auth",
     "colorama", "typeguard", "girder-client"],
    ["@copy", "consumer_apps/torchvision_stub/torchvision"],  # into site-packages, see the module docstring
]
RECIPES = {"deploy": DEPLOY, "label": LABEL}


def venv_root() -> Path:
    return Path(os.environ.get("WSS_CMER_CONSUMER_VENVS") or "~/.cache/wss_cmer_brats-consumer-venvs").expanduser()


def project_site_dirs() -> list[str]:
    """The site-packages folders of the running interpreter (a project venv's included), in order."""
    return [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def _recipe_hash(name: str) -> str:
    steps = RECIPES[name]
    stub = HERE / "consumer_apps" / "torchvision_stub"
    payload = json.dumps([sys.version, steps, CONSTRAINTS, project_site_dirs(),
                          sorted(p.read_text() for p in stub.rglob("*.py"))])
    return hashlib.sha256(payload.encode()).hexdigest()


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _run(command: list[str], log: Path, timeout: int) -> None:
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"building a consumer venv failed ({' '.join(command[:6])} ...); see {log}. Fix: check "
                           f"access to PyPI, or delete {log.parent} and rerun")


def make_venv(venv: Path, log: Path, with_pip: bool = True) -> Path:
    """A venv at `venv` that sees this interpreter's site-packages after its own; returns its python.

    Args:
        venv: the folder to create.
        log: the build log.
        with_pip: install pip into it (False: faster, for checks that install nothing).
    """
    _run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(venv)], log, 300)
    site = _site_packages(venv)
    site.mkdir(parents=True, exist_ok=True)
    (site / PTH_NAME).write_text("".join(f"{p}\n" for p in project_site_dirs()))
    (venv / "constraints.txt").write_text("".join(f"{c}\n" for c in CONSTRAINTS))
    return venv / "bin" / "python"


def consumer_python(name: str, timeout: int = 1800) -> Path:
    """The interpreter of consumer venv `name` ("deploy" or "label"), built when missing or stale."""
    venv = venv_root() / name
    ready = venv / ".ready"
    digest = _recipe_hash(name)
    python = venv / "bin" / "python"
    if ready.is_file() and ready.read_text() == digest and python.is_file():
        return python
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{name}-build.log"
    log.write_text("")
    make_venv(venv, log)
    for step in RECIPES[name]:
        if step[0] == "@copy":
            source = HERE / step[1]
            shutil.copytree(source, _site_packages(venv) / source.name, dirs_exist_ok=True)
        else:
            _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                  str(venv / "constraints.txt"), *step], log, timeout)
    ready.write_text(digest)
    return python
