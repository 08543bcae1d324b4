"""bpo_jax: BPO (behavior-LLM proximity) online preference optimisation in JAX/Flax.

The loss library (``bpo_jax.losses``) is pure JAX and imports nothing else from the package, so other JAX
code can use it on its own: ``from bpo_jax.losses import dap_loss``.
"""

__version__ = "0.1.0"
