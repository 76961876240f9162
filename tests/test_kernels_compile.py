"""Every CUDA kernel instantiation compiles with NVRTC for sm_80 and sm_90, with the options
CuPy's RawModule uses at run time. Needs CuPy and the NVRTC library, not a GPU."""

import importlib
import pkgutil

import pytest

import cudeform.cuda
from cudeform.cuda import _compile

pytest.importorskip("cupy", reason="the compile check needs CuPy (pip install '.[test]')")

CUDA_MODULES = [
    importlib.import_module(f"cudeform.cuda.{info.name}")
    for info in pkgutil.iter_modules(cudeform.cuda.__path__)
    if not info.name.startswith("_")
]


def test_every_source_belongs_to_an_op_module():
    sources = {p.name for p in _compile.kernel_dir().glob("*.cu")}
    assert sources == {m.SOURCE for m in CUDA_MODULES}
    for module in CUDA_MODULES:
        assert module.SOURCE == module.__name__.rsplit(".", 1)[1] + ".cu"


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("module", CUDA_MODULES, ids=lambda m: m.SOURCE)
def test_compiles(module, arch):
    cubin = _compile.compile_for_arch(module, arch)
    assert cubin[:4] == b"\x7fELF"


def test_digest_follows_every_header(tmp_path, monkeypatch):
    """CuPy's cache keys on the options: a change to any header must change them."""
    for path in _compile.kernel_dir().iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(_compile, "kernel_dir", lambda: tmp_path)
    _compile.sources_digest.cache_clear()
    before = _compile.options(90)
    (tmp_path / "common.cuh").write_text((tmp_path / "common.cuh").read_text() + "\n// edited\n")
    _compile.sources_digest.cache_clear()
    after = _compile.options(90)
    _compile.sources_digest.cache_clear()
    assert before != after
