"""Config loading: shipped YAML files validate, overrides coerce types, and errors name the key."""

import dataclasses
import glob
import os

import pytest

from bpo_jax.config import ConfigError, TrainConfig, load_config
from testing import ROOT


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.total_steps % cfg.num_phases == 0


def test_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("total_steps: 8\nnum_phases: 4\nlora_targets: [q_proj, v_proj]\n")
    cfg = load_config(str(f), ["beta=0.5", "remat=true", "lora_rank=4", "run_dir=/tmp/x", "num_phases=2"])
    assert (cfg.total_steps, cfg.num_phases, cfg.steps_per_phase) == (8, 2, 4)
    assert cfg.beta == 0.5 and cfg.remat == "full" and cfg.run_dir == "/tmp/x"
    assert cfg.lora_targets == ("q", "v") and cfg.lora_scale == 16.0 / 4
    assert TrainConfig().replace(reference="sft").reference == "sft"


@pytest.mark.parametrize("text, message", [
    ("total_stepz: 3\n", "unknown config key 'total_stepz'"),
    ("- a\n- b\n", "must hold a mapping"),
    ("beta: [1\n", "is not valid YAML"),
    ("micro_batches: 3\nbatch_size: 8\n", "must be a positive multiple of micro_batches=3"),
    ("reference: fixed\n", "reference=fixed needs reference_path"),
    ("loss_type: hinge\nlabel_smoothing: 0.1\n", "has no effect for loss_type 'hinge'"),
    ("temperature: -1\n", "use a temperature > 0"),
    ("attention: flash\n", "attention='flash'; valid: xla, cudnn"),
    ("attention: cudnn\ndtype: float32\n", "attention=cudnn needs dtype bfloat16 or float16"),
    ("loss_type: aot\nmicro_batches: 2\n", "loss_type=aot couples the pairs of a batch"),
    ("loss_type: bco_pair_batchmean\nmicro_batches: 4\n", "use micro_batches=1"),
    ("tied_pairs: first\n", "tied_pairs='first'; valid: drop, second"),
    ("eval_reward_max_length: -1\n", "eval_reward_max_length >= 0"),
])
def test_errors_name_the_problem(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(f))


# ---- the groups ------------------------------------------------------------------------------------------------

def test_every_setting_lives_in_one_group_with_its_help():
    from bpo_jax.config import GROUPS, KEY_GROUP

    fields = [f for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(fields) == len(KEY_GROUP) == len(TrainConfig().to_flat())  # no key in two groups
    assert not set(GROUPS) & set(KEY_GROUP)  # a group name is never a flat key
    for f in fields:
        assert f.metadata["help"].strip() and isinstance(f.metadata["resumable"], bool), f.name


def test_flat_grouped_and_dotted_forms_are_one_setting(tmp_path):
    from bpo_jax.config.groups import Loss, Schedule

    flat = TrainConfig(beta=0.2, total_steps=8, num_phases=4)
    grouped = TrainConfig(loss=Loss(beta=0.2), schedule=Schedule(total_steps=8, num_phases=4))
    assert flat == grouped and hash(flat) == hash(grouped) and flat.loss.beta == flat.beta == 0.2
    assert TrainConfig(loss=Loss(beta=0.3), beta=0.2).beta == 0.2  # a flat key wins over its group's value
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  beta: 0.2\nschedule: {total_steps: 8}\nnum_phases: 4\n")
    assert load_config(str(f)) == flat
    assert load_config(None, ["loss.beta=0.2", "schedule.total_steps=8", "num_phases=4"]) == flat
    assert flat.replace(**{"beta": 0.5}).loss == Loss(beta=0.5)
    with pytest.raises(ConfigError, match="beta is in group 'loss', not 'sampling'"):
        load_config(None, ["sampling.beta=0.2"])
    with pytest.raises(ConfigError, match="unknown config group 'losses'"):
        load_config(None, ["losses.beta=0.2"])
    with pytest.raises(AttributeError, match="no setting 'betta'"):
        _ = flat.betta


def test_save_and_load_round_trip_every_key(tmp_path):
    from bpo_jax.config import save_config

    cfg = TrainConfig(lora_rank=4, lora_targets=("q_proj", "v"), mesh_device_ids=(1, 0), tracker="none", beta=0.3)
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_a_resume_may_change_only_the_resumable_keys():
    from bpo_jax.config import RESUMABLE_KEYS, run_identity_changes

    cfg = TrainConfig()
    assert {"run_dir", "eval_every", "eval_size", "checkpoint_every", "mesh_data", "remat", "micro_batches",
            "tracker", "judge_timeout"} <= set(RESUMABLE_KEYS)
    assert not {"beta", "total_steps", "num_phases", "reference", "seed", "model", "lora_rank", "learning_rate",
                "temperature", "annotator", "tied_pairs", "data"} & set(RESUMABLE_KEYS)
    assert run_identity_changes(cfg, cfg.replace(run_dir="/elsewhere", eval_every=3, remat="dots")) == []
    assert run_identity_changes(cfg, cfg.replace(beta=0.5, seed=2)) == ["beta: 0.1 -> 0.5", "seed: 0 -> 2"]


def test_the_step_config_holds_only_what_the_step_computes_with():
    """A change to an evaluation, checkpoint, run, data, annotator or mesh key leaves the jitted step's static
    argument equal (so it cannot cause a compilation); a change to the loss, reference, LoRA, optimizer or
    numerics changes it."""
    cfg = TrainConfig(lora_rank=4)
    operational = cfg.replace(eval_every=2, eval_size=8, eval_batch_size=4, run_dir="/x", checkpoint_every=3,
                              keep_checkpoints=1, export_policy=False, mesh_data=2, seed=5, data="tldr",
                              reward_model="rm", tied_pairs="second", num_phases=4, max_new_tokens=9)
    assert operational.step_config == cfg.step_config and hash(operational.step_config) == hash(cfg.step_config)
    for change in ({"beta": 0.2}, {"reference": "sft"}, {"lora_rank": 8}, {"learning_rate": 1e-3},
                   {"remat": "full"}, {"micro_batches": 2}, {"total_steps": 32}):
        assert cfg.replace(**change).step_config != cfg.step_config, change


@pytest.mark.parametrize("cmd", [
    "total_steps=2 batch_size=4 eval_size=8 run_dir=runs/ci_smoke", "total_steps=4 reference=sft",
    "num_phases=1 reference=sft run_dir=runs/offline"])
def test_the_readme_overrides_load(cmd):
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert cmd in readme  # the README's own command lines, as a user types them
    cfg = load_config(os.path.join(ROOT, "configs", "smollm2_cpu_demo.yaml"), cmd.split())
    assert all(str(getattr(cfg, k)) == v for k, v in (kv.split("=") for kv in cmd.split()))


def test_discopop_tau_is_a_loss_key_that_reaches_the_loss():
    assert load_config(None, ["loss_type=discopop", "loss.discopop_tau=0.2"]).step_config.loss.discopop_tau == 0.2
    with pytest.raises(ConfigError, match="discopop_tau must be > 0"):
        load_config(None, ["loss_type=discopop", "discopop_tau=0"])
