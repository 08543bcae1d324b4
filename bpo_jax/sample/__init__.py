"""Sampling from a decoder on a mesh: the KV-cache sampler (``sampler``) and its per-step ops (``ops``)."""
