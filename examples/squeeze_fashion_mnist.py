"""Token reduction on real image tokens: how much of an image survives each method?

Each Fashion-MNIST test image, normalised as a ViT's input is (mean 0.286, std
0.353), is cut into 4x4-pixel patches: 49 tokens of 16 values (plus a cls
token, the image mean). Patch scores come from a fixed
proxy for cls attention: softmax of the cosine between each patch and the cls
token. Each method then keeps `k` of the 49 patches, and the image is rebuilt by
drawing every patch as the token that now stands for it:

  prune  (top-k / DynamicViT style)  kept patches themselves; pruned ones lost
         (drawn as the mean of the kept tokens)
  evit   pruned patches drawn as EViT's fused token (renormalised)
  tome   every patch drawn as the merged token it went into
  tps    kept patches squeezed; each pruned patch drawn as its host

The error of the rebuilt image against the original (mean squared, in pixel
units of [0, 1]) measures what each reduction kept of the image. All operators run
jitted, batched, on static shapes.

  python examples/squeeze_fashion_mnist.py [--images 2000] [--patch 4]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

import tps_jax
from tps_jax.data import fashion_mnist


MEAN, STD = 0.286, 0.353  # Fashion-MNIST pixel statistics


def patchify(images, p):
  b, h, w = images.shape
  x = images.reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
  return x.reshape(b, (h // p) * (w // p), p * p)


def reconstruct(images: jax.Array, keep: int, method: str, patch: int) -> jax.Array:
  """images (B, H, W) normalised -> per-patch tokens each method leaves, (B, N, p*p)."""
  x = patchify(images, patch)  # (B, N, C)
  b, n, _ = x.shape
  cls = jnp.mean(x, axis=1, keepdims=True)
  scores = jax.nn.softmax(tps_jax.cosine_similarity(cls, x)[:, 0] * 8.0, axis=-1)  # (B, N)
  keep_idx, prune_idx = tps_jax.topk_split(scores, keep)
  kept, pruned = tps_jax.gather_tokens(x, keep_idx), tps_jax.gather_tokens(x, prune_idx)

  def place(tokens_for_kept, tokens_for_pruned):
    out = jnp.zeros_like(x)
    out = out + jnp.einsum("bkn,bkc->bnc", jax.nn.one_hot(keep_idx, n), tokens_for_kept)
    return out + jnp.einsum("bkn,bkc->bnc", jax.nn.one_hot(prune_idx, n), tokens_for_pruned)

  if method == "prune":
    fill = jnp.mean(kept, axis=1, keepdims=True)
    return place(kept, jnp.broadcast_to(fill, pruned.shape))
  if method == "evit":
    weight = jnp.take_along_axis(scores, prune_idx, 1)
    fused = tps_jax.evit_fuse(pruned, weight) / jnp.sum(weight, 1)[:, None, None]
    return place(kept, jnp.broadcast_to(fused, pruned.shape))
  if method == "tps":
    squeezed, host = tps_jax.squeeze_with_hosts(kept, pruned)
    return place(squeezed, tps_jax.gather_tokens(squeezed, host))
  if method == "tome":
    # Merge the patches (cls first so it is protected), tracking which patch went where.
    seq = jnp.concatenate([cls, x], 1)
    source = jnp.eye(n + 1)[None].repeat(b, 0)  # (B, N+1, N+1): token i holds patch i
    size = None
    while seq.shape[1] - 1 > keep:  # static: how many rounds is fixed by the shapes
      r = min(seq.shape[1] - 1 - keep, tps_jax.max_merge(seq.shape[1]))
      match = tps_jax.bipartite_soft_matching(seq, r)
      source = tps_jax.merge_sum(source, match)
      seq, size = tps_jax.merge_wavg(seq, size, match)
    # Each original patch is drawn as the token whose source contains it.
    return jnp.einsum("btn,btc->bnc", source[:, :, 1:], seq)
  raise ValueError(f"unknown method {method!r}; expected prune, evit, tome or tps.")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--patch", type=int, default=4)
  parser.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
  args = parser.parse_args(argv)

  images, labels = fashion_mnist.load("test")
  images = (jnp.asarray(images[: args.images], jnp.float32) / 255.0 - MEAN) / STD
  n = (28 // args.patch) ** 2
  truth = patchify(images, args.patch)
  methods = ("prune", "evit", "tome", "tps")
  print(f"{args.images} Fashion-MNIST test images, {n} patch tokens of "
        f"{args.patch}x{args.patch} pixels; image MSE after reduction (lower keeps more)")
  print(f"{'keep':>5} {'tokens':>6}  " + "  ".join(f"{m:>8}" for m in methods) +
        "   tps vs prune")
  for ratio in args.keep:
    k = tps_jax.keep_counts(n, ratio, 1)[0]
    errs = {}
    for m in methods:
      fn = jax.jit(lambda im, m=m, k=k: reconstruct(im, k, m, args.patch))
      rebuilt = jax.block_until_ready(fn(images))
      errs[m] = float(jnp.mean((rebuilt - truth) ** 2)) * STD**2
    print(f"{ratio:>5} {k:>6}  " + "  ".join(f"{errs[m]:8.5f}" for m in methods) +
          f"   {errs['prune'] / errs['tps']:.2f}x lower")


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
