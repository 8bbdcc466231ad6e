"""Inference throughput (images/s) of the dense ViT and each token-reduction method.

For each model (DeiT-Ti/16, DeiT-S/16 at 224 by default; any variant, a timm name as
"timm:vit_small_patch14_reg4_dinov2", or a downloaded Hub directory as "hub:/path/to/dir",
timed on random parameters), batch size, dtype and method,
times the jitted `model.apply(..., train=False)` on random images (compile
excluded, median of repeats) and prints images/s with the analytic GMACs and the
speed-up over the dense model of the same row group. On a GPU, timm's DeiT under
torch.compile (bf16, `benchmarks.timm_inference`) is timed first in a subprocess
for each model and batch, before this process takes the GPU, as the reference
row (`vs_timm`: against the faster of its two forms); with `--big_vision DIR`, so is
big_vision's own ViT (`benchmarks.big_vision_inference`, the JAX anchor). The JSON is
written after every row (`--append` keeps an earlier file's other rows), so a run cut
short keeps what it measured. Writes JSON to benchmarks/results/.

  python -m benchmarks.throughput [--models Ti/16 S/16] [--batch 1 8 64 256]
      [--dtypes float32 bfloat16] [--methods none dtps ...] [--repeats 5]
      [--no-timm] [--append] [--deadline_s S] [--out F] [--trace none dtps]
      [--xla_option xla_gpu_enable_cudnn_layer_norm=true ...] [--param_dtype bfloat16]
      [--model_kw gelu=tanh ...] [--big_vision DIR]

A row made with --xla_option, --param_dtype or --model_kw names them (`VARIANT_FIELDS`), sits
beside the plain row and never serves as the dense baseline.

Over several batch sizes the run ends with a sweep table per model and dtype: each method's
speed-up over dense at each batch (`verdicts` in the JSON), and whether it beats dense at
batch 1 and 8, where per-call overheads, not the tokens, set the time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp

from benchmarks import common, kernels
from tps_jax import methods
from tps_jax.checkpoints import pretrained
from tps_jax.models import timm_names
from tps_jax.models.vit import Model
from tps_jax.trainer import evaluation

# Every registered method at its paper's operating point (`Method.example`), for DeiT-S: keep
# 0.7 at blocks 3, 6, 9; ToMe r = 13; PiToMe keep 0.9 per block; MCTF the authors' r = 16 in
# blocks 1-11; DiffRate the authors' searched 2.7 GFLOPs schedule (other models: each method's
# example scaled to their depth and tokens).
# A method is any name `tps_jax.methods.get` takes: registered, or a module path imported on
# first use ("my_pkg.my_method", "path/to/mine.py").
DEIT = methods.Geometry(depth=12, num_patches=196)


def example(method: str, geometry: methods.Geometry = DEIT) -> dict:
  """The method's spec at its paper's operating point (DeiT-S's by default)."""
  return methods.get(method).example(geometry)


def model_fields(name: str) -> dict:
  """The `Model` fields of a --models entry: a variant ("S/16"), a timm name
  ("timm:<name>", models.timm_names) or a downloaded Hub directory ("hub:<dir>",
  checkpoints.from_pretrained's config); the image size is the run's."""
  if name.startswith("timm:"):
    kw = timm_names.model_kwargs(name[len("timm:"):])
  elif name.startswith("hub:"):
    kw = pretrained.model_kwargs(pretrained.hub_config(pathlib.Path(name[len("hub:"):])))
  else:
    return {"variant": name}
  kw.pop("image_size", None)
  return kw


# The fields of a row made differently from the plain one (part of its key).
VARIANT_FIELDS = ("xla_options", "param_dtype", "model_kw")


def run(variant: str, batch: int, dtype: str, method: str, repeats: int, image_size: int,
        trace_dir: str | None = None, xla_options: dict | None = None,
        param_dtype: str | None = None, model_kw: dict | None = None, min_images: int = 0):
  """One row; with `trace_dir`, also three traced calls summarised by kernel (`kernels`) and
  the optimised HLO (gzipped text, where the trace's fusion names are defined).
  `xla_options`: XLA compiler options for this row's compile (named in the row);
  `param_dtype`: the parameters are cast to it before the compile; `model_kw`: more `Model`
  fields (each named in the row); `min_images`: at least this many images timed in all (more
  calls than `repeats` at a small batch, whose single calls are short and noisy)."""
  fields = {**model_fields(variant), **(model_kw or {})}
  geometry = Model(1000, image_size=image_size, **fields).plan().geometry
  model = Model(1000, image_size=image_size, reduction=example(method, geometry),
                dtype=jnp.dtype(dtype), **fields)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
  if param_dtype:
    params = jax.tree.map(lambda a: a.astype(param_dtype), params)
  # One compile serves the timing, the trace and the HLO dump.
  images = evaluation.random_images(model, batch)
  fwd = evaluation.forward(model).lower(params["params"], images).compile(
      compiler_options=xla_options or None)
  repeats = max(repeats, -(-min_images // batch))
  rate = evaluation.speed(fwd, params["params"], images, repeats=repeats)["images_per_s"]
  row = {"impl": "tps_jax", "model": variant, "batch": batch, "dtype": dtype,
         "method": method, "gmacs": evaluation.cost(model)["gmacs"], "img_per_s": rate,
         "ms_per_batch": 1e3 * batch / rate, "repeats": repeats}
  if xla_options:
    row["xla_options"] = options_label(xla_options)
  if param_dtype:
    row["param_dtype"] = param_dtype
  if model_kw:
    row["model_kw"] = options_label(model_kw)
  if trace_dir:
    out = pathlib.Path(trace_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = lambda options: "_" + options_label(options).replace("=", "-").replace(",", "_")
    name = (f"{variant.replace('/', '').replace(':', '_')}_b{batch}_{method}"
            + (slug(xla_options) if xla_options else "")
            + (slug({"params": param_dtype}) if param_dtype else "")
            + (slug(model_kw) if model_kw else ""))
    with gzip.open(out / f"hlo_{name}.txt.gz", "wt") as f:
      f.write(fwd.as_text())
    row["kernels"] = kernels.trace(lambda: fwd(params["params"], images),
                                   keep=out / f"trace_{name}.json.gz")
  return row


def timm_rows(variant: str, batch: int, profile: str | None = None) -> list[dict]:
  """timm + torch.compile rows (one per form) from a subprocess; [] where it fails."""
  extra = ["--profile", profile] if profile else []
  return common.subprocess_rows(["-m", "benchmarks.timm_inference", "--model", variant,
                                 "--batch", str(batch), *extra])


def big_vision_rows(checkout: str, variant: str, batch: int, repeats: int, image_size: int,
                    trace_dir: str | None = None) -> list[dict]:
  """big_vision's own ViT rows (one per parameter dtype) from a subprocess; [] where it fails."""
  extra = ["--trace_dir", trace_dir] if trace_dir else []
  return common.subprocess_rows(["-m", "benchmarks.big_vision_inference", "--big_vision",
                                 checkout, "--model", variant, "--batch", str(batch),
                                 "--repeats", str(repeats), "--image-size", str(image_size),
                                 *extra])


def parse_option(text: str) -> tuple[str, bool | int | float | str]:
  """"name=value" -> (name, value): true / false a bool, a number a number, else the text."""
  name, sep, value = text.partition("=")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"an option is name=value, got {text!r}.")
  if value.lower() in ("true", "false"):
    return name, value.lower() == "true"
  for kind in (int, float):
    try:
      return name, kind(value)
    except ValueError:
      pass
  return name, value


def options_label(options: dict) -> str:
  """The row's record of its compiler options: "name=value,..." sorted by name."""
  return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in sorted(options.items()))


def _key(r: dict) -> tuple:
  return (r.get("impl", "tps_jax"), r["model"], r["batch"], r["dtype"], r["method"],
          *(r.get(f, "") for f in VARIANT_FIELDS))


def _compare(rows: list[dict]) -> None:
  """Fills `speedup_vs_dense` (our plain dense, same group) and `vs_timm` (timm's fastest
  form)."""
  for r in rows:
    group = [t for t in rows if (t["model"], t["batch"], t["dtype"]) ==
             (r["model"], r["batch"], r["dtype"])]
    dense = [t["img_per_s"] for t in group if t.get("impl", "tps_jax") == "tps_jax"
             and t["method"] == "none" and not any(t.get(f) for f in VARIANT_FIELDS)]
    timm = [t["img_per_s"] for t in group if t.get("impl", "tps_jax").startswith("timm")]
    r["speedup_vs_dense"] = r["img_per_s"] / dense[0] if dense else float("nan")
    r["vs_timm"] = r["img_per_s"] / max(timm) if timm else float("nan")


def verdicts(rows: list[dict]) -> dict:
  """{"model dtype": {method: {batch: speed-up over dense}}} of the plain rows (`_compare`
  filled them)."""
  out: dict = {}
  for r in rows:
    if r.get("impl", "tps_jax") != "tps_jax" or any(r.get(f) for f in VARIANT_FIELDS):
      continue
    group = out.setdefault(f"{r['model']} {r['dtype']}", {})
    group.setdefault(r["method"], {})[str(r["batch"])] = round(r["speedup_vs_dense"], 3)
  return out


def print_sweep(found: dict) -> None:
  """The sweep table: per method, the speed-up over dense at each batch; at batch 1 and 8
  whether it beats dense."""
  for group, by_method in found.items():
    batches = sorted({int(b) for v in by_method.values() for b in v})
    if len(batches) < 2:
      continue
    print(f"\nsweep {group}: speed-up over dense by batch")
    print(f"  {'method':<18}" + "".join(f"{'b' + str(b):>9}" for b in batches)
          + "  beats dense at b1 / b8")
    for method, by_batch in by_method.items():
      cells = "".join(f"{by_batch.get(str(b), float('nan')):>9.2f}" for b in batches)
      says = "(the baseline)" if method == "none" else " / ".join(
          "yes" if by_batch.get(b, 0) > 1 else "no" if b in by_batch else "-" for b in ("1", "8"))
      print(f"  {method:<18}{cells}  {says}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=["Ti/16", "S/16"],
                      help="variants (S/16), timm names (timm:vit_small_patch14_reg4_dinov2) "
                           "or downloaded Hub directories (hub:/path/to/dir)")
  parser.add_argument("--batches", "--batch", nargs="+", type=int, default=[32, 1],
                      help="batch sizes, e.g. --batch 1 8 64 256 (a sweep: see `verdicts`)")
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--methods", nargs="+",
                      default=["none", *(m for m in methods.names() if methods.get(m).reduces)],
                      help="registered names or module paths (my_pkg.my_method, mine.py); "
                           "default: the dense model and every registered reducing method")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per row, at least")
  parser.add_argument("--min_images", type=int, default=0,
                      help="time at least this many images per row (more calls at a small "
                           "batch: e.g. 64 makes 64 calls at batch 1)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True,
                      help="timm + torch.compile reference rows (GPU only)")
  parser.add_argument("--append", action="store_true",
                      help="keep the other rows of an existing --out file")
  parser.add_argument("--deadline_s", type=float, default=None,
                      help="start no row after this many seconds (the JSON is written per row)")
  parser.add_argument("--trace", nargs="*", default=[],
                      help="methods whose kernels to break down (and timm's, on a GPU)")
  parser.add_argument("--trace_dir", default="/tmp/throughput_traces",
                      help="where the traces, HLO and timm's kernel tables go")
  parser.add_argument("--xla_option", action="append", type=parse_option, default=[],
                      metavar="NAME=VALUE",
                      help="an XLA compiler option for our rows (repeatable), e.g. "
                           "xla_gpu_enable_cudnn_layer_norm=true; such rows are kept apart "
                           "and never serve as the dense baseline")
  parser.add_argument("--param_dtype", default=None, choices=["bfloat16", "float32"],
                      help="cast our parameters to this dtype (rows kept apart, as "
                           "--xla_option's)")
  parser.add_argument("--model_kw", action="append", type=parse_option, default=[],
                      metavar="NAME=VALUE",
                      help="a Model field for our rows (repeatable), e.g. gelu=tanh (rows "
                           "kept apart, as --xla_option's)")
  parser.add_argument("--big_vision", default=None, metavar="DIR",
                      help="a big_vision checkout: its own ViT as a reference row ("
                           "benchmarks.big_vision_inference)")
  args = parser.parse_args(argv)
  for method in args.methods:  # a bad name fails before anything is timed
    example(method)
  start = time.perf_counter()
  out_path = pathlib.Path(args.out) if args.out else None
  rows, old = [], None

  def save():
    nonlocal old
    if old is None:  # after the timm subprocesses: this initialises the device
      old = common.appendable(out_path).get("rows", []) if args.append and out_path else []
    fresh = {_key(r) for r in rows}
    all_rows = [r for r in old if _key(r) not in fresh] + rows
    _compare(all_rows)
    common.write_json("throughput", {"args": vars(args), "rows": all_rows,
                                     "verdicts": verdicts(all_rows)}, args.out)
    return all_rows

  # The reference rows first, each from a subprocess, before this process initialises the GPU
  # (XLA takes 75% of it): timm + torch.compile (GPU only), big_vision's own ViT (where given).
  references = []
  if args.timm and shutil.which("nvidia-smi") is not None:
    references.append(lambda v, b: timm_rows(v, b, args.trace_dir if args.trace else None))
  if args.big_vision:
    references.append(lambda v, b: big_vision_rows(
        args.big_vision, v, b, args.repeats, args.image_size,
        args.trace_dir if args.trace else None))
  for variant in args.models:
    model_fields(variant)  # a bad name fails before anything is timed
  for variant in (v for v in args.models if ":" not in v):  # references time DeiT variants
    for batch in args.batches:
      for source in references:
        for r in source(variant, batch):
          rows.append(r)
          print(f"  {r['impl']} {variant} b={batch}: {r['img_per_s']:.1f} img/s", flush=True)
  for variant in args.models:
    for batch in args.batches:
      for dtype in args.dtypes:
        for method in args.methods:
          if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            print(f"  deadline: {variant} b={batch} {dtype} {method} and later not run")
            break
          row = run(variant, batch, dtype, method, args.repeats, args.image_size,
                    args.trace_dir if method in args.trace else None, dict(args.xla_option),
                    args.param_dtype, dict(args.model_kw), args.min_images)
          rows.append(row)
          save()
          made = " ".join(str(row[f]) for f in VARIANT_FIELDS if f in row)
          print(f"  {variant} b={batch} {dtype} {method} {made}: "
                f"{row['img_per_s']:.1f} img/s", flush=True)
          if "kernels" in row:
            print(f"    kernels (ms/call): {json.dumps(row['kernels'].get('by_kind_ms'))}",
                  flush=True)
  all_rows = save()
  print(f"\non {common.machine()['device_kind']} ({common.machine()['cpu_count']} cpus)")
  common.print_table(all_rows, ["impl", "model", "batch", "dtype", "method", *VARIANT_FIELDS,
                                "gmacs", "img_per_s", "ms_per_batch", "speedup_vs_dense",
                                "vs_timm"])
  print_sweep(verdicts(all_rows))


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
