"""Training library: losses, optimizer, sharding, checkpoints, the loop.

  from tps_jax.trainer import loop
  loop.train_and_evaluate(config, workdir)
"""
