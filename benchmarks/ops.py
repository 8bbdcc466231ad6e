"""Cost of each token-reduction operator beside one transformer block.

At DeiT-S shapes (B=64, N=196 patches + cls, C=384, 6 heads, keep 137) times,
jitted and compile excluded, the median of repeats of:
  block          one Encoder1DBlock forward over all tokens
  topk           top-k split of cls scores + gather of the kept tokens (plain pruning)
  evit           top-k split + gathers + EViT fusion of the pruned tokens
  tome           ToMe matching + size-weighted merge of r = 196 - 137 tokens
  tps            top-k split + gathers + squeeze (inference form)
  tps_masked     squeeze_masked over all tokens with 0/1 keep / pruned masks (training form)
and reports each as a fraction of the block. Target: TPS adds at most 10% of a block.

  python -m benchmarks.ops [--batch 64] [--dtype float32] [--repeats 10] [--out FILE]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import tps_jax
from benchmarks import common
from tps_jax import timing
from tps_jax.models.layers import Encoder1DBlock


def reduction_fns(keep: int):
  """Each operator as a function of (x (B, 1 + N, C), scores (B, N))."""

  def split(x, scores):
    keep_idx, prune_idx = tps_jax.topk_split(scores, keep)
    cls, patches = x[:, :1], x[:, 1:]
    return cls, tps_jax.gather_tokens(patches, keep_idx), tps_jax.gather_tokens(patches, prune_idx), prune_idx

  def topk(x, scores):
    cls, kept, _, _ = split(x, scores)
    return jnp.concatenate([cls, kept], 1)

  def evit(x, scores):
    cls, kept, pruned, prune_idx = split(x, scores)
    fused = tps_jax.evit_fuse(pruned, jnp.take_along_axis(scores, prune_idx, 1))
    return jnp.concatenate([cls, kept, fused], 1)

  def tome(x, scores):
    del scores
    match = tps_jax.bipartite_soft_matching(x, x.shape[1] - 1 - keep)
    return tps_jax.merge_wavg(x, None, match)[0]

  def tps(x, scores):
    cls, kept, pruned, _ = split(x, scores)
    return jnp.concatenate([cls, tps_jax.squeeze(kept, pruned)], 1)

  def tps_masked(x, scores):
    keep_idx, _ = tps_jax.topk_split(scores, keep)
    live = tps_jax.indices_to_mask(keep_idx, scores.shape[1])
    keep_mask = jnp.pad(live, ((0, 0), (1, 0)), constant_values=1.0)
    return tps_jax.squeeze_masked(x, keep_mask, 1.0 - keep_mask)

  return {"topk": topk, "evit": evit, "tome": tome, "tps": tps, "tps_masked": tps_masked}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=196)
  parser.add_argument("--width", type=int, default=384)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--keep", type=int, default=137)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, 1 + args.tokens, args.width)), dtype)
  scores = jnp.asarray(rng.random((args.batch, args.tokens)), jnp.float32)

  block = Encoder1DBlock(mlp_dim=4 * args.width, num_heads=args.heads, dtype=dtype)
  params = block.init(jax.random.key(0), x[:1])
  block_fn = jax.jit(lambda p, x: block.apply(p, x))

  rows = [{"op": "block", **timing.time_call(block_fn, params, x, repeats=args.repeats)}]
  for name, fn in reduction_fns(args.keep).items():
    rows.append({"op": name, **timing.time_call(jax.jit(fn), x, scores, repeats=args.repeats)})
  block_s = rows[0]["median_s"]
  topk_s = rows[1]["median_s"]
  for row in rows:
    row["ms"] = 1e3 * row["median_s"]
    row["pct_of_block"] = 100.0 * row["median_s"] / block_s
    # What squeezing adds beyond the pruning it replaces.
    row["pct_over_topk"] = 100.0 * (row["median_s"] - topk_s) / block_s if row["op"] != "block" else 0.0

  print(f"B={args.batch} N={args.tokens}+1 C={args.width} keep={args.keep} {args.dtype} "
        f"on {common.machine()['device_kind']}")
  common.print_table(rows, ["op", "ms", "pct_of_block", "pct_over_topk"])
  common.write_json(f"ops_{args.dtype}", {"args": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
