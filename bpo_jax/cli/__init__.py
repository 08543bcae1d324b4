"""The ``python -m bpo_jax`` commands, one module each: thin entry points over the library."""
