"""What the sanitizer build (make sanitize, README "Sanitizers") must see: an access past a large
CPU output into its block's round-up slack, or into a freed block kept in the cache (Note
[Poisoned cache blocks] in cpp/cpu/cpu_alloc.cpp). Both are inside one live allocation as far
as AddressSanitizer's allocator knows, so only the poisoning reveals them. Each access runs in
a subprocess (it inherits the preloaded runtime and ASAN_OPTIONS), which must die with the
report. Skipped in a build without AddressSanitizer, which has no _debug_touch_large_output."""

import subprocess
import sys

import pytest

import qlora_ext

pytestmark = pytest.mark.skipif(
    "address" not in qlora_ext.build_info()["sanitize"],
    reason="needs the AddressSanitizer build (make sanitize)",
)

NBYTES = (32 << 20) + 12345  # over the cache's 32 MB threshold; its block is 34 MB
BLOCK = (NBYTES + (2 << 20) - 1) // (2 << 20) * (2 << 20)


def touch(offset: int, after_free: bool) -> subprocess.CompletedProcess:
    code = (
        "import torch, qlora_ext\n"
        f"qlora_ext._C._debug_touch_large_output({NBYTES}, {offset}, {after_free})\n"
        "print('survived')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def reported(proc: subprocess.CompletedProcess) -> bool:
    return (
        proc.returncode != 0
        and "ERROR: AddressSanitizer: use-after-poison" in proc.stderr
        and "debug_touch_large_output" in proc.stderr  # the frame that wrote
        and "survived" not in proc.stdout
    )


@pytest.mark.parametrize("offset", [0, NBYTES - 1], ids=["first", "last"])
def test_the_bytes_of_a_large_output_are_usable(offset):
    proc = touch(offset, after_free=False)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("offset", [NBYTES, BLOCK - 1], ids=["one_past_the_end", "end_of_block"])
def test_a_write_into_the_slack_is_reported(offset):
    proc = touch(offset, after_free=False)
    assert reported(proc), proc.stderr[-3000:]


@pytest.mark.parametrize("offset", [0, NBYTES - 1], ids=["first", "last"])
def test_a_write_into_a_cached_free_block_is_reported(offset):
    proc = touch(offset, after_free=True)
    assert reported(proc), proc.stderr[-3000:]
