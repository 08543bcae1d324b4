"""The tasks as data: raw formats (``formats``), the official BPO files (``official``), tfds builders
(``builders``), prompt streams (``prompts``), the CPU demo's minisum task (``minisum``) and a run's task
(``tasks``: prompts, test set and annotator)."""
