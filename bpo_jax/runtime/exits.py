"""Exit codes: the contract between a command and the launchers that restart it (``launch/tpu_pod.sh``,
``launch/slurm.sh``).

====  ====================================================================  ==================================
code  meaning                                                               the launchers
====  ====================================================================  ==================================
0     done                                                                  stop
1     transient, on any host: a network or remote-storage ``OSError``       restart with backoff, up to a
      (connection, timeout), a judge out of retries, a host that failed,    limit
      anything unexpected
2     the user must change something: a config value, a data row, a path    never restart
      (``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``,
      ``PermissionError``), a checkpoint that does not fit (every
      ``ValueError``), a setting too large for the devices' memory (XLA's
      ``RESOURCE_EXHAUSTED``: a rerun would run out of memory again)
143   preempted (128 + SIGTERM): the last completed state is on disk         restart at once
====  ====================================================================  ==================================

An exception whose type does not tell its kind states it in an ``exit_code`` attribute
(``distributed.HostError`` carries the failing host's; the judge's errors state theirs); otherwise its type
decides (``exit_code``).
"""

from __future__ import annotations

TRANSIENT, USER, PREEMPTED = 1, 2, 143  # 0: done

USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)  # a path given


OUT_OF_MEMORY_HINT = ("lower batch_size, sampling_batch_size, eval_batch_size or reward_batch_size, raise "
                      "micro_batches, set remat, or spread the weights over more devices (mesh_fsdp); "
                      "bench/memory_plan.py estimates a setting's peak (docs/scaling.md)")


def exit_code(err: BaseException) -> int:
    """The exit code the table above gives ``err``: its own ``exit_code`` attribute when it has one, else
    ``USER`` for a ``ValueError``, an ``OSError`` about a path or a device out of memory, else ``TRANSIENT``."""
    code = getattr(err, "exit_code", None)
    if code in (TRANSIENT, USER, PREEMPTED):
        return code
    return USER if isinstance(err, (ValueError, *USER_OS_ERRORS)) or out_of_memory(err) else TRANSIENT


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is XLA failing to allocate device (or, on the CPU, host) memory: JAX's runtime error
    ``RESOURCE_EXHAUSTED: Out of memory ...``."""
    text = str(err).lstrip()
    return isinstance(err, RuntimeError) and text.startswith("RESOURCE_EXHAUSTED") and "memory" in text.lower()


def expected(err: BaseException) -> bool:
    """Whether ``err`` is one of the failures a run is expected to meet (its one line says what happened): a
    ``ValueError``, an ``OSError``, or an error that states its kind, judged by its cause when it has one (a
    ``HostError`` on the host that met the error). Anything else is likely a bug, whose traceback is worth
    showing."""
    if hasattr(err, "exit_code") and err.__cause__ is not None:
        return expected(err.__cause__)
    return isinstance(err, (ValueError, OSError)) or hasattr(err, "exit_code") or out_of_memory(err)


def describe(err: BaseException) -> str:
    """``err``'s message for an ``error:`` line (its type's name when it has none), after its type's name for
    an unexpected error or an ``OSError`` of the transient kind (``ConnectionResetError: [Errno 104] ...``), whose
    bare message rarely says what failed; for a device out of memory, XLA's first line and what to change."""
    text = str(err).strip()
    if out_of_memory(err):
        return f"out of device memory ({text.splitlines()[0]}): {OUT_OF_MEMORY_HINT}"
    if not text or (exit_code(err) == TRANSIENT and not hasattr(err, "exit_code")):
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text
