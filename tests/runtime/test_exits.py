"""Exit codes as a contract (``bpo_jax.runtime.exits``): each kind of failure's code, the line it prints, and
``python -m bpo_jax``'s exit code for a user error (2) and a transient one (1)."""

import errno
import json
import os

import pytest

from bpo_jax.__main__ import main
from bpo_jax.config import ConfigError
from bpo_jax.eval.judge import JudgeBudgetError, JudgeError, JudgeRefused
from bpo_jax.runtime import exits
from bpo_jax.runtime.distributed import HostError
from bpo_jax.train.checkpoint import IncompatibleCheckpoint

# A file whose read fails with EIO, as a failing disk or a network file system's does: address 0 of this
# process's memory is never mapped.
EIO_FILE = "/proc/self/mem"


def test_each_kind_of_failure_has_its_exit_code():
    user = [ValueError("x"), ConfigError("x"), IncompatibleCheckpoint("x"), json.JSONDecodeError("x", "", 0),
            FileNotFoundError("x"), NotADirectoryError("x"), IsADirectoryError("x"), PermissionError("x"),
            JudgeRefused("x"), JudgeBudgetError("x"), HostError("process 1: x", exits.USER)]
    transient = [ConnectionError("x"), ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError(),
                 OSError(errno.EIO, "Input/output error"), JudgeError("x"), HostError("process 1: x"),
                 HostError("process 1: x", exits.TRANSIENT), RuntimeError("x"), KeyError("x")]
    assert [exits.exit_code(e) for e in user] == [2] * len(user)
    assert [exits.exit_code(e) for e in transient] == [1] * len(transient)
    assert exits.exit_code(HostError("process 1: SIGTERM", exits.PREEMPTED)) == 143
    # A host-agreed error is no ValueError: a transient one must not be caught as a config error on its way out.
    assert not isinstance(HostError("x", exits.USER), ValueError)


def test_the_error_line_names_what_a_bare_message_does_not():
    assert exits.describe(ValueError("lora_rank=0 must be positive")) == "lora_rank=0 must be positive"
    assert exits.describe(FileNotFoundError("no such folder 'x'")) == "no such folder 'x'"
    assert exits.describe(TimeoutError()) == "TimeoutError"
    assert exits.describe(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) == \
        "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert exits.describe(JudgeError("judge at u gave no verdict")) == "judge at u gave no verdict"
    # A bug (neither a user error nor a known transient one) is unexpected, also behind a host-agreed error.
    assert exits.expected(OSError(errno.EIO, "x")) and exits.expected(JudgeError("x"))
    assert not exits.expected(KeyError("x"))
    try:
        raise HostError("process 0: KeyError: 'x'") from KeyError("x")
    except HostError as err:
        assert not exits.expected(err)
    assert exits.expected(HostError("process 1: KeyError: 'x'"))  # another host's bug: its host shows it


def _out_of_memory():
    """XLA's own out-of-memory error: a 256 TiB array, more than a 47-bit user address space, which XLA:CPU
    cannot allocate either (whatever the kernel's overcommit policy)."""
    import jax
    import jax.numpy as jnp

    jax.jit(lambda: jnp.ones((2**46,), jnp.float32))().block_until_ready()


def test_out_of_memory_is_a_setting_to_change(monkeypatch, capsys):
    """A device out of memory would run out again on a restart: exit 2 (the launchers do not restart it), one
    line with XLA's first line and the settings that lower the peak, no traceback."""
    with pytest.raises(RuntimeError) as caught:
        _out_of_memory()
    err = caught.value
    assert exits.out_of_memory(err) and exits.exit_code(err) == 2 and exits.expected(err)
    assert exits.describe(err).startswith("out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating ")
    assert not exits.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: too many open streams"))

    from bpo_jax.cli import generate

    monkeypatch.setattr(generate, "main", lambda argv: _out_of_memory())
    assert main(["generate", "--prompt", "hi"]) == 2
    out = capsys.readouterr().err
    assert out.startswith("error: out of device memory (RESOURCE_EXHAUSTED") and "micro_batches" in out
    assert "Traceback" not in out and "transient" not in out


@pytest.mark.skipif(not os.path.exists(EIO_FILE), reason="needs Linux's /proc/self/mem")
def test_main_exits_2_for_a_user_error_and_1_for_a_transient_one(tmp_path, capsys):
    bad, broken = tmp_path / "bad", tmp_path / "broken"
    bad.mkdir()
    broken.mkdir()
    (bad / "config.json").write_text("{not json")
    (broken / "config.json").symlink_to(EIO_FILE)  # reading it fails like a disk or network that fails

    assert main(["generate", "--model", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Expecting property name") and "transient" not in err and "Traceback" not in err

    assert main(["generate", "--model", str(broken), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: OSError: [Errno 5] Input/output error\n(a transient failure"), err
    assert "Traceback" not in err
