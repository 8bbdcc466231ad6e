"""The reference row of benchmarks/train_step.py: timm's DeiT-S train step in PyTorch.

timm `deit_small_patch16_224`, AdamW (lr 5e-4, weight decay 0.05), bf16 autocast
with float32 parameters, soft-target cross-entropy, the whole step under
torch.compile; images are random float32 already on the GPU (no augmentation:
the JAX rows' device augmentation makes them do more work, not less).
Prints one `ROW {json}` line in train_step.py's schema (which fills in the MACs from its
own dense DeiT-S row: the same network).

  python -m benchmarks.timm_train_step [--batch 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  dev = torch.device("cuda")
  model = timm.create_model("deit_small_patch16_224", num_classes=1000).to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05, fused=True)
  x = torch.randn(args.batch, 3, 224, 224, device=dev)
  target = torch.softmax(torch.randn(args.batch, 1000, device=dev), -1)

  @torch.compile
  def step(x, target):
    with torch.autocast("cuda", dtype=torch.bfloat16):
      logits = model(x)
    loss = torch.sum(-target * torch.log_softmax(logits.float(), -1), -1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(3):
    step(x, target)
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    step(x, target)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  print("ROW " + json.dumps({
      "impl": "timm + torch.compile", "model": "DeiT-S/16 224px", "method": "none",
      "teacher": False, "batch": args.batch, "dtype": "bfloat16 autocast", "remat": False,
      "policy_form": "", "img_per_s": args.batch / median, "step_s": median,
      "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "xla_mem_mb": None,
      "fwd_gmacs": None, "torch": torch.__version__, "timm": timm.__version__}), flush=True)


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
