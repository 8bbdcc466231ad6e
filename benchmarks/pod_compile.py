"""Compiles the real train step for a TPU pod from this CPU, and reads what it would cost there.

libtpu compiles for a TPU topology without TPU hardware ("deviceless"): the step that
`trainer.loop.Run` builds (the device augmentation, the model, the losses, the optimizer, its
shardings over the mesh) is lowered and compiled for the topology's chips, and the compiled
program reports its per-chip memory, its FLOPs and its collectives. This answers "does it fit,
and what does it communicate" before a pod is rented.

  bash scripts/setup.sh        # installs libtpu (jax's own pin) into .tpu/, outside the env
  python -m benchmarks.pod_compile --topology v5e:16x16 --variant B --method dtps \\
      --batch 4096 --mesh data=-1,fsdp=16 --out benchmarks/results/pod_v5e_B_dtps.json

A row: per-chip arguments / outputs / temporaries / generated code and the peak estimate
(arguments + outputs - aliased + temporaries + code), against the chip's HBM; FLOPs per chip
(XLA's cost analysis); each collective kind with its count and bytes (the result shapes of the
entry computation's collectives, a fused reduce-scatter counted as one); the compile time.
Collectives inside a loop body (a scanned encoder) are counted once, not per iteration.
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_DIR = ROOT / ".tpu"  # libtpu, installed outside the environment (scripts/setup.sh)
ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
       "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _setup_env():
  """Before jax starts: CPU as the backend, libtpu for the topology's compiler."""
  for k, v in ENV.items():
    os.environ.setdefault(k, v)
  if TPU_DIR.is_dir() and str(TPU_DIR) not in sys.path:
    sys.path.append(str(TPU_DIR))


_setup_env()

import argparse  # noqa: E402  pylint: disable=wrong-import-position
import json  # noqa: E402  pylint: disable=wrong-import-position
import math  # noqa: E402  pylint: disable=wrong-import-position
import re  # noqa: E402  pylint: disable=wrong-import-position
import time  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402  pylint: disable=wrong-import-position

