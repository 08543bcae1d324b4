"""Test set-up: 8 fake CPU devices and an offline HF hub, before jax or transformers are imported."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The shipped SmolLM2-135M-Instruct (GGUF), loaded once per test session."""
    from bpo_jax.models import load_pretrained

    return load_pretrained("smollm2-135m-instruct")
