"""A BPO run's settings: ``TrainConfig`` (grouped by concern, checked when built), loaded from YAML and
``key=value`` overrides; ``StepConfig``, what the jitted step computes with. See ``groups`` for every key."""

from bpo_jax.config.groups import ANNOTATORS, GROUPS, REFERENCES, TFDS_TASKS, ConfigError
from bpo_jax.config.loading import load_config, save_config
from bpo_jax.config.train_config import (
    KEY_GROUP,
    RESUMABLE_KEYS,
    StepConfig,
    TrainConfig,
    run_identity_changes,
    validate_for_model,
    validate_for_processes,
)

__all__ = ["ANNOTATORS", "GROUPS", "KEY_GROUP", "REFERENCES", "RESUMABLE_KEYS", "TFDS_TASKS", "ConfigError",
           "StepConfig", "TrainConfig", "load_config", "run_identity_changes", "save_config", "validate_for_model",
           "validate_for_processes"]
