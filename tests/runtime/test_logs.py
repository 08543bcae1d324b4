"""The command line's console output (``bpo_jax.runtime.logs``): each line once, INFO on stdout from the primary
host, warnings on stderr from every host, even when a dependency has put a handler on the root logger."""

import logging
import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)


def test_each_line_once_on_its_stream_despite_a_root_handler():
    out = _run("""
        import logging
        logging.basicConfig()  # what orbax.checkpoint's import does: a root handler on stderr
        from bpo_jax.runtime import logs
        logs.setup()
        log = logging.getLogger("bpo_jax.some.module")
        log.info("hello")
        log.warning("careful")
        log.debug("hidden")
    """)
    assert out.stdout == "hello\n"
    assert out.stderr == "careful\n"  # not also "INFO:bpo_jax.some.module:hello" / "WARNING:...:careful"


def test_a_non_primary_host_prints_only_warnings_unless_debugging():
    out = _run("""
        import logging
        from bpo_jax.runtime import logs
        logs.setup()
        logs.setup(primary=False)
        log = logging.getLogger("bpo_jax.x")
        log.info("quiet")
        log.error("loud")
        logs.setup(primary=False, debug=True)  # --debug: every host speaks, and a later call keeps it
        logs.setup(primary=False)
        log.debug("debug on")
    """)
    assert out.stdout == "debug on\n" and out.stderr == "loud\n"


def test_a_program_that_never_calls_setup_keeps_its_own_logging(caplog):
    with caplog.at_level(logging.INFO):
        logging.getLogger("bpo_jax.y").info("to the caller's handlers")
    assert "to the caller's handlers" in caplog.text
