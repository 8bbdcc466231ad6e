"""DCT token reduction (the Fourier Transformer's, He et al., ACL 2023, as OpenToMe applies it
to ViTs): after a block, the tokens are a signal along the sequence; keep its `t - r` lowest
frequencies of an orthonormal DCT-II and transform back at that length (docs/method.md,
section 12).

The two transforms compose into one fixed (t - r, t) matrix per block (`lowpass`), so the
reduction is a matrix product with a constant: static shapes, no FFT. Every new token mixes
every old one; for the bookkeeping (sizes, each patch's token) a patch is held by the new
token at its relative place in the sequence (the resampled grid).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tps_jax.methods.base import check_keys
from tps_jax.methods.merging import PerBlockMerge
from tps_jax.methods.registry import register
from tps_jax.methods.tome import schedule
from tps_jax.ops.dtypes import upcast


def dct_matrix(n: int) -> np.ndarray:
  """The orthonormal DCT-II (n, n), float64: C[k, i] = s_k cos(pi (2 i + 1) k / (2 n)), with
  s_0 = sqrt(1 / n) and s_k = sqrt(2 / n); its inverse is its transpose."""
  k, i = np.arange(n)[:, None], np.arange(n)[None, :]
  c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
  c[0] /= np.sqrt(2.0)
  return c


@functools.lru_cache(maxsize=64)
def lowpass(t: int, keep: int) -> np.ndarray:
  """(keep, t) float32: the first `keep` DCT-II coefficients of t tokens, transformed back by
  the inverse DCT of length `keep`."""
  return (dct_matrix(keep).T @ dct_matrix(t)[:keep]).astype(np.float32)


def resampled_index(t: int, keep: int) -> np.ndarray:
  """(t,) int32: the token of the `keep` whose share of the sequence holds old token i's
  centre, floor((i + 1/2) keep / t)."""
  return np.floor((np.arange(t) + 0.5) * keep / t).astype(np.int32)


def dct_reduce(x: jax.Array, r: int, *, prefix: int = 1) -> jax.Array:
  """x (B, P + t, C) -> (B, P + t - r, C): the t reducible tokens low-passed to t - r (float32
  inside, x's dtype out); the P prefix tokens pass as they are."""
  t = x.shape[1] - prefix
  m = jnp.asarray(lowpass(t, t - r))
  tokens = jnp.einsum("kt,btc->bkc", m, upcast(x[:, prefix:]))
  return jnp.concatenate([x[:, :prefix], tokens.astype(x.dtype)], axis=1)


@dataclasses.dataclass(frozen=True)
class DCTOptions:
  """Attributes:
    r: tokens removed after each block (length depth; at most half the reducible ones)."""
  r: tuple[int, ...] = ()


@register("dct")
class DCT(PerBlockMerge):
  Options = DCTOptions
  tracks_sizes = False  # OpenToMe's DCT keeps no sizes and no proportional attention

  def options(self, spec, geo):
    check_keys(self.name, spec, ("r", "locations"))
    return DCTOptions(schedule(spec, geo, self.name))

  def revalidate(self, o, geo, spec):
    return DCTOptions(schedule({"r": o.r}, geo, self.name))

  def _after(self, o):
    return True

  def block(self, o, i, block, state, ctx):
    x = block.whole(state.x)
    p, t, r = ctx.prefix, x.shape[1] - ctx.prefix, o.r[i]
    index = np.concatenate([np.arange(p), p + resampled_index(t, t - r)]).astype(np.int32)
    new_index = jnp.broadcast_to(jnp.asarray(index), x.shape[:2])
    size = state.size
    if size is not None:  # the patches each new token holds
      size = jnp.einsum("bn,nk->bk", size, jax.nn.one_hot(index, p + t - r, dtype=size.dtype))
    x = ctx.checkpoint(functools.partial(dct_reduce, r=r, prefix=p))(x)
    return state.after_merge(x, size, new_index if state.owner is not None else None)

  def spec(self, *, keep_ratio=0.7, locations=None, r=0):
    return {"method": self.name, "r": r}

  def example(self, geo):  # ToMe's DeiT-S r = 13 of 196 patches, scaled (OpenToMe's setting)
    return {"method": self.name, "r": max(1, round(13 * geo.num_patches / 196))}

  def identity(self, geo):
    return {"method": self.name, "r": 0}
