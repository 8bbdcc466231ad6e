"""Input data: sources, host transforms, batching (grain), device augmentation. No TensorFlow.

Knows nothing of the models.

  source = get_source("fashion_mnist")
  batches = train_batches(source, "train", Preprocess(size=28, channels=1, ...),
                          local_batch=128, seed=0, start_step=step)    # uint8 on the host
  for batch in device_prefetch(batches, data_sharding):
    images = train_images(key, batch["image"], preprocess)             # in the jitted step
"""

from tps_jax.data.augment import eval_images, normalise, random_erasing, train_images
from tps_jax.data.mixing import Mixing, mix, mix_per_shard
from tps_jax.data.pipeline import (BAD_BUDGET, BadImages, device_prefetch, eval_batches,
                                   eval_steps, local_batch_size, steps_per_epoch, to_global,
                                   train_batches, train_dataset)
from tps_jax.data.preprocess import Preprocess
from tps_jax.data.sources import (ArraySource, FolderSource, TfdsSource, fashion_mnist_source,
                                  get_source, shard_bounds)
