"""The wheel on its own: built from this checkout, installed offline into a new virtual environment
with the project's constraints (its `imaging` extra and the page's requirements), and the page's
DICOM preview rendered from it, where no services/ or engines/ exist."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from conftest import ROOT, UNDER_CI
from medvlm.imaging.preprocess import configure_pillow
from medvlm.web.app import WebSettings, render_preview
from scripts.make_dicom_samples import dicom_file

# Filled by `make test` (the Makefile's wheelhouse target): the wheels of the imaging extra and
# requirements/web.txt at the constraints' pins, so the install here needs no network.
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
IMAGING_PACKAGES = {"numpy", "pillow", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                    "pylibjpeg-rle"}
OPTIONS = {"window_preset": "mediastinum"}
# In the new environment, as the page's server does it: the decoders' guards, then the preview.
PREVIEW = """
import importlib.metadata, importlib.util, json, sys
from medvlm.imaging.preprocess import configure_pillow
from medvlm.web.app import WebSettings, render_preview
missing = [name for name in ("services", "engines") if importlib.util.find_spec(name) is None]
versions = {name: importlib.metadata.version(name) for name in json.loads(sys.argv[3])}
configure_pillow(WebSettings().max_image_pixels)
body = render_preview(open(sys.argv[1], "rb").read(), json.loads(sys.argv[2]), WebSettings(), 224)
print(json.dumps({"missing": missing, "versions": versions, "preview": body}))
"""


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _isolated_env() -> dict[str, str]:
    """No repository on the path, no user site, no pip settings of this machine (index, links)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


def _ct_slice() -> bytes:
    """A 12-bit CT slice in JPEG 2000 Lossless: decoding it needs the pylibjpeg-openjpeg plugin."""
    yy, xx = np.mgrid[0:96, 0:128]
    stored = (1024 + 800 * np.exp(-((xx - 64) ** 2 + (yy - 48) ** 2) / 900.0)).astype(np.uint16)  # [H, W]
    return dicom_file(stored, JPEG2000Lossless, Modality="CT", BitsStored=12, HighBit=11,
                      RescaleSlope=1, RescaleIntercept=-1024, WindowCenter="40", WindowWidth="400")


def test_imaging_extra_names_the_decoders_at_the_constraints_pins():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["imaging"]
    requirements = [Requirement(line) for line in extra]
    assert {r.name.lower() for r in requirements} == IMAGING_PACKAGES
    pins = _pins()
    serve = (ROOT / "requirements" / "serve.txt").read_text()
    for requirement in requirements:
        pin = pins[requirement.name.lower()]
        assert requirement.specifier.contains(pin), (requirement, pin)  # the tested version installs
        assert f"{requirement.name.lower()}=={pin}" in serve.lower()  # the encoders run the same


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    """The python of a new virtual environment holding the wheel and nothing of the repository."""
    if not (WHEELHOUSE / ".downloaded").exists():
        message = f"no wheelhouse in {WHEELHOUSE.relative_to(ROOT)}: make {WHEELHOUSE.relative_to(ROOT)}/.downloaded"
        if UNDER_CI:
            pytest.fail(message + " (make test does it)", pytrace=False)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy, so building writes nothing into the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "medvlm", source / "medvlm", ignore=ignore)
    shutil.copytree(ROOT / "gen" / "medvlm" / "v1", source / "gen" / "medvlm" / "v1", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", source)
    env = _isolated_env()

    def run(*command: str | Path, timeout: float) -> None:
        done = subprocess.run([str(c) for c in command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work / "dist",
        source, timeout=120)
    (wheel,) = (work / "dist").glob("medvlm-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in files} == {"medvlm", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "medvlm/imaging/dicom.py" in files and "medvlm/web/app.py" in files
    run(sys.executable, "-m", "venv", work / "venv", timeout=120)
    python = work / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-index", "--no-compile", "--find-links", WHEELHOUSE,
        "-c", CONSTRAINTS, f"{wheel}[imaging]", "-r", ROOT / "requirements" / "web.txt", timeout=420)
    return python


@pytest.mark.slow
def test_the_installed_wheel_renders_the_pages_dicom_preview(fresh_python, tmp_path):
    data = _ct_slice()
    (tmp_path / "ct.dcm").write_bytes(data)
    done = subprocess.run([str(fresh_python), "-c", PREVIEW, str(tmp_path / "ct.dcm"), json.dumps(OPTIONS),
                           json.dumps(sorted(IMAGING_PACKAGES))],
                          cwd=tmp_path, env=_isolated_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["missing"] == ["services", "engines"]  # nothing of the repository beside the wheel
    pins = _pins()  # the extra brought every decoder (web.txt names no pylibjpeg), at the constraints' pins
    assert answer["versions"] == {name: pins[name] for name in IMAGING_PACKAGES}
    preview = answer["preview"]
    assert (preview["dicom"], preview["modality"], preview["frames"]) == (True, "CT", 1)
    png = Image.open(io.BytesIO(base64.b64decode(preview["image"].removeprefix("data:image/png;base64,"))))
    assert png.size == (224, 224) and np.asarray(png).std() > 10  # a picture, not a blank
    # the same answer as the page here, from the checkout: the wheel carries the encoder's own code
    configure_pillow(WebSettings().max_image_pixels)
    assert preview == render_preview(data, OPTIONS, WebSettings(), 224)
