"""Shared by the methods that merge a number of tokens in each of some blocks (ToMe, PiToMe,
MCTF, ToFu): a per-block count `r`, sizes tracked (unless a method says not), merged tokens
flagged, and the token counts that follow."""

from __future__ import annotations

from tps_jax.methods.base import Method


class PerBlockMerge(Method):
  """Options carry `r`: tokens merged in each block (length depth, zeros where none)."""
  tracks_sizes = True
  merges = True

  def _after(self, o) -> bool:
    """Whether the merge follows the block's MLP (else its attention)."""
    return False

  def acts_at(self, o, i):
    return bool(o.r[i])

  def tokens(self, o, geo):
    out, n = [], geo.num_patches
    after = self._after(o)
    for r in o.r:
      out.append((n, n, n - r) if after else (n, n - r, n - r))
      n -= r
    return tuple(out)

  def summary(self, o):
    return {"r": max(o.r) if o.r else 0, "merges": list(o.r)}

  def revalidate(self, o, geo, spec):
    if len(o.r) != geo.depth:
      raise ValueError(f"this {self.name} plan was made for depth {len(o.r)}, the model has "
                       f"{geo.depth} blocks.")
    if sum(o.r) >= geo.num_patches:
      raise ValueError(f"this {self.name} plan merges {sum(o.r)} of {geo.num_patches} patches.")
    return o
