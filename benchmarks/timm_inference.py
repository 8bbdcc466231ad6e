"""The reference rows of benchmarks/throughput.py: timm's DeiT inference in PyTorch.

timm `deit_{tiny,small,base}_patch16_224` in eval mode under `torch.inference_mode` and
torch.compile, two ways: float32 parameters under bf16 autocast (as our models run: float32
parameters, bf16 compute) and parameters cast to bf16. Random float32 images already on the GPU,
a fresh batch each repeat from a pool of 4 (so the timing is not of one cached buffer). Times
with CUDA events, median of the repeats. Prints one `ROW {json}` line per form in
throughput.py's schema.

  python -m benchmarks.timm_inference [--model S/16] [--batch 256] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics

NAMES = {"Ti/16": "deit_tiny_patch16_224", "S/16": "deit_small_patch16_224",
         "B/16": "deit_base_patch16_224"}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="S/16", choices=list(NAMES))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--forms", default="autocast,bf16_weights")
  parser.add_argument("--profile", default=None,
                      help="a folder: each form's CUDA kernels (torch.profiler) go there")
  args = parser.parse_args(argv)
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  dev = torch.device("cuda")
  pool = [torch.randn(args.batch, 3, 224, 224, device=dev) for _ in range(4)]
  for form in args.forms.split(","):
    model = timm.create_model(NAMES[args.model], num_classes=1000).to(dev).eval()
    if form == "bf16_weights":
      model = model.to(torch.bfloat16)
      xs = [x.to(torch.bfloat16) for x in pool]
    elif form == "autocast":
      xs = pool
    else:
      raise ValueError(f"unknown form {form!r}: autocast or bf16_weights")
    compiled = torch.compile(model)

    def fwd(x, compiled=compiled, form=form):
      with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                  enabled=form == "autocast"):
        return compiled(x)

    for i in range(3):
      fwd(xs[i % 4])
    torch.cuda.synchronize()
    times = []
    for i in range(args.repeats):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      fwd(xs[i % 4])
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / 1e3)
    median = statistics.median(times)
    if args.profile:
      _profile(torch, fwd, xs, f"{args.profile}/timm_{args.model.replace('/', '')}"
               f"_b{args.batch}_{form}.txt")
    print("ROW " + json.dumps({
        "impl": f"timm + torch.compile ({form})", "model": args.model, "batch": args.batch,
        "dtype": "bfloat16", "method": "none", "gmacs": None,
        "img_per_s": args.batch / median, "ms_per_batch": median * 1e3,
        "torch": torch.__version__, "timm": timm.__version__}), flush=True)


def _profile(torch, fwd, xs, path: str, calls: int = 3) -> None:
  """The CUDA kernels of `calls` calls, by total device time (per call), as a text table."""
  import os  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for i in range(calls):
      fwd(xs[i % len(xs)])
    torch.cuda.synchronize()
  with open(path, "w") as f:
    f.write(f"{calls} calls\n")
    f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
