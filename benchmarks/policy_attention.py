"""Speed of each policy-attention form (dTPS / DynamicViT training), forward + backward.

At DeiT-S shapes (N = 197 tokens, 6 heads of 64, a policy keeping about 70%) times
the jitted gradient of sum(w * attention(q, k, v, policy)) with respect to q, k,
v and the policy, compile excluded, for each form of `ops.POLICY_FORMS`:
  exact      docs/method.md's float32 N x N weights, then weights @ v
  deferred   normalisation after the matmul (same values and gradients)
  log_bias   jax.nn.dot_product_attention with a log-policy bias (cuDNN on GPU);
             no 1e-6 smoothing and no policy gradient for dropped tokens
and plain softmax attention (`jax.nn.dot_product_attention`, no policy) as the floor.

  python -m benchmarks.policy_attention [--batch 256] [--dtype bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import tps_jax
from benchmarks import common
from tps_jax import timing


def main(argv=None):
  gpu = jax.default_backend() != "cpu"
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256 if gpu else 8)
  parser.add_argument("--tokens", type=int, default=197)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16" if gpu else "float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=20 if gpu else 5)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.tokens, args.heads, args.head_dim)
  q, k, v, w = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
  q = q * jnp.asarray(args.head_dim ** -0.5, dtype)
  policy = jnp.asarray(rng.random((args.batch, args.tokens)) < 0.7, jnp.float32)
  policy = policy.at[:, 0].set(1.0)

  def grad_of(attend):
    loss = lambda q, k, v, p: jnp.sum((w * attend(q, k, v, p)).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

  fns = {form: grad_of(lambda q, k, v, p, form=form: tps_jax.policy_attention(q, k, v, p,
                                                                                form=form))
         for form in tps_jax.ops.POLICY_FORMS}
  fns["no policy (floor)"] = grad_of(
      lambda q, k, v, p: jax.nn.dot_product_attention(q, k, v, scale=1.0))

  rows = []
  for name, fn in fns.items():
    rows.append({"form": name, **timing.time_call(fn, q, k, v, policy, repeats=args.repeats)})
  exact_s = rows[0]["median_s"]
  for row in rows:
    row["ms"] = 1e3 * row["median_s"]
    row["speed_vs_exact"] = exact_s / row["median_s"]
  print(f"B={args.batch} N={args.tokens} heads={args.heads}x{args.head_dim} {args.dtype}, "
        f"forward + backward, on {common.machine()['device_kind']}")
  common.print_table(rows, ["form", "ms", "speed_vs_exact"])
  common.write_json(f"policy_attention_{args.dtype}", {"args": vars(args), "rows": rows},
                    args.out)


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
