import os

import pytest
import torch

import qlora_ext

HAS_CUDA_KERNELS = qlora_ext.build_info()["cuda"] and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA_KERNELS else [])

ISA_ORDER = ["scalar", "avx2", "avx512"]
# QLORA_EXT_CPU_ISA (README, "Sanitizers"): the extension runs on that ISA from import on, every
# test stays on it, and the cpu_isa fixture runs only it. Where the CPU lacks it, every test is
# skipped: the run would only repeat the best ISA's.
FORCED_ISA = os.environ.get("QLORA_EXT_CPU_ISA") or None
if FORCED_ISA == "auto":
    FORCED_ISA = None


def _isa_available(isa: str) -> bool:
    best = qlora_ext.build_info()["cpu_isa_detected"]
    return isa in ISA_ORDER and ISA_ORDER.index(isa) <= ISA_ORDER.index(best)


def pytest_report_header(config):
    info = qlora_ext.build_info()
    return f"qlora_ext build: {info}; CUDA device present: {torch.cuda.is_available()}"


def pytest_collection_modifyitems(config, items):
    if FORCED_ISA is not None and not _isa_available(FORCED_ISA):
        skip = pytest.mark.skip(reason=f"QLORA_EXT_CPU_ISA={FORCED_ISA}: this CPU lacks it")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _forced_isa():
    if FORCED_ISA is not None:  # a test that changed the ISA leaves it to this one
        qlora_ext._C.set_cpu_isa(FORCED_ISA)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def cpu_isa(request, _forced_isa):
    """Run a test once per CPU code path this machine supports (only QLORA_EXT_CPU_ISA's
    when that is set)."""
    if not _isa_available(request.param):
        pytest.skip(f"CPU lacks {request.param}")
    if FORCED_ISA is not None and request.param != FORCED_ISA:
        pytest.skip(f"QLORA_EXT_CPU_ISA={FORCED_ISA}")
    qlora_ext._C.set_cpu_isa(request.param)
    yield request.param
    qlora_ext._C.set_cpu_isa(FORCED_ISA or "auto")
