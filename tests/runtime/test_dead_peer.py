"""A dead peer ends the group in bounded time: two processes (2 CPU devices each) train; process 1 is SIGKILLed
mid-run (no chance to save or say goodbye); the survivor, blocked in the next collective, is ended by JAX's
coordination service once process 1's heartbeats stop, with a non-zero exit within ``cluster.DEAD_PEER_BOUND``
seconds of the kill. Both processes are then started again: they resume from the last checkpoint and the per-step
losses equal an uninterrupted single process with the same 4 devices.

The harness (``tests/multihost.py``) kills the whole group if the survivor outlives ``straggle``: nothing here can
hang CI.
"""

import signal
import time

import pytest

from bpo_jax.runtime import cluster
from multihost import assert_same_losses, losses, run_group
from testing import write_minisum_folder

pytestmark = pytest.mark.slow  # several processes or a fresh venv (pyproject.toml's markers)


STEPS = 6


@pytest.fixture(scope="module")
def setting(tiny_policy_and_rm, tmp_path_factory):
    data = write_minisum_folder(tmp_path_factory.mktemp("dp_data"), rows=10)
    policy, rm = tiny_policy_and_rm
    common = [f"model={policy}", f"data={data}", "annotator=reward_model", f"reward_model={rm}",
              f"total_steps={STEPS}", "num_phases=2", "batch_size=4", "reward_batch_size=4", "max_new_tokens=4",
              "eval_max_new_tokens=4", "eval_size=4", "eval_every=0", "lora_rank=2", "learning_rate=5e-3",
              "checkpoint_every=1", "seed=5"]
    return common, tmp_path_factory.mktemp("dp_runs")


def test_sigkilled_peer_ends_the_survivor_in_bounded_time_and_the_run_resumes(setting):
    common, runs = setting
    multi_dir, single_dir = runs / "multi", runs / "single"
    train = ["train", *common, f"run_dir={multi_dir}"]
    metrics, killed_at = multi_dir / "metrics.jsonl", []

    def mid_run() -> bool:
        if metrics.exists() and '"step": 2,' in metrics.read_text():
            killed_at.append(time.time())
            return True
        return False

    start = time.time()
    first = run_group([train, train], devices=2, signal_when=mid_run, signal=signal.SIGKILL, target=1,
                      allowed=range(-64, 256), straggle=150)
    survivor = first[0]
    waited = start + survivor.seconds - killed_at[0]
    assert first[1].returncode == -signal.SIGKILL
    assert survivor.returncode != 0, survivor.output[-2000:]
    assert waited <= cluster.DEAD_PEER_BOUND, (waited, survivor.output[-2000:])
    print(f"survivor exited with {survivor.returncode} {waited:.1f} s after the kill")
    stopped_at = max(losses(multi_dir))
    assert 2 <= stopped_at < STEPS

    second = run_group([train, train], devices=2)
    assert [r.returncode for r in second] == [0, 0], [r.output[-2000:] for r in second]
    assert f"resumed {multi_dir} at step" in second[0].output
    [(rc, out, _)] = run_group([["train", *common, f"run_dir={single_dir}"]], devices=4)
    assert rc == 0, out[-3000:]
    assert_same_losses(losses(multi_dir), losses(single_dir), range(1, STEPS + 1))
