import pytest
import torch

import qlora_ext

HAS_CUDA_KERNELS = qlora_ext.build_info()["cuda"] and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA_KERNELS else [])


def pytest_report_header(config):
    info = qlora_ext.build_info()
    return f"qlora_ext build: {info}; CUDA device present: {torch.cuda.is_available()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def cpu_isa(request):
    """Run a test once per CPU code path this machine supports."""
    order = ["scalar", "avx2", "avx512"]
    best = qlora_ext.build_info()["cpu_isa_detected"]
    if order.index(request.param) > order.index(best):
        pytest.skip(f"CPU lacks {request.param}")
    qlora_ext._C.set_cpu_isa(request.param)
    yield request.param
    qlora_ext._C.set_cpu_isa("auto")
