"""The ``python -m bpo_jax`` commands, one module each: thin entry points over the library."""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger(__name__)


def run_with_config(command: str, doc: str, example: str, run, argv=None) -> int:
    """The shared shape of ``train`` and ``sft``: parse ``--config FILE [key=value ...]`` (``--help-config``: print
    the config reference and exit), check the config
    before any compute (``lifecycle.checked_config``; a config error is one ``config error:`` line and exit 2),
    then ``run(cfg, trackers, t0)`` with the primary host's trackers, closed at the end."""
    p = argparse.ArgumentParser(prog=f"python -m bpo_jax {command}", description=doc.split("\n\n")[0])
    p.add_argument("--config", help="YAML file in configs/ (defaults apply to missing keys)")
    p.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")
    p.add_argument("--help-config", action="store_true", help="print every config key (group, default, help, "
                                                               "resumable) as Markdown and exit")
    args = p.parse_args(argv)
    if args.help_config:
        from bpo_jax.config.reference import markdown

        sys.stdout.write(markdown())
        return 0
    from bpo_jax.runtime import exits, logs
    from bpo_jax.wiring.lifecycle import checked_config

    logs.setup()
    try:  # ConfigError is a ValueError
        cfg, trackers = checked_config(args.config, args.overrides)
    except ValueError as err:
        log.error(f"config error: {err}")
        return exits.USER
    try:
        return run(cfg, trackers, time.time())
    finally:
        trackers.close()
