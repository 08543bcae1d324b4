"""Config loading: shipped YAML files validate, overrides coerce types, and errors name the key."""

import glob
import os

import pytest

from bpo_jax.config import ConfigError, TrainConfig, load_config

ROOT = os.path.dirname(os.path.dirname(__file__))


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
