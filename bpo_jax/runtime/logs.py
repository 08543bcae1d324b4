"""The command line's output: the ``bpo_jax`` loggers' records as plain lines, INFO on stdout and warnings and
errors on stderr, from the primary host only unless they are warnings or errors.

Library modules log through ``logging.getLogger(__name__)`` and never print; a command calls ``setup`` once
(``python -m bpo_jax`` before joining processes, each command again once it knows whether it is the primary host).
A program that imports bpo_jax configures logging its own way and gets nothing on its streams from here.
"""

from __future__ import annotations

import logging
import sys

_ROOT = "bpo_jax"


class _Stream(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` / ``sys.stderr`` is when a line is logged (not the one at its
    creation, which may be closed or replaced by then, e.g. under a test's capture)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    @property
    def stream(self):
        return getattr(sys, self.name)

    @stream.setter
    def stream(self, _):
        pass


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record) -> bool:
        return record.levelno < self.level


def setup(primary: bool = True, debug: bool | None = None) -> None:
    """Send the ``bpo_jax`` loggers to the console: INFO on stdout on the primary host, WARNING and above on
    stderr on every host; with ``debug``, DEBUG and up on every host (to see each host of a multi-host run).
    Idempotent: a later call changes the levels only, and keeps the first call's ``debug`` unless it passes its
    own."""
    logger = logging.getLogger(_ROOT)
    out = next((h for h in logger.handlers if isinstance(h, _Stream) and h.name == "stdout"), None)
    if out is None:
        out, err = _Stream("stdout"), _Stream("stderr")
        out.addFilter(_Below(logging.WARNING))
        err.setLevel(logging.WARNING)
        for handler in (out, err):
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        out.debug = False
        # The console is these handlers': a handler on the root logger (orbax.checkpoint's import installs one)
        # would print every line a second time, as "INFO:bpo_jax...:" on stderr.
        logger.propagate = False
    if debug is not None:
        out.debug = debug
    logger.setLevel(logging.DEBUG if out.debug else logging.INFO if primary else logging.WARNING)
