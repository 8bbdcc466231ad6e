"""The dense model: no reduction ("none")."""

from __future__ import annotations

import dataclasses

from tps_jax.methods.base import Geometry, Method, check_keys
from tps_jax.methods.registry import register


@dataclasses.dataclass(frozen=True)
class DenseOptions:
  pass


@register("none")
class Dense(Method):
  """Every block runs on every token."""
  Options = DenseOptions
  reduces = False

  def options(self, spec, geo: Geometry) -> DenseOptions:
    check_keys(self.name, spec, ())
    return DenseOptions()

  def tokens(self, options, geo):
    return ((geo.num_patches,) * 3,) * geo.depth

  def acts_at(self, options, i):
    return False

  def extra_macs(self, options, geo, dims):
    return {}  # no work of its own (and no trace to read it from)

  def spec(self, **_):
    return None

  def example(self, geo):
    return {"method": self.name}

  identity = example
