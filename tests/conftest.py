"""Test setup: 8 host CPU devices (set before jax is imported), offline hubs, and the shared
``tiny_step`` fixture (``tiny.build``: a tiny distillation step through the library's builder)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def tiny_step():
    """``tiny.build(cfg, s_cfg, t_cfg, mesh, ...)``: a built step, its state and consts (tests/tiny.py)."""
    import tiny

    return tiny.build
