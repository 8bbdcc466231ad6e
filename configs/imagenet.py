"""ImageNet-1k recipes: DeiT-Ti/S/B dense (DeiT) and TPS fine-tuning (docs/method.md, section 9).

  python train.py --config configs/imagenet.py:variant=S,data_dir=/data/tfds --workdir runs/deit_s
  python train.py --config configs/imagenet.py:variant=S,method=dtps,keep=0.7,\
init=deit_small_patch16_224-cd65a155.pth,data_dir=/data/tfds --workdir runs/dtps_s

Any ViT from a downloaded Hub directory (timm's, transformers' or OpenCLIP's: DINOv2, CLIP,
SigLIP, ...) in place of a DeiT, in two runs: `hub=DIR` fine-tunes it dense at 224 px with a new
1000-class head (DeiT's fine-tuning schedule, no teacher), then `hub=DIR,init=<that workdir>,
method=dtps` reduces it with that run as its teacher (`variant` is not read; drop path 0.1):

  python train.py --config configs/imagenet.py:hub=/models/dinov2-small,data_dir=/data/tfds \
      --workdir runs/dinov2_s
  python train.py --config configs/imagenet.py:hub=/models/dinov2-small,init=runs/dinov2_s,\
method=dtps,data_dir=/data/tfds --workdir runs/dinov2_s_dtps

imagenet2012 is read through tfds from `data_dir` (prepare it once with
`tfds build imagenet2012 --manual_dir=...`). Fine-tuning: 30 epochs, batch
1024, lr 2.5e-4 (no linear scaling), backbone lr x 0.01 for dtps/dynamicvit,
weight decay 0.05, 5 warm-up epochs from 1e-6, cosine, keep-ratio loss x 2,
KL + token distillation x 0.5 against the frozen dense model, DeiT
augmentation. Dense: DeiT's 300 epochs at lr 5e-4 x batch / 512.

Where this differs from DeiT's recipe (timm's code as DeiT runs it): no repeated
augmentation (DeiT's RASampler shows each image 3 times an epoch, spread over
the GPUs; here each host reads only its own shard of the split, once an epoch).
The rest follows timm: RandAugment samples its warps bicubic and fills with the
mean colour, and mixup / CutMix draw one coefficient per device's batch, as per
GPU (docs/input.md). The evaluation batch (1024) divides over 1 to 1024 devices
in powers of two.
ToMe merges `r` tokens a block: 13 (the paper's) where the depth allows, else the most that
every block can (7 for L). `remat=True` rematerialises every block; `policy_form` picks the
dtps/dynamicvit training attention (exact, deferred, or the fused approximation log_bias).
"""

import pathlib

from configs import common
from tps_jax.checkpoints import pretrained
from tps_jax.methods import scored
from tps_jax.models import vit

DROP_PATH = {"Ti": 0.0, "S": 0.1, "B": 0.1, "L": 0.1}


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="S", method="none", keep=0.7, init="", data_dir="",
                         batch=1024, epochs=0.0, fsdp=1, bf16=True, remat=False, seed=0,
                         r=0, policy_form="exact", hub="")
  if arg.variant not in DROP_PATH:
    raise ValueError(f"unknown DeiT variant {arg.variant!r}; expected one of {sorted(DROP_PATH)}.")
  c = common.base()
  c.seed = arg.seed
  c.num_classes = 1000
  c.mixed_precision = arg.bf16
  run = dict(image_size=224, drop_path=0.1 if arg.hub else DROP_PATH[arg.variant],
             remat=arg.remat, policy_form=arg.policy_form)
  if arg.hub:
    c.model = {**_hub_model(arg.hub), **run}
  else:
    c.model = dict(variant=f"{arg.variant}/16", layout="deit", **run)
  dense = vit.build_model(c.model, 1)
  locations = (3, 6, 9) if not arg.hub else scored.default_locations(dense.depth)
  c.model.reduction = common.reduction(arg.method, arg.keep, locations,
                                       arg.r or common.merge_r(dense.num_patches, dense.depth),
                                       model=c.model)
  c.input.dataset = "imagenet2012"
  c.input.data_dir = arg.data_dir or None
  c.input.train_split = "train"
  c.input.eval_split = "validation"
  c.input.batch_size = arg.batch
  c.input.eval_batch_size = 1024  # divides over any power-of-two device count to 1024
  c.mesh = dict(data=-1, fsdp=arg.fsdp)
  from_hub = bool(arg.hub) and arg.init in ("", arg.hub)
  if from_hub:  # the Hub's backbone, a new head, fine-tuned dense first: nothing to distil
    if arg.method != "none":
      raise ValueError(f"hub={arg.hub!r} has no ImageNet head to distil {arg.method!r} from: "
                       "fine-tune it dense first (hub=... alone), then reduce it with "
                       "init=<that workdir>.")
    arg.init = arg.hub
  finetuning = bool(arg.init)
  if finetuning:
    c.total_epochs = arg.epochs or 30.0
    c.optim = dict(lr=2.5e-4, backbone_lr_scale=1.0, weight_decay=0.05, warmup_epochs=5.0,
                   warmup_init_lr=1e-6, min_lr=1e-6, clip_norm=0.0)
    common.finetune(c, arg.method)
    c.init.checkpoint = arg.init
    c.teacher.checkpoint = arg.init
    if from_hub:
      c.init.fresh = ("head",)
      c.teacher.checkpoint = ""
      c.loss.distill_weight = 0.0
  else:
    c.total_epochs = arg.epochs or 300.0
    c.optim = dict(lr=5e-4 * arg.batch / 512, backbone_lr_scale=1.0, weight_decay=0.05,
                   warmup_epochs=5.0, warmup_init_lr=1e-6, min_lr=1e-5, clip_norm=0.0)
  c.log_every_steps = 100
  c.checkpoint.every_steps = 1000
  return c


def _hub_model(directory: str) -> dict:
  """The model section of a Hub directory's ViT (read as `from_pretrained` reads it)."""
  kw = pretrained.hub_model_kwargs(pathlib.Path(directory))
  kw.pop("reduction", None)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
