"""The tasks as data: raw formats (``formats``), the official BPO files (``official``), tfds builders
(``builders``), prompt streams (``prompts``), the CPU demo's minisum task (``minisum``), SFT rows (``sft``) and TRL's
dataset formats (``trl_formats``). A run's task is built from them a layer above (``bpo_jax.wiring.tasks``)."""