GiB = 2 ** 30
# HBM per chip.
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Model presets: (config variant or None, model fields that replace the config's).
MODELS = {
    "S": ("S", {}), "B": ("B", {}), "L": ("L", {}),
    # A small ViT (width 128, 2 blocks, 64 px) for tests: the same step, fast to compile.
    "tiny": ("Ti", dict(variant=None, width=128, depth=2, num_heads=2, mlp_dim=512, patch_size=16,
                        image_size=64, drop_path=0.0)),
    # SigLIP So400m/14's image tower (big_vision layout, MAP head), at 224 px.
    "So400m": ("B", dict(variant="So400m/14", image_size=224, layout="big_vision",
                         pool_type="map", drop_path=0.0)),
}


def topology_devices(name: str, chip_config: str | None = None, slices: int = 1):
  """The devices of a TPU topology such as "v5e:16x16" (libtpu, no TPU needed); `slices` > 1
  gives that many slices of it, joined by the data-center network (each device's
  `slice_index`)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kw = {"chip_config_name": chip_config} if chip_config else {}
  if slices > 1:
    kw["num_slices"] = slices
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing, unknown topology)
    hint = "" if TPU_DIR.is_dir() else f" (no libtpu: bash scripts/setup.sh puts it in {TPU_DIR})"
    raise RuntimeError(f"cannot build TPU topology {name!r}: {str(e)[:200]}{hint}") from None
  return list(topo.devices)


def hbm_gib(topology: str) -> float:
  return float(HBM_GIB.get(topology.split(":")[0], 0))


def _shape_bytes(text: str) -> int:
  """Bytes of every array type in an HLO result type, e.g. "(f32[2,3], bf16[4])"."""
  return sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in filter(None, dims.split(",")))
             for dt, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]", text))


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives the entry computation runs, per chip: each
  collective instruction reached from it (through fusions, calls and loop bodies, once each)
  with the bytes of its result. TPU fuses a reduce-scatter as an all-reduce and a slice in a
  fusion named all-reduce-scatter: it counts as a reduce-scatter (of the bytes reduced)."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?(%[\w.-]+) .*\{\s*$", line)
    if header:
      current = header.group(2)
      comps[current] = []
      entry = current if header.group(1) else entry
    elif current is not None:
      comps[current].append(line)
  out: dict[str, dict[str, int]] = {}

  def visit(comp: str, as_kind: str | None = None):
    for line in comps.get(comp, ()):
      m = re.match(r"^\s*(?:ROOT )?%[\w.-]+ = (.+?) ([\w-]+)\(", line)
      if not m:
        continue
      result, op = m.groups()
      base = op.removesuffix("-start")
      if base in COLLECTIVES:
        row = out.setdefault(as_kind or base, {"count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += _shape_bytes(result)
        continue
      for key, target in re.findall(r"\b(calls|body|branch_computations)=\{?(%[\w.-]+)", line):
        name = target.lstrip("%")
        scatter = key == "calls" and name.startswith(("all-reduce-scatter", "reduce-scatter"))
        visit(target, "reduce-scatter" if scatter else as_kind)

  visit(entry)
  return out


def build_config(model: str, method: str, batch: int, mesh, *, teacher: bool,
                 augment: bool, remat: bool, dcn=None):
  """The ImageNet recipe (configs/imagenet.py) at this model, method and batch, on synthetic
  input (the step is the same; no dataset needed). `mesh`: {axis: size} or [(axis, size)], in
  order; `dcn`: each axis's factor across slices (config.mesh_dcn)."""
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  variant, fields = MODELS[model]
  arg = f"variant={variant},method={method},batch={batch},remat={remat}"
  if teacher:
    arg += ",init=/teacher.npz"  # fine-tuning: the recipe's teacher and its losses
  c = imagenet.get_config(arg)
  c.model.update(fields)
  if fields:  # the recipe's stages scaled to this depth (3 / 6 / 9 of 12)
    from configs import common  # pylint: disable=g-import-not-at-top
    from tps_jax.methods import scored  # pylint: disable=g-import-not-at-top
    from tps_jax.models import vit  # pylint: disable=g-import-not-at-top
    model_cfg = {k: v for k, v in c.model.items() if k != "reduction"}
    depth = fields.get("depth") or vit.decode_variant(fields["variant"])["depth"]
    patches = vit.build_model(model_cfg, 1, reduction=None).num_patches
    c.model.reduction = common.reduction(method, 0.7, scored.default_locations(depth),
                                         common.merge_r(patches, depth), model=model_cfg)
  c.input.dataset = "synthetic"
  c.input.source_kw = dict(num_classes=1000, image_size=c.model.get("image_size", 224))
  c.total_steps = 1000
  with c.ignore_type():  # the recipe's mesh is the older dict form
    c.mesh = list(mesh.items()) if isinstance(mesh, dict) else list(mesh)
  if dcn:
    c.mesh_dcn = list(dcn.items()) if isinstance(dcn, dict) else list(dcn)
  if not augment:
    c.input.preprocess.randaugment = None
  return c


def compile_step(config, devices, *, teacher: bool):
  """(compiled, seconds) of Run's train step, every argument abstract on `devices`."""
  from tps_jax.trainer import loop  # pylint: disable=g-import-not-at-top
  run = loop.Run(config, devices=devices)
  if teacher:  # the teacher's model and parameters as load_teacher builds them, abstract
    from tps_jax.models.vit import build_model  # pylint: disable=g-import-not-at-top
    tcfg = {**loop._to_dict(config.model), "reduction": None, "drop_path": 0.0}  # pylint: disable=protected-access
    run.teacher = build_model(tcfg, run.num_classes,
                              mixed_precision=config.get("mixed_precision", False))
    shapes = jax.eval_shape(lambda: run.teacher.init(
        jax.random.key(0), loop._dummy(run.teacher))["params"])  # pylint: disable=protected-access
    shard = run.layout.tree(shapes, prefix="params")
    run.teacher_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shard)
  run.compile()
  size, ch = run.model.image_size, run.model.channels
  batch = {"image": jax.ShapeDtypeStruct((config.input.batch_size, size, size, ch), "uint8",
                                         sharding=run.data_sharding),
           "label": jax.ShapeDtypeStruct((config.input.batch_size,), "int32",
                                         sharding=run.data_sharding)}
  t0 = time.perf_counter()
  compiled = run.train_step.lower(run.abstract_state, batch, run.teacher_params).compile()
  return compiled, time.perf_counter() - t0


def row(compiled, seconds: float, topology: str, **fields) -> dict:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  hbm = hbm_gib(topology)
  return {"topology": topology, **fields,
          "arguments_gib": mem.argument_size_in_bytes / GiB,
          "outputs_gib": mem.output_size_in_bytes / GiB,
          "aliased_gib": mem.alias_size_in_bytes / GiB,
          "temporaries_gib": mem.temp_size_in_bytes / GiB,
          "code_mib": mem.generated_code_size_in_bytes / 2 ** 20,
          "peak_gib": peak / GiB, "hbm_gib": hbm, "fits": bool(hbm and peak / GiB <= hbm),
          "tflops_per_chip": float(cost.get("flops", 0.0)) / 1e12,
          "collectives": collectives(compiled.as_text()), "compile_s": seconds}


_MODEL_ORDER = {"tiny": 0, "S": 1, "B": 2, "L": 3, "So400m": 4}


