"""A reference row of benchmarks/throughput.py: big_vision's own ViT inference in JAX.

The JAX anchor for the dense gap to timm + torch.compile: is it ours, or XLA's against
Inductor? Builds big_vision's `models/vit.Model` at a DeiT size (`tok` pooling, learned
position table, 1000 classes) from a checkout given by `--big_vision` (no big_vision code is
in this repository: the checkout is carried to the machine beside the wheels, see
benchmarks/gpu/wheels.sh), with `dtype_mm=bfloat16` (its only precision knob: bf16 matmuls and
activations), and times it as our rows are timed (`tps_jax.timing.time_call`, jitted forward,
random images, compile excluded, median of the repeats). Two forms: its parameters as it
initialises them (float32, but for `cls` and the position table, which it makes in the
compute dtype) and every parameter cast to bf16. Each row records the checkout's commit (the
`COMMIT` file benchmarks/gpu/wheels.sh writes beside it) and the jax / flax versions. Prints one
`ROW {json}` line per form in throughput.py's schema (`impl` "big_vision (<form>)"); with
`--trace_dir`, each row also carries its kernel breakdown (`benchmarks.kernels`) and the
folder gets its trace and optimised HLO.

  python -m benchmarks.big_vision_inference --big_vision DIR [--model S/16] [--batch 256]
      [--trace_dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp

from benchmarks import kernels
from tps_jax import timing

VARIANTS = ("Ti/16", "S/16", "B/16")


def import_vit(checkout: pathlib.Path):
  """big_vision's `models/vit.py` from `checkout` (the repository root, or its `big_vision/`
  package folder). Its `utils` needs TensorFlow and serves only checkpoint loading, which this
  never calls, so it is replaced by an empty module."""
  package_dir = checkout / "big_vision" if (checkout / "big_vision").is_dir() else checkout
  if not (package_dir / "models" / "vit.py").is_file():
    raise FileNotFoundError(f"no big_vision checkout at {checkout}: "
                            f"{package_dir / 'models' / 'vit.py'} is missing.")
  package = types.ModuleType("big_vision")
  package.__path__ = [str(package_dir)]
  sys.modules["big_vision"] = package
  sys.modules["big_vision.utils"] = package.utils = types.ModuleType("big_vision.utils")
  import big_vision.models.vit as bv_vit  # pylint: disable=g-import-not-at-top
  return bv_vit


def build(bv_vit, variant: str):
  """big_vision's ViT at the DeiT geometry of `variant` (DeiT's heads: Ti 3, S 6, B 12, the
  same as big_vision's variants), bf16 matmuls."""
  return bv_vit.Model(1000, variant=variant, pool_type="tok", posemb="learn",
                      head_zeroinit=False, dtype_mm="bfloat16")


FORMS = ("f32_params", "bf16_params")


def provenance(checkout: pathlib.Path) -> dict:
  """The checkout's commit (its COMMIT file, where there is one) and the jax / flax versions."""
  import flax  # pylint: disable=g-import-not-at-top
  commit = next((p / "COMMIT" for p in (checkout, checkout.parent) if (p / "COMMIT").is_file()),
                None)
  return {"big_vision": commit.read_text().strip() if commit else "unknown",
          "jax": jax.__version__, "flax": flax.__version__}


def rows(bv_vit, variant: str, batch: int, repeats: int, image_size: int = 224,
         forms: tuple[str, ...] = FORMS, trace_dir: pathlib.Path | None = None) -> list[dict]:
  """One row per form; with `trace_dir`, each with three traced calls summarised by kernel."""
  unknown = set(forms) - set(FORMS)
  if unknown:
    raise ValueError(f"unknown forms {sorted(unknown)}: the forms are {', '.join(FORMS)}.")
  model = build(bv_vit, variant)
  images = jax.random.normal(jax.random.key(0), (batch, image_size, image_size, 3))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  out = []
  for form in forms:
    p = params if form == "f32_params" else jax.tree.map(
        lambda a: a.astype(jnp.bfloat16), params)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(p, images).compile()
    t = timing.time_call(fwd, p, images, repeats=repeats, warmup=1)
    rate = batch / t["median_s"]
    row = {"impl": f"big_vision ({form})", "model": variant, "batch": batch,
           "dtype": "bfloat16", "method": "none", "gmacs": None, "img_per_s": rate,
           "ms_per_batch": 1e3 * batch / rate,
           "params_m": sum(a.size for a in jax.tree.leaves(params)) / 1e6}
    if trace_dir:
      trace_dir.mkdir(parents=True, exist_ok=True)
      name = f"big_vision_{variant.replace('/', '')}_b{batch}_{form}"
      with gzip.open(trace_dir / f"hlo_{name}.txt.gz", "wt") as f:
        f.write(fwd.as_text())
      row["kernels"] = kernels.trace(lambda fwd=fwd, p=p: fwd(p, images),
                                     keep=trace_dir / f"trace_{name}.json.gz")
    out.append(row)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--big_vision", required=True, type=pathlib.Path,
                      help="a big_vision checkout (its root or its big_vision/ folder)")
  parser.add_argument("--model", default="S/16", choices=VARIANTS)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--forms", default=",".join(FORMS))
  parser.add_argument("--trace_dir", default=None, type=pathlib.Path,
                      help="kernel breakdowns: the traces and optimised HLO go there")
  args = parser.parse_args(argv)
  checkout = args.big_vision.resolve()
  bv_vit = import_vit(checkout)
  for row in rows(bv_vit, args.model, args.batch, args.repeats, args.image_size,
                  tuple(args.forms.split(",")), args.trace_dir):
    print("ROW " + json.dumps({**row, **provenance(checkout)}), flush=True)


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
