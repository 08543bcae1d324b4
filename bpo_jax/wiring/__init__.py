"""A run's wiring, between the commands (``bpo_jax.cli``) and the layers they join: the run's parts built from its
config (``tasks``: mesh, policy, reference, task, annotator) and its life around the online loop (``lifecycle``:
start-up checks, SFT start, evaluations, export). The one place that imports both ``train`` and ``eval``."""
