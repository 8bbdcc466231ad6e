"""Flax modules and models built on `tps_jax.ops`."""
