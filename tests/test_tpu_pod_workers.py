"""launch/tpu_pod.sh end to end against the fake gcloud (tests/fake_gcloud.py), whose workers run the remote
commands locally, each in its own home: copy (staged through gs:// once), run, status and logs on one slice and on
two, and --env's secrets reaching the training and no log."""

import os
import shutil
import subprocess
import time

import pytest

from fake_gcloud import TPU, TRAIN, dry_run, executable, fake_gcloud_env, gcloud_calls, run_launcher


@pytest.fixture
def fake(tmp_path):
    """PATH with the fake gcloud (and a marker: sbatch/srun/scontrol fail loudly if called); (tmp_path, env)."""
    return fake_gcloud_env(tmp_path)


def test_tpu_copy_stages_local_folders_once(fake):
    """With --stage a local model folder and file go up once (not once per worker) and each worker fetches them
    from the stage; a second copy with nothing changed uploads nothing (the workers still fetch: a recreated
    slice's new VMs get the files), and a changed file (same size) is uploaded again."""
    tmp_path, env = fake
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        home.mkdir()
    model, tok = tmp_path / "gemma", tmp_path / "tok.json"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"one")
    tok.write_text("t")
    copy = ["copy", "--stage", "gs://bkt/stage/", "--model-dir", f"{model}:models/gemma-2b",
            "--data-dir", f"{tok}:data/tok.json"]

    def uploads():  # storage calls that send a file or folder of this machine, since the last call
        calls = gcloud_calls(tmp_path)
        (tmp_path / "gcloud.log").unlink()
        assert not [c for c in calls if c[2:4] == ["tpu-vm", "scp"] and "bpo_jax-src" not in c[4]], calls
        return [c[1:-1] for c in calls if c[:2] in (["storage", "rsync"], ["storage", "cp"])
                and not c[-2].startswith("gs://") and c[-2] != "-"]

    def fetched(weights: bytes):
        for home in homes:
            assert (home / "bpo_jax/models/gemma-2b/sub/w.bin").read_bytes() == weights
            assert (home / "bpo_jax/models/gemma-2b/config.json").read_text() == "{}"
            assert (home / "bpo_jax/data/tok.json").read_text() == "t"

    run_launcher(TPU, copy, env)
    assert uploads() == [["rsync", "--recursive", "--delete-unmatched-destination-objects", str(model)],
                         ["cp", str(tok)]]
    fetched(b"one")
    shutil.rmtree(homes[1] / "bpo_jax/models")  # as on a re-created VM
    out = run_launcher(TPU, copy, env)
    assert uploads() == [] and out.stdout.count("unchanged since it was staged in gs://bkt/stage/bpo_jax/") == 2
    fetched(b"one")
    (model / "sub" / "w.bin").write_bytes(b"two")
    run_launcher(TPU, copy, env)
    assert uploads() == [["rsync", "--recursive", "--delete-unmatched-destination-objects", str(model)]]
    fetched(b"two")

    dry = "\n".join(dry_run(copy, env))
    assert f"gcloud storage rsync --recursive --delete-unmatched-destination-objects {model} " \
           "gs://bkt/stage/bpo_jax/models/gemma-2b" in dry
    assert "gcloud storage rsync --recursive gs://bkt/stage/bpo_jax/models/gemma-2b bpo_jax/models/gemma-2b" in dry


def _quiet_worker_bin(tmp_path):
    """A PATH folder for fake workers with nothing running: sudo succeeds; pgrep, pkill and lsof find nothing."""
    bin_w = tmp_path / "worker_bin"
    bin_w.mkdir()
    executable(bin_w / "sudo", "#!/bin/sh\nexit 0\n")
    for name in ("pgrep", "pkill", "lsof"):
        executable(bin_w / name, "#!/bin/sh\nexit 1\n")
    return bin_w


