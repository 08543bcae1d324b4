"""The paper's tasks as data: raw formats (``formats``), tfds builders (``builders``) and prompt streams for the
online loop (``prompts``)."""
