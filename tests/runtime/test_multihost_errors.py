"""A failure on one host ends every host at once with the same ``error:`` line and the same exit code, with two
CPU processes that see different files (each runs in its own working directory; the paths are relative).

``evaluate --checkpoint run``: process 0's ``run`` lists a checkpoint, process 1's lists none, so the step must
be the primary's on both (a host choosing its own would stop alone with "no checkpoint" while the other waits
in a collective). Then each loads the policy ``policy``: process 0's is a tiny model, process 1's ``config.json``
fails to read with EIO, as a failing disk or network file system does: a transient error (exit 1), which every
host must report as process 1's, and exit 1 with, within seconds (not after the runtime's shutdown timeout).
"""

import os

import pytest

from bpo_jax.config import load_config, save_config
from multihost import run_group
from testing import tiny_model_config, write_minisum_folder

pytestmark = pytest.mark.slow  # several processes (pyproject.toml's markers)

EIO_FILE = "/proc/self/mem"  # reading it at offset 0 fails with EIO: that address is never mapped
TOGETHER = 15  # seconds: how far apart the two processes may end


def _write_tiny_policy(folder) -> None:
    import jax

    from bpo_jax.models import Decoder, init_params, save_pretrained

    cfg = tiny_model_config()
    save_pretrained(Decoder.from_params(cfg, init_params(cfg, jax.random.key(0))), None, str(folder))


@pytest.mark.skipif(not os.path.exists(EIO_FILE), reason="needs Linux's /proc/self/mem")
def test_one_hosts_failure_ends_every_host_alike(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_minisum_folder(tmp_path / "data", rows=4)
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for cwd in cwds:
        (cwd / "run" / "checkpoints").mkdir(parents=True)
        cfg = load_config(None, ["model=policy", f"data={data}", "run_dir=run"])
        save_config(cfg, str(cwd / "run" / "config.yaml"))
        (cwd / "policy").mkdir()
    (cwds[0] / "run" / "checkpoints" / "3").mkdir()  # listed by orbax as step 3; never read: loading fails first
    _write_tiny_policy(cwds[0] / "policy")
    (cwds[1] / "policy" / "config.json").symlink_to(EIO_FILE)

    results = run_group([["evaluate", "--checkpoint", "run"]] * 2, devices=2, cwd=cwds, allowed=(0, 1, 2),
                        straggle=2 * TOGETHER)
    line = "error: process 1: OSError: [Errno 5] Input/output error"
    for rc, out, _ in results:
        assert rc == 1 and line in out and "transient" in out, out[-2000:]
        assert "no checkpoint" not in out
    assert abs(results[0].seconds - results[1].seconds) < TOGETHER