def table(paths) -> str:
  """docs/training.md's pod table from result files: one row per configuration (of two, the
  one with the activation constraints; else the later file's, in the order given), by
  topology, slices, model and method. Rows written before the model's activation constraints
  (`act` "no") lack the `slices` field."""
  rows = {}
  for path in paths:
    for r in json.loads(pathlib.Path(path).read_text())["rows"]:
      key = (r["topology"], r.get("slices") or 1, r.get("dcn") or "", r["model"], r["method"],
             r["batch"], r["mesh"], r.get("teacher", False), r.get("augment", True),
             r.get("remat", False))
      if key not in rows or "slices" in r or "slices" not in rows[key]:
        rows[key] = r
  gib = lambda r, kind: r["collectives"].get(kind, {}).get("bytes", 0) / GiB
  lines = ["| topology | model | method | batch | mesh | peak GiB / HBM | TFLOP / chip | "
           "all-gather GiB | reduce-scatter GiB | all-reduce GiB | act |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for key in sorted(rows, key=lambda k: (k[0], k[1], k[2], _MODEL_ORDER.get(k[3], 9), k[3],
                                         k[4] != "none", k[4], k[5])):
    r = rows[key]
    top = r["topology"] + (f" x {key[1]} slices" if key[1] > 1 else "")
    mesh = r["mesh"] + (f", dcn {r['dcn']}" if r.get("dcn") else "")
    lines.append(
        f"| {top} | {r['model']}{' + teacher' if r.get('teacher') else ''} | {r['method']} | "
        f"{r['batch']} | {mesh} | {r['peak_gib']:.2f} / {r['hbm_gib']:.0f} | "
        f"{r['tflops_per_chip']:.2f} | {gib(r, 'all-gather'):.2f} | "
        f"{gib(r, 'reduce-scatter'):.2f} | {gib(r, 'all-reduce'):.2f} | "
        f"{'yes' if 'slices' in r else 'no'} |")
  return "\n".join(lines)


def parse_mesh(text: str) -> dict:
  out = {}
  for part in filter(None, text.split(",")):
    k, _, v = part.partition("=")
    out[k.strip()] = int(v)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topology", default="v5e:16x16")
  p.add_argument("--chip_config", default=None, help='e.g. "megacore" for v5p')
  p.add_argument("--models", nargs="+", default=["S"], choices=sorted(MODELS))
  p.add_argument("--methods", nargs="+", default=["none"])
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--mesh", default="data=-1,fsdp=1",
                  help="mesh axes in order, e.g. data=-1,fsdp=16 (any names)")
  p.add_argument("--slices", type=int, default=1, help="slices of the topology (multi-slice)")
  p.add_argument("--dcn", default="", help="each axis's factor across slices, e.g. data=2")
  p.add_argument("--teacher", action="store_true", help="fine-tuning with the dense teacher")
  p.add_argument("--no-augment", dest="augment", action="store_false")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--out", help="JSON rows")
  p.add_argument("--table", nargs="+", metavar="JSON",
                 help="print docs/training.md's table from result files, compile nothing")
  args = p.parse_args(argv)
  if args.table:
    print(table(args.table))
    return []
  devices = topology_devices(args.topology, args.chip_config, args.slices)
  rows = []
  print(f"{args.topology}: {len(devices)} chips, {hbm_gib(args.topology):.0f} GiB HBM each")
  print("| model | method | batch | mesh | args GiB | temps GiB | peak GiB | fits | TFLOP/chip "
        "| collectives (count, GiB) | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for model in args.models:
    for method in args.methods:
      teacher = args.teacher and method != "none"
      cfg = build_config(model, method, args.batch, parse_mesh(args.mesh), teacher=teacher,
                         augment=args.augment, remat=args.remat,
                         dcn=parse_mesh(args.dcn) or None)
      compiled, seconds = compile_step(cfg, devices, teacher=teacher)
      r = row(compiled, seconds, args.topology, model=model, method=method, batch=args.batch,
              mesh=args.mesh, slices=args.slices, dcn=args.dcn, teacher=teacher, augment=args.augment, remat=args.remat,
              chips=len(devices), jax=jax.__version__)
      rows.append(r)
      coll = ", ".join(f"{k} {v['count']} / {v['bytes'] / GiB:.2f}"
                       for k, v in sorted(r["collectives"].items()))
      print(f"| {model}{' +teacher' if teacher else ''} | {method} | {args.batch} | {args.mesh} "
            f"| {r['arguments_gib']:.2f} | {r['temporaries_gib']:.2f} | {r['peak_gib']:.2f} | "
            f"{'yes' if r['fits'] else 'NO'} | {r['tflops_per_chip']:.2f} | {coll} | "
            f"{seconds:.0f} |", flush=True)
  if args.out:
    from tps_jax import atomic  # pylint: disable=g-import-not-at-top
    atomic.write_json(args.out, {"rows": rows})
  return rows


if __name__ == "__main__":
  main()
