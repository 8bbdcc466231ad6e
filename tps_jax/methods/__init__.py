"""Token-reduction methods, one module each, registered by name.

`tps_jax.methods.names()` lists them; `get(name)` returns one; `register(name)` adds one
(docs/extending.md). The encoder, FLOPs, training, tests and benchmarks read them from here.
Every module of this package is imported, so a method's file is all it takes to add one to
the package: the papers' methods first, in this order, then any other module by name.
"""

import importlib
import pkgutil

from tps_jax.methods.base import (Block, Context, Dims, Geometry, Method, Reduction, TokenState, declares,
                                  attention_macs, check_keys, freeze, mlp_macs, readout_kept,
                                  score_head_macs, size_bias)
from tps_jax.methods.registry import get, names, register, resolve
# The built-ins register themselves on import, in this order.
from tps_jax.methods import dense  # noqa: F401  pylint: disable=g-bad-import-order
from tps_jax.methods import tps  # noqa: F401
from tps_jax.methods import dynamicvit  # noqa: F401
from tps_jax.methods import evit  # noqa: F401
from tps_jax.methods import topk  # noqa: F401
from tps_jax.methods import tome  # noqa: F401
from tps_jax.methods import pitome  # noqa: F401
from tps_jax.methods import mctf  # noqa: F401
from tps_jax.methods import diffrate  # noqa: F401

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
  importlib.import_module(f"{__name__}.{_module}")


def learned() -> tuple[str, ...]:
  """The registered methods with parameters to train."""
  return tuple(n for n in names() if get(n).learned)


def training_free() -> tuple[str, ...]:
  """The registered methods that run on a dense model's parameters (the dense one excluded)."""
  return tuple(n for n in names() if get(n).reduces and not get(n).learned)
