"""harness.allocator: the CPU allocator policy of arena-bench is validated, described and really applied."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.allocator import _glibc_mallopt, configure_cpu_allocator, describe_cpu_allocator


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="cpu_allocator must be one of .*'default', 'reuse'.*got 'jemalloc'"):
        configure_cpu_allocator("jemalloc")


def test_default_describes_the_malloc_environment():
    assert describe_cpu_allocator({"PATH": "/bin"}) == "default"
    described = describe_cpu_allocator({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"})
    assert described == "env:MALLOC_MMAP_MAX_=0,MALLOC_TRIM_THRESHOLD_=100000000000"


@pytest.mark.skipif(_glibc_mallopt() is None, reason="needs glibc")
def test_reuse_applies_mallopt_in_a_fresh_process():
    # In a child process: mallopt is process-wide and would change this test session's allocator.
    code = "from harness.allocator import configure_cpu_allocator as c; print(c('reuse'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith("reuse:mallopt(M_MMAP_MAX=0")


@pytest.mark.skipif(_glibc_mallopt() is None, reason="needs glibc")
def test_default_after_reuse_records_reuse():
    # reuse cannot be undone in-process: a later run of the same process (a sweep) must record what is in force.
    code = "from harness.allocator import configure_cpu_allocator as c; c('reuse'); print(c('default'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith("reuse:mallopt(M_MMAP_MAX=0")
