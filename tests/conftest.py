"""Test set-up: 8 fake CPU devices, fast XLA:CPU compiles and an offline HF hub, before jax or transformers are
imported."""

import os

from testing import FAST_COMPILE_FLAGS

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags = f"{_flags} --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:  # XLA_FLAGS naming a level: the user's choice
    _flags = f"{_flags} {FAST_COMPILE_FLAGS}"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "BPO_COMPILATION_CACHE" not in os.environ:
    # One persistent compilation cache for the session (pytest-xdist's workers inherit it from the controller, and
    # the tests hand it to the processes they start): the CLI runs compile the same tiny programs many times over.
    # Entries are keyed by program, devices and versions, so a hit is the program a miss would compile.
    # ``BPO_COMPILATION_CACHE=off`` turns it off.
    import atexit
    import shutil
    import tempfile

    os.environ["BPO_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="bpo_jax_test_compile_cache_")
    atexit.register(shutil.rmtree, os.environ["BPO_COMPILATION_CACHE"], True)
    # Every program, however fast it compiles: a CPU run's ~160 programs mostly take 10-100 ms each, and a repeat of
    # the same tiny run then takes ~40% less time (the product's default skips programs under 0.1 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_bpo_jax_logger():
    """A command run in-process (``bpo_jax.__main__.main``) puts console handlers on the ``bpo_jax`` logger and
    stops it propagating to the root logger (pytest's ``caplog``): each test starts from, and leaves, the logger
    as the session found it."""
    logger = logging.getLogger("bpo_jax")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture(scope="session")
def smollm2():
    """The shipped SmolLM2-135M-Instruct (GGUF), loaded once per test session."""
    from bpo_jax.models import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_policy_and_rm(smollm2, tmp_path_factory):
    """HF folders of a tiny random Llama policy and a tiny random Llama reward model (num_labels=1), both with
    SmolLM2's tokenizer and chat template: the paper's task configs run end to end on these in seconds."""
    import jax
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from bpo_jax.models import Decoder, init_params, save_pretrained
    from testing import tiny_model_config

    tok = smollm2[1]
    cfg = tiny_model_config(vocab_size=49152, eos_token_id=2, pad_token_id=2)  # SmolLM2's vocabulary
    policy = str(tmp_path_factory.mktemp("tiny_policy"))
    save_pretrained(Decoder.from_params(cfg, init_params(cfg, jax.random.key(0))), tok, policy)
    torch.manual_seed(0)
    rm_cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=2)
    rm = str(tmp_path_factory.mktemp("tiny_rm"))
    hf_rm = AutoModelForSequenceClassification.from_config(rm_cfg, dtype=torch.float32)
    with torch.no_grad():  # away from the init values, so scores are O(1) and parity checks mean something
        for p in hf_rm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_rm.save_pretrained(rm)
    tok.save_pretrained(rm)
    return policy, rm


def pytest_collection_modifyitems(config, items):
    """Test files holding a ``slow`` test run first, each file's tests in their own order: pytest-xdist's
    ``--dist loadfile`` hands out whole files in this order, so the long multi-process and CLI files start
    early and the many short files fill the workers' gaps at the end instead of one long file running alone
    while the other cores idle (longest jobs first). Which tests run, and each file's order, are unchanged."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
    groups = sorted(files.values(), key=lambda group: not any(i.get_closest_marker("slow") for i in group))
    items[:] = [item for group in groups for item in group]
