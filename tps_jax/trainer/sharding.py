"""The device mesh and the shardings of the batch, the train state and the activations, as
big_vision's configs state them:

  config.mesh = [("data", -1), ("fsdp", 16)]      # named axes; one -1 takes what the rest leave
  config.mesh_dcn = [("data", 2)]                 # multi-slice: each axis's share across slices
  config.sharding_strategy = [                    # the state, by regex on its path; first match
      (".*/(bias|scale)", "replicate"),
      (".*", "fsdp(axis='fsdp', min_size=16384)")]
  config.sharding_rules = [("act_batch", ("data", "fsdp"))]   # logical activation axes

Strategies: "replicate"; "fsdp(axis=..., min_size=...)" splits an array of at least
`min_size` elements over `axis` (a name or a tuple of names) along its largest dimension that
divides evenly, else replicates it; "shard(dim=..., axis=...)" splits dimension `dim`. A path is
"params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", or an optimizer moment's
"opt_state/.../mu/Transformer/..." (the same rule fits both: moments take their parameters'
layouts). The model names its activations' axes (`tps_jax.models.logical`); the rules map them
to mesh axes, and the batch is split over the axes of "act_batch" (by default every axis).

The older form `config.mesh = dict(data=-1, fsdp=16, min_shard_size=2**14)` means the same as
a ("data", "fsdp") mesh with the fsdp strategy above.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
from typing import Any, Iterable, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tps_jax.models import logical

AXES = ("data", "fsdp")  # the older dict form's axes
BATCH_AXIS = logical.BATCH


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and how the state and activations lie on it (built by `from_config`).

  Attributes:
    mesh: the device mesh.
    strategy: ((regex, strategy string), ...) for the state, first match wins.
    rules: ((logical axis, mesh axes), ...) for the activations (`flax.linen`'s logical
      axis rules).
  """
  mesh: jax.sharding.Mesh
  strategy: tuple[tuple[str, str], ...]
  rules: tuple[tuple[str, Any], ...]

  @property
  def batch_axes(self) -> tuple[str, ...]:
    for name, axes in self.rules:
      if name == BATCH_AXIS:
        return _names(axes)
    return tuple(self.mesh.axis_names)

  def batch(self) -> NamedSharding:
    """The global batch: split over `batch_axes` along its first dimension."""
    return NamedSharding(self.mesh, P(self.batch_axes))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def trace(self, fn):
    """`fn` run under this layout's mesh and logical axis rules: the context in which the
    model's activation constraints (`tps_jax.models.logical`) take effect while it traces."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), \
          nn.logical_axis_rules(self.rules):
        return fn(*args, **kwargs)
    return traced

  def tree(self, tree, prefix: str = "") -> Any:
    """NamedShardings for every leaf of a tree of arrays or ShapeDtypeStructs, by the
    strategy on each leaf's path ("prefix/a/b/c")."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(self.mesh, spec_for_path(
            _path(prefix, path), tuple(x.shape), self.strategy, self.mesh)), tree)