def test_tpu_multislice_run_status_and_logs_on_fake_workers(fake):
    """Two slices of two fake workers: run starts the training on all four with their slice's MEGASCALE_*
    variables (the coordinator's address from gcloud), status reports four workers, logs fetches four logs."""
    tmp_path, env = fake
    bin_w = _quiet_worker_bin(tmp_path)
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_NODES="bpo-pod-0,bpo-pod-1",
               FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}")
    homes = [tmp_path / f"bpo-pod-{s}" / f"w{i}" for s in range(2) for i in range(2)]
    for home in homes:
        venv = home / "bpo_jax/.venv/bin"
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        executable(venv / "python", '#!/bin/sh\nenv | grep ^MEGASCALE_ | sort > "$HOME/megascale"\necho training\n')
    two = ["--num-slices", "2", "--workers", "2"]
    run_launcher(TPU, ["run", *two, "--", *TRAIN], env)
    deadline = time.time() + 20
    while not all((h / "bpo_logs/bpo-pod.rc").exists() for h in homes) and time.time() < deadline:
        time.sleep(0.05)
    for k, home in enumerate(homes):
        assert (home / "megascale").read_text().splitlines() == [
            "MEGASCALE_COORDINATOR_ADDRESS=10.130.0.2:8080", "MEGASCALE_NUM_SLICES=2", "MEGASCALE_PORT=8080",
            f"MEGASCALE_SLICE_ID={k // 2}"]
    out = run_launcher(TPU, ["status", *two], env)
    assert out.stdout.count("exited with code 0") == 4
    out = run_launcher(TPU, ["logs", *two], env)
    for s in range(2):
        for i in range(2):
            assert f"slice {s} worker {i}: exit code 0\n" in out.stdout
            assert "training" in (tmp_path / f"fetched/slice-{s}-worker-{i}.log").read_text()


SECRET = "s3cr3t 'q' $HOME \"x\" `id`"  # quotes, a variable and a command: sent as a value, never run


