"""Evaluation: the win rate on the test set (``win_rate``), annotators (``annotators``, the API ``judge``),
experiment grids (``experiment``) and plots (``plot``)."""
