"""Command-line entry point: ``python -m bpo_jax <command> [args] [--debug]``.

Expected errors (a missing path, a bad value, a malformed file, a checkpoint that does not fit) print one
``error: ...`` line and exit with 2; ``--debug`` (or ``BPO_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module with a ``main(argv) -> int``, one-line help). Modules are imported on use, so a command's
# heavy dependencies load only when it runs.
COMMANDS = {
    "train": ("bpo_jax.cli_train", "online BPO training: --config configs/<file>.yaml [key=value ...]"),
    "evaluate": ("bpo_jax.cli_evaluate", "a run checkpoint's win rate vs the human references: --checkpoint RUN_DIR"),
    "plot": ("bpo_jax.plot", "PNG of win rate (with CI) and loss against step for one or more run dirs"),
    "toy": ("bpo_jax.toy", "seconds-long BPO vs offline/on-policy comparison on a toy softmax policy"),
    "generate": ("bpo_jax.cli_generate", "answer a prompt with a model (default: the shipped SmolLM2-135M-Instruct)"),
    "experiment": ("bpo_jax.cli_experiment", "a method x loss x seed grid of train runs under one budget, with paired "
                                             "win-rate comparisons: EXPERIMENT.yaml"),
}


def main(argv=None) -> int:
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
    from bpo_jax import distributed

    module, _ = COMMANDS[argv[0]]
    try:
        distributed.initialize()  # before anything touches a device: a no-op for one process
        return int(importlib.import_module(module).main(argv[1:]) or 0)
    except (OSError, ValueError) as err:  # expected errors (a path, a value, a file's content): one clear line
        if debug:
            raise
        print(f"error: {err}\n(python -m bpo_jax {argv[0]} --debug ... shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
