"""Test setup: 8 host CPU devices (set before jax is imported), offline hubs, one compilation cache
for the whole session, and the shared ``tiny_step`` fixture (``tiny.build``: a tiny distillation
step through the library's builder)."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session: every test process (the xdist workers inherit
# the first process's environment), and every subprocess a test starts, reads a program compiled
# once (the same tiny step in many tests, a relaunched run) instead of compiling it again. The
# executable is the same, so bit-for-bit checks are unaffected.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdistil-tests-xla-")
    os.environ["JAXDISTIL_TESTS_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    # The process that made the cache removes it (an xdist worker has no "workerinput"-less session).
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ.get("JAXDISTIL_TESTS_OWN_CACHE", ""), ignore_errors=True)


@pytest.fixture
def tiny_step():
    """``tiny.build(cfg, s_cfg, t_cfg, mesh, ...)``: a built step, its state and consts (tests/tiny.py)."""
    import tiny

    return tiny.build
