"""Command-line entry point: ``python -m bpo_jax <command> [args] [--debug]``.

The exit code is a contract with the launchers (``bpo_jax.runtime.exits``, ``launch/*.sh``):

====  ==========================================================================  =============================
code  meaning                                                                     the launchers
====  ==========================================================================  =============================
0     done                                                                        stop
1     transient, on any host: a network or remote-storage error, a judge out of   restart with backoff, up to a
      retries, a host that failed, anything unexpected                            limit
2     the user must change something: a config value, a data row, a missing or    never restart
      unreadable path, a checkpoint that does not fit, a setting too large for
      the devices' memory
143   preempted (SIGTERM): the last completed state is on disk                    restart at once
====  ==========================================================================  =============================

A failure prints one ``error: ...`` line (on every host, the same line and code: ``distributed.HostError``); a
transient one says it may succeed when retried, and an unexpected one (likely a bug) shows its traceback too.
``--debug`` (or ``BPO_DEBUG=1``) raises instead, with the traceback. A run is quiet about the libraries it loads
(transformers, absl, orbax, TensorFlow: errors only, ``quiet_libraries``), so its first line is bpo_jax's;
``--debug`` lets them speak.

The commands that use devices across processes (``JOINING``: train, sft, evaluate, compare, generate) first join
the run's processes (``bpo_jax.runtime.cluster.initialize``). ``experiment`` never does: its ``train`` and
``evaluate`` children join by themselves, and a parent holding the TPU chips and the coordinator port would clash
with them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

log = logging.getLogger("bpo_jax.cli")  # this module runs as __main__

# command -> (module with a ``main(argv) -> int``, one-line help). Modules are imported on use, so a command's
# heavy dependencies load only when it runs.
COMMANDS = {
    "train": ("bpo_jax.cli.train", "online BPO training: --config configs/<file>.yaml [key=value ...]"),
    "sft": ("bpo_jax.cli.sft", "supervised fine-tuning of sft_seeds adapters, the loss on responses only: --config "
                               "configs/<file>_sft.yaml [key=value ...]"),
    "evaluate": ("bpo_jax.cli.evaluate", "a run checkpoint's win rate vs the human references: --checkpoint RUN_DIR"),
    "compare": ("bpo_jax.cli.compare", "two policies head to head on the same test prompts: RUN_A RUN_B (runs, "
                                       "checkpoints or models)"),
    "plot": ("bpo_jax.eval.plot", "PNG of win rate (with CI) and loss against step for one or more run dirs"),
    "toy": ("bpo_jax.cli.toy", "seconds-long BPO vs offline/on-policy comparison on a toy softmax policy"),
    "generate": ("bpo_jax.cli.generate", "answer a prompt with a model (default: the shipped SmolLM2-135M-Instruct)"),
    "experiment": ("bpo_jax.cli.experiment", "a method x loss x seed grid of train runs under one budget, with paired "
                                             "win-rate comparisons: EXPERIMENT.yaml"),
}
# commands that join the run's processes before touching a device
JOINING = ("train", "sft", "evaluate", "compare", "generate")


# Environment settings read by libraries when they load (TF_CPP_MIN_LOG_LEVEL also quiets XLA's C++ INFO/WARNING
# lines); set only where the user has not set them.
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "GRPC_VERBOSITY": "ERROR"}
_QUIET_LOGGERS = ("absl", "tensorflow", "orbax", "transformers", "tensorflow_datasets")
_set_env: list[str] = []  # the _QUIET_ENV keys this process set (a later --debug call in it unsets them)


def quiet_libraries(quiet: bool = True) -> None:
    """Keep transformers (its "PyTorch was not found" advisory included), absl, orbax and TensorFlow to errors
    only, so a run's first line is bpo_jax's; ``quiet=False`` (``--debug``) gives them their own defaults back.
    Called before any command module is imported; libraries already imported are set directly."""
    for key, value in _QUIET_ENV.items():
        if quiet and key not in os.environ:
            os.environ[key] = value
            _set_env.append(key)
        elif not quiet and key in _set_env:
            os.environ.pop(key, None)
            _set_env.remove(key)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.set_verbosity_error if quiet else hf_logging.set_verbosity_warning)()
    if "absl.logging" in sys.modules:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR if quiet else absl_logging.WARNING)


def main(argv=None, *, join: bool = True) -> int:
    """Run one command; ``join=False`` never joins processes (a command run inside another one's process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m bpo_jax <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    debug = "--debug" in argv or os.environ.get("BPO_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    quiet_libraries(not debug)
    module, _ = COMMANDS[argv[0]]
    from bpo_jax.runtime import logs

    logs.setup(debug=debug)  # every host's start-up lines; each command then keeps INFO to the primary host
    try:
        if join and argv[0] in JOINING:
            from bpo_jax.runtime import cluster

            cluster.initialize()  # before anything touches a device: a no-op for one process
        return int(importlib.import_module(module).main(argv[1:]) or 0)
    except Exception as err:  # noqa: BLE001  every failure: one clear line and its kind's exit code
        if debug:
            raise
        return _failed(argv[0], err)


def _failed(command: str, err: Exception) -> int:
    """Log ``err`` as one ``error:`` line (after its traceback when it is unexpected) and return its exit code."""
    from bpo_jax.runtime import exits

    code = exits.exit_code(err)
    if not exits.expected(err):
        log.error("an unexpected error (likely a bug), with its traceback:", exc_info=err)
    retry = "a transient failure: a retry may succeed, and the launchers restart it. " if code == exits.TRANSIENT \
        else ""
    log.error(f"error: {exits.describe(err)}\n({retry}python -m bpo_jax {command} --debug ... shows the traceback)")
    return code


if __name__ == "__main__":
    sys.exit(main())