def test_tpu_env_reaches_the_training_and_no_log(fake):
    """--env HF_TOKEN --env WANDB_API_KEY (run under `bash -x`): every worker's training sees both values as this
    shell has them; the file that carried them was mode 600 and is gone on both sides; no value appears in the
    output, the xtrace, gcloud's argv, the workers' logs or a file left in TMPDIR."""
    tmp_path, env = fake
    bin_w = _quiet_worker_bin(tmp_path)
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}",
               HF_TOKEN=SECRET, WANDB_API_KEY="wandb-key-42")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        venv = home / "bpo_jax/.venv/bin"
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        executable(venv / "python", '#!/bin/sh\nprintf "%s\\n" "$HF_TOKEN" "$WANDB_API_KEY" > "$HOME/seen"\n'
                                    'ls -A "$HOME" > "$HOME/home"\necho training\n')
    out = subprocess.run(["bash", "-x", str(TPU), "run", "--workers", "2", "--env", "HF_TOKEN", "--env=WANDB_API_KEY",
                          "--", *TRAIN], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.time() + 20
    while not all((h / "bpo_logs/bpo-pod.rc").exists() for h in homes) and time.time() < deadline:
        time.sleep(0.05)
    for home in homes:
        assert (home / "seen").read_text() == f"{SECRET}\nwandb-key-42\n"
        assert ".bpo_jax-env" not in (home / "home").read_text().split()  # removed before the training started
    (sent,) = {line.rsplit(" ", 1)[0] for line in (tmp_path / "scp_modes").read_text().splitlines()}
    assert (tmp_path / "scp_modes").read_text().split()[1::2] == ["600", "600"]  # one upload (--worker=all), 2 homes
    assert not os.path.exists(sent) and not list(tmp_path.glob("bpo_jax-env-*"))
    assert "--env HF_TOKEN WANDB_API_KEY" in out.stdout and "+ read_env_flags " in out.stderr  # traced, not the values
    logs = [(tmp_path / "gcloud.log").read_text(), out.stdout, out.stderr,
            *((h / "bpo_logs/bpo-pod.log").read_text() for h in homes)]
    assert not [text for text in logs if "s3cr3t" in text or "wandb-key-42" in text]
    dry = run_launcher(TPU, ["--dry-run", "run", "--num-slices", "2", "--workers", "2", "--env", "HF_TOKEN", "--",
                             *TRAIN], env).stdout
    assert [line.split()[6:8] for line in dry.splitlines() if " tpu-vm scp " in line] == [
        [f"{tmp_path}/bpo_jax-env-XXXXXX", f"bpo-pod-{s}:.bpo_jax-env"] for s in range(2)]
    assert dry.count("--command='. ./.bpo_jax-env && rm -f .bpo_jax-env && cd bpo_jax && ") == 2
    assert "s3cr3t" not in dry and not list(tmp_path.glob("bpo_jax-env-*"))


@pytest.mark.slow
def test_tpu_end_to_end_on_fake_workers(fake):
    """copy, run, status, logs and a failing run, with each worker's commands run by bash in its own home."""
    tmp_path, env = fake
    bin_w = tmp_path / "worker_bin"  # what the workers have that this machine may not: sudo, and no TPU
    bin_w.mkdir()
    executable(bin_w / "sudo", "#!/bin/sh\nexit 0\n")
    for name in ("pgrep", "pkill", "lsof"):
        executable(bin_w / name, "#!/bin/sh\nexit 1\n")
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        home.mkdir()
    model = tmp_path / "gemma"
    model.mkdir()
    (model / "config.json").write_text("{}")

    run_launcher(TPU, ["copy", "--model-dir", f"{model}:models/gemma-2b"], env)
    for home in homes:
        assert (home / "bpo_jax/launch/_setup.sh").is_file() and (home / "bpo_jax/configs/tldr_gemma2b.yaml").is_file()
        assert (home / "bpo_jax/models/gemma-2b/config.json").read_text() == "{}"
        venv = home / "bpo_jax/.venv/bin"  # what `setup` would have made
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        executable(venv / "python", '#!/bin/sh\nprintf "%s\\n" "$PWD" "$@" > "$HOME/argv"\necho training\n'
                                    'exit "${FAKE_TRAIN_RC:-0}"\n')

    def run_and_wait(rc):
        for home in homes:
            (home / "argv").unlink(missing_ok=True)
        run_launcher(TPU, ["run", "--type", "v4-16", "--", *TRAIN, "note=a b"], dict(env, FAKE_TRAIN_RC=str(rc)))
        deadline = time.time() + 20
        while not all((h / "bpo_logs/bpo-pod.rc").exists() for h in homes) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        for home in homes:
            argv = (home / "argv").read_text().splitlines()
            assert argv == [str(home / "bpo_jax"), "-m", "bpo_jax", "train", *TRAIN, "note=a b"]
            assert (home / "bpo_logs/bpo-pod.rc").read_text().strip() == str(rc)

    run_and_wait(0)
    out = run_launcher(TPU, ["status"], env)
    assert out.stdout.count("exited with code 0") == 2 and "ACTIVE" in out.stdout
    out = run_launcher(TPU, ["logs", "--type", "v4-16"], env)
    for i in range(2):
        text = (tmp_path / f"fetched/worker-{i}.log").read_text()
        assert "training" in text and "[bpo_jax] exit code 0" in text
    assert "worker 1: exit code 0\n" in out.stdout

    run_and_wait(3)
    out = run_launcher(TPU, ["status"], env, check=False)
    assert out.returncode != 0 and "exited with code 3" in out.stdout and "failed" in out.stderr
    out = run_launcher(TPU, ["logs", "--type", "v4-16"], env, check=False)
    assert out.returncode != 0 and "worker 1: exit code 3 (run 2 in the log; earlier runs: 0)" in out.stdout
    for i in range(2):  # each run's log follows its header: the second run appended to the first's
        lines = (tmp_path / f"fetched/worker-{i}.log").read_text().splitlines()
        assert [line.split()[:3] for line in lines if line.startswith("[")] == [
            ["[tpu_pod]", "run", "started"], ["[bpo_jax]", "exit", "code"]] * 2
        assert lines[-1] == "[bpo_jax] exit code 3" and lines.count("training") == 2
