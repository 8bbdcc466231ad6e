"""The GPU paths against the portable ones, on a CUDA GPU (skipped elsewhere).

What the CPU suite can only check through XLA (the cuDNN padding, the fused policy form,
the histogram's matmul) runs here on the kernels the train step uses, in bfloat16. bf16
results are held to float32 references with a relative error no larger than XLA's own bf16
composition makes (plus a small margin), so a wrong mask, scale or padding fails, rounding
does not. Run on the lent machine: `python3 -m pytest -q tests/test_gpu.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps
import pytest

import tps_jax
from tps_jax.models.vit import Model
from tps_jax.data import randaugment as ra

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")

B, N, H, D = 4, 197, 6, 64  # DeiT-S attention at 224 px: odd N, as cuDNN must pad
BF16 = jnp.bfloat16


def _rel(got, want) -> float:
  got, want = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (got, want))
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _qkv(seed):
  """Pre-scaled queries, keys, values whose logits q.k centre on -4, so that a key the padding
  leaves unmasked (logit 0, value 0) shows: breaking the mask through XLA gave a relative error
  of 0.22 against the bound of about 0.01."""
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, N, H, D)) / np.sqrt(D) - 4.0 / D
  return q, jax.random.normal(keys[1], (B, N, H, D)) + 1.0, jax.random.normal(keys[2], (B, N, H, D))


def _policy(seed, keep=0.5):
  pi = (jax.random.uniform(jax.random.key(seed), (B, N)) < keep).astype(jnp.float32)
  return pi.at[:, 0].set(1.0)


def _grads(fn, q, k, v, *rest):
  w = jax.random.normal(jax.random.key(99), q.shape)
  loss = lambda q, k, v, *r: jnp.sum(w * fn(q, k, v, *r).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=tuple(range(3 + len(rest)))))(q, k, v, *rest)


@pytest.mark.parametrize("bias_kind", ["none", "key_bias", "log_policy"])
def test_cudnn_attention_matches_xla(bias_kind):
  q, k, v = _qkv(0)
  bias = {"none": None,
          "key_bias": jax.random.normal(jax.random.key(1), (B, 1, 1, N)),  # as ToMe's sizes
          "log_policy": tps_jax.ops.attention._log_policy_bias(_policy(2), N, jnp.float32),
          }[bias_kind]

  def attend(impl, dtype):
    b = None if bias is None else bias.astype(dtype)
    return lambda q, k, v: tps_jax.ops.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), bias=b, scale=1.0,
        implementation=impl)

  ref = attend("xla", jnp.float32)(q, k, v)
  xla, cudnn = attend("xla", BF16)(q, k, v), jax.jit(attend("cudnn", BF16))(q, k, v)
  assert cudnn.shape == (B, N, H, D) and cudnn.dtype == BF16
  assert _rel(cudnn, ref) <= 2 * _rel(xla, ref) + 2e-3, (_rel(cudnn, ref), _rel(xla, ref))
  g_ref = _grads(attend("xla", jnp.float32), q, k, v)
  g_xla, g_cudnn = _grads(attend("xla", BF16), q, k, v), _grads(attend("cudnn", BF16), q, k, v)
  for name, r, x, c in zip("qkv", g_ref, g_xla, g_cudnn):
    assert _rel(c, r) <= 2 * _rel(x, r) + 2e-3, (name, _rel(c, r), _rel(x, r))


@pytest.mark.parametrize("form", ["fused", "log_bias"])
def test_policy_forms_on_cudnn_match_exact(form):
  # dTPS training attention on cuDNN in bf16 against the exact form in float32: values, the
  # q/k/v gradients, and (fused only: log_bias cuts it) the policy gradient.
  q, k, v = _qkv(3)
  pi = _policy(4)
  soft = jax.random.uniform(jax.random.key(5), (B, N))

  def attend(form, impl, dtype):
    def fn(q, k, v, s):
      p = pi - jax.lax.stop_gradient(s) + s  # straight-through, as dTPS trains
      return tps_jax.policy_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), p,
                                      form=form, implementation=impl)
    return fn

  ref = _grads(attend("exact", "xla", jnp.float32), q, k, v, soft)
  xla = _grads(attend("exact", "xla", BF16), q, k, v, soft)
  got = _grads(attend(form, "cudnn", BF16), q, k, v, soft)
  out_ref = attend("exact", "xla", jnp.float32)(q, k, v, soft)
  out_xla = attend("exact", "xla", BF16)(q, k, v, soft)
  out = jax.jit(attend(form, "cudnn", BF16))(q, k, v, soft)
  assert _rel(out, out_ref) <= 2 * _rel(out_xla, out_ref) + 2e-3
  names = "qkv" + ("p" if form == "fused" else "")
  for name, r, x, c in zip(names, ref, xla, got):
    assert _rel(c, r) <= 2 * _rel(x, r) + 5e-3, (name, _rel(c, r), _rel(x, r))


@pytest.mark.parametrize("method", ["none", "dtps", "etps"])
def test_model_on_cudnn_matches_einsum(method):
  # A 3-block DeiT-S in bf16 with attention="auto" (cuDNN here; dTPS in the fused policy
  # form) against float32 einsums (dTPS exact), and XLA's bf16 attention as the yardstick.
  reduction = method if method == "none" else dict(method=method, locations=(1,))
  kw = dict(variant="S/16", depth=3, image_size=64, reduction=reduction, gumbel_noise=False)
  images = jax.random.uniform(jax.random.key(6), (8, 64, 64, 3))
  model = Model(10, **kw)
  params = jax.jit(model.init)(jax.random.key(7), images)["params"]
  ref, _ = jax.jit(lambda p, x: Model(10, attention="einsum", **kw).apply(
      {"params": p}, x, train=True, rngs={"gumbel": jax.random.key(0)}))(params, images)
  run = lambda attention: jax.jit(lambda p, x: Model(
      10, attention=attention, dtype=BF16, policy_form="fused", **kw).apply(
          {"params": p}, x, train=True, rngs={"gumbel": jax.random.key(0)}))(params, images)[0]
  auto, xla = run("auto"), run("xla")
  assert _rel(auto, ref) <= 2 * _rel(xla, ref) + 1e-2, (_rel(auto, ref), _rel(xla, ref))


def test_histogram_on_the_gpu_counts_exactly():
  yy, xx = np.mgrid[0:224, 0:224]
  smooth = np.stack([(xx + yy) % 256, xx % 7, np.full_like(xx, 255)], -1)
  images = jnp.asarray(np.stack([smooth, np.random.default_rng(0).integers(0, 256, smooth.shape)]),
                       jnp.float32)
  count = jax.jit(jax.vmap(jax.vmap(ra.histogram, in_axes=-1)))
  want = np.stack([[np.bincount(np.asarray(im[..., c], int).ravel(), minlength=256)
                    for c in range(3)] for im in np.asarray(images)])
  np.testing.assert_array_equal(np.asarray(count(images)), want)


def test_equalize_on_the_gpu_is_pils():
  # The op as RandAugment runs it (the matmul histogram here), against PIL, to the pixel.
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[0:64, 0:48]
  smooth = np.stack([xx * 5, yy * 3, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
  noise = rng.normal(120, 40, (64, 48, 3)).clip(0, 255).astype(np.uint8)
  op = jax.jit(lambda x: ra.OPS["Equalize"](x, 5.0, jax.random.key(0)))
  for image in (smooth, noise):
    want = np.asarray(ImageOps.equalize(Image.fromarray(image)))
    np.testing.assert_array_equal(np.asarray(op(jnp.asarray(image, jnp.float32))), want)