def _names(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _path(prefix: str, path) -> str:
  parts = [prefix] if prefix else []
  for k in path:
    key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    parts.append(str(key))
  return "/".join(parts)


def _axis_sizes(axes: Sequence, n: int, what: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """[(name, size), ...] with at most one -1 -> (names, sizes) multiplying to n."""
  try:
    names, sizes = zip(*[(str(a), int(s)) for a, s in axes]) if axes else ((), ())
  except (TypeError, ValueError):
    raise ValueError(f"{what} is a list of (axis name, size) pairs, got {axes!r}.") from None
  if len(set(names)) != len(names):
    raise ValueError(f"{what} names an axis twice: {list(names)}.")
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"{what} has more than one axis of size -1: {list(axes)}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{what} sizes are positive or -1, got {list(axes)}.")
  known = int(np.prod([s for s in sizes if s != -1], dtype=np.int64))
  if n % known:
    raise ValueError(f"{what} {dict(zip(names, sizes))} does not divide the {n} devices.")
  sizes = tuple(n // known if s == -1 else s for s in sizes)
  if int(np.prod(sizes, dtype=np.int64)) != n:
    raise ValueError(f"{what} {dict(zip(names, sizes))} covers "
                     f"{int(np.prod(sizes, dtype=np.int64))} devices, but there are {n}.")
  return names, sizes


def make_mesh(axes: Sequence | None = None, *, devices=None, num_devices: int = 0,
              dcn: Sequence | None = None, data: int | None = None,
              fsdp: int | None = None) -> jax.sharding.Mesh:
  """A mesh of named axes over all devices (or the first `num_devices`).

  Args:
    axes: [(name, size), ...], one size -1 at most (what the others leave); default
      [("data", -1)]. The older `data=`, `fsdp=` keywords give [("data", data), ("fsdp",
      fsdp)].
    devices: the devices (default `jax.devices()`; a TPU topology's to compile for a pod).
    num_devices: take only the first this many.
    dcn: multi-slice: [(name, slices), ...], each axis's factor across slices (the rest of
      its size lies within a slice); the devices' `slice_index` says which slice each is in
      (`mesh_utils.create_hybrid_device_mesh`).
  Returns:
    The Mesh (axis types Auto). Raises ValueError naming what does not fit.
  """
  if data is not None or fsdp is not None:
    if axes is not None:
      raise ValueError("give the mesh as axes [(name, size), ...] or as data= / fsdp=, not both.")
    axes = [("data", -1 if data is None else data), ("fsdp", 1 if fsdp is None else fsdp)]
  axes = list(axes) if axes is not None else [("data", -1)]
  devices = list(devices if devices is not None else jax.devices())
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"mesh asks for {num_devices} devices, only {len(devices)} exist.")
    devices = devices[:num_devices]
  names, sizes = _axis_sizes(axes, len(devices), "mesh")
  types = (jax.sharding.AxisType.Auto,) * len(names)
  if not dcn:
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
      raise ValueError(f"the devices span {len(slices)} slices; say how each mesh axis splits "
                       f"across them with mesh_dcn, e.g. [('data', {len(slices)})].")
    return jax.make_mesh(sizes, names, devices=devices, axis_types=types)
  try:
    dcn = dict((str(a), int(s)) for a, s in dcn)
  except (TypeError, ValueError):
    raise ValueError(f"mesh_dcn is a list of (axis name, slices) pairs, got {dcn!r}.") from None
  if any(s < 1 for s in dcn.values()):
    raise ValueError(f"mesh_dcn sizes are positive, got {dcn}.")
  unknown = sorted(set(dcn) - set(names))
  if unknown:
    raise ValueError(f"mesh_dcn names axes {unknown} that the mesh {list(names)} lacks.")
  dcn_shape = tuple(dcn.get(a, 1) for a in names)
  bad = [a for a, s, d in zip(names, sizes, dcn_shape) if s % d]
  if bad:
    raise ValueError(f"mesh_dcn {dcn} does not divide the mesh axes {bad} "
                     f"({dict(zip(names, sizes))}).")
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if int(np.prod(dcn_shape)) != slices:
    raise ValueError(f"mesh_dcn {dcn} spans {int(np.prod(dcn_shape))} slices, but the "
                     f"devices lie in {slices}.")
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  ici_shape = tuple(s // d for s, d in zip(sizes, dcn_shape))
  grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
  return jax.sharding.Mesh(grid, names, axis_types=types)


def parse_strategy(text: str) -> tuple[str, dict]:
  """"fsdp(axis='fsdp', min_size=16384)" -> ("fsdp", {...}); names the bad ones."""
  m = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", text)
  kinds = {"replicate": (), "fsdp": ("axis", "min_size"), "shard": ("dim", "axis")}
  if not m or m.group(1) not in kinds:
    raise ValueError(f"unknown sharding strategy {text!r}; expected replicate, "
                     f"fsdp(axis=..., min_size=...) or shard(dim=..., axis=...).")
  kind, kw = m.group(1), {}
  if m.group(2) and m.group(2).strip():
    try:
      call = ast.parse(f"f({m.group(2)})", mode="eval").body
      kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
      if call.args or None in kw:
        raise ValueError
    except (SyntaxError, ValueError):
      raise ValueError(f"sharding strategy {text!r}: its arguments are key=value "
                       f"literals.") from None
  extra = sorted(set(kw) - set(kinds[kind]))
  if extra:
    raise ValueError(f"sharding strategy {text!r}: {kind} takes {list(kinds[kind])}, not "
                     f"{extra}.")
  if kind == "shard" and "dim" not in kw:
    raise ValueError(f"sharding strategy {text!r}: shard needs dim=.")
  return kind, kw


def _axis_size(mesh, axes) -> int:
  return int(np.prod([mesh.shape[a] for a in _names(axes)], dtype=np.int64))


def spec_for(shape: tuple[int, ...], fsdp: int, min_size: int = 2**14,
             axis: Any = "fsdp") -> P:
  """The fsdp rule for one array shape over `fsdp` devices of `axis`."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim + [axis]))
  logging.warning("fsdp: no dimension of shape %s divides over %d devices; this array of "
                  "%d elements is replicated on every device.", shape, fsdp,
                  int(np.prod(shape, dtype=np.int64)))
  return P()


def spec_for_path(path: str, shape: tuple[int, ...], strategy: Iterable[tuple[str, str]],
                  mesh) -> P:
  """The PartitionSpec the first strategy whose regex matches `path` gives `shape`."""
  for pattern, text in strategy:
    if not re.fullmatch(pattern, path):
      continue
    kind, kw = parse_strategy(text)
    if kind == "replicate":
      return P()
    axis = kw.get("axis", "fsdp")
    unknown = [a for a in _names(axis) if a not in mesh.shape]
    if unknown:
      raise ValueError(f"sharding strategy {text!r} for {path} names axes {unknown}; the "
                       f"mesh has {list(mesh.axis_names)}.")
    axis = axis if isinstance(axis, str) else tuple(axis)
    if kind == "fsdp":
      return spec_for(shape, _axis_size(mesh, axis), int(kw.get("min_size", 2**14)), axis)
    dim = int(kw["dim"])
    if not -len(shape) <= dim < len(shape):
      raise ValueError(f"sharding strategy {text!r} for {path}: dim {dim} is out of range for "
                       f"its shape {shape}; narrow the regex.")
    dim %= len(shape)
    if shape[dim] % _axis_size(mesh, axis):
      logging.warning("shard: dimension %d of %s (%s) does not divide over %s; replicated.",
                      dim, path, shape, axis)
      return P()
    return P(*([None] * dim + [axis]))
  return P()


def from_config(config, *, devices=None) -> Layout:
  """The Layout of a config: `mesh` (axes, or the older dict), `mesh_dcn`,
  `sharding_strategy` and `sharding_rules` (module docstring)."""
  mesh_cfg = config.get("mesh", None)
  if hasattr(mesh_cfg, "to_dict"):
    mesh_cfg = mesh_cfg.to_dict()
  strategy = config.get("sharding_strategy", None)
  num_devices = 0
  if isinstance(mesh_cfg, dict) or mesh_cfg is None:  # the older form
    mesh_cfg = dict(mesh_cfg or {})
    min_size = int(mesh_cfg.pop("min_shard_size", 2**14))
    num_devices = int(mesh_cfg.pop("num_devices", 0))
    unknown = sorted(set(mesh_cfg) - set(AXES))
    if unknown:
      raise ValueError(f"config.mesh has unknown keys {unknown}; expected data, fsdp, "
                       f"min_shard_size, num_devices, or a list of (axis, size) pairs.")
    axes = [("data", mesh_cfg.get("data", -1)), ("fsdp", mesh_cfg.get("fsdp", 1))]
    if strategy is None:
      strategy = [(".*", f"fsdp(axis='fsdp', min_size={min_size})")]
  else:
    axes = [tuple(a) for a in mesh_cfg]
  mesh = make_mesh(axes, devices=devices, num_devices=num_devices,
                   dcn=[tuple(a) for a in config.get("mesh_dcn", None) or []])
  if strategy is None:
    strategy = ([(".*", "fsdp(axis='fsdp')")] if "fsdp" in mesh.shape
                else [(".*", "replicate")])
  strategy = tuple((str(p), str(s)) for p, s in strategy)
  for pattern, text in strategy:  # named at construction, not at the first step
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"config.sharding_strategy regex {pattern!r}: {e}.") from None
    parse_strategy(text)
  rules = tuple((str(n), a if a is None or isinstance(a, str) else tuple(a))
                for n, a in (config.get("sharding_rules", None) or []))
  for name, axes_ in rules:
    unknown = [a for a in _names(axes_) if a not in mesh.shape]
    if unknown:
      raise ValueError(f"config.sharding_rules maps {name!r} to axes {unknown}; the mesh has "
                       f"{list(mesh.axis_names)}.")
  if not any(n == BATCH_AXIS for n, _ in rules):
    rules = ((BATCH_AXIS, tuple(mesh.axis_names)),) + rules
  layout = Layout(mesh, strategy, rules)
  unsplit = [a for a in mesh.axis_names if a not in layout.batch_axes and mesh.shape[a] > 1]
  if unsplit and jax.process_count() > 1:  # each process loads its own rows of the batch
    raise ValueError(f"config.sharding_rules leaves the batch whole over {unsplit}; with "
                     f"{jax.process_count()} processes each loads its own rows, so act_batch "
                     f"must span every axis larger than 1.")
  return layout
