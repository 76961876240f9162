"""The CUDA sources ship inside the wheel, and the installed package finds them."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cudeform
from cudeform.cuda import _compile

REPO = Path(__file__).resolve().parent.parent


def test_installed_package_finds_its_kernels():
    found = _compile.kernel_dir()
    assert (found / "common.cuh").is_file() and (found / "deform_conv.cu").is_file()
    package = Path(cudeform.__file__).resolve().parent
    if (package / "kernels").is_dir():  # a regular (non-editable) install
        assert found == package / "kernels"


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs a source checkout")
def test_wheel_contains_every_kernel_source(tmp_path):
    pytest.importorskip("hatchling", reason="building the wheel offline needs hatchling (pip install '.[test]')")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True)
    (wheel,) = tmp_path.glob("cudeform-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert sources and {f"cudeform/kernels/{s}" for s in sources} <= names
