"""Fashion-MNIST recipes (the offline default data): a small ViT teacher and each method.

  python train.py --config configs/fashion_mnist.py --workdir runs/teacher
  python train.py --config configs/fashion_mnist.py:method=dtps,keep=0.5,init=runs/teacher \
      --workdir runs/dtps_0.5

The model: 28x28 grey images, patch 4 (49 tokens), width 96, depth 8, 3 heads;
stages before/in blocks 2, 4, 6. Without `init` it trains from scratch (the
dense teacher); with `init` it fine-tunes from that checkpoint with the fine-tuning
losses (docs/method.md, section 9), the same checkpoint serving as the frozen teacher. With
`warm_start` it continues training a dense model from a checkpoint for
another cosine cycle (8 epochs at lr 1e-3 by default), with no teacher: the
committed teacher is 12 epochs from scratch followed by two such cycles (lr
1e-3, then 5e-4; experiments/fashion_mnist.py TEACHER_PHASES).
`tiny` shrinks everything for tests (evaluating on the first 2000 test images).
`devices=N` runs on the first N devices (0, the default: all of them).
`patch=2` gives 196 tokens (the paper's DeiT count) and `stages=3-6-9` puts the stages at
those blocks (the default: blocks 2, 4, 6, or fewer for a shallow model). `pool=gap` (or map)
builds the model without a cls token (its teacher: results/fmnist_teacher_gap/); `score` picks
the attention score of etps / evit / topk (tps_jax.methods.scored.SCORES).
"""

from configs import common

TRAIN_EXAMPLES = 60_000


def stage_blocks(stages: str, depth: int) -> tuple[int, ...]:
  """"3-6-9" -> (3, 6, 9): increasing blocks of the model, each a stage's block."""
  try:
    blocks = tuple(int(b) for b in stages.split("-"))
  except ValueError:
    raise ValueError(f"config argument stages={stages!r} is not blocks joined by '-', such as "
                     f"3-6-9.") from None
  if any(b < 0 or b >= depth for b in blocks) or list(blocks) != sorted(set(blocks)):
    raise ValueError(f"config argument stages={stages!r}: the blocks must increase, each in "
                     f"0..{depth - 1} (depth {depth}).")
  return blocks


def get_config(arg=None):
  arg = common.parse_arg(arg, method="none", keep=0.7, init="", warm_start="", epochs=0.0,
                         steps=0, batch=128, lr=0.0, seed=0, width=96, depth=8, heads=3,
                         tiny=False, r=4, pool="tok", score="auto", devices=0, patch=4,
                         stages="")
  c = common.base()
  c.seed = arg.seed
  width, depth, heads = (16, 2, 2) if arg.tiny else (arg.width, arg.depth, arg.heads)
  locations = (0, 1) if arg.tiny else (stage_blocks(arg.stages, depth) if arg.stages
                                       else tuple(range(2, depth - 1, 2))[:3])
  if arg.patch < 1 or 28 % arg.patch:
    raise ValueError(f"config argument patch={arg.patch} does not divide the 28-pixel images.")
  c.model = dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
                 patch_size=arg.patch, image_size=28,
                 layout="deit", channels=1, drop_path=0.0 if arg.tiny else 0.05, remat=False,
                 policy_form="exact",  # dtps/dynamicvit training attention, ops.POLICY_FORMS
                 pool_type=arg.pool)  # tok (cls), gap, map, 0, none
  c.model.reduction = common.reduction(arg.method, arg.keep, locations, arg.r,
                                       score=arg.score, model=c.model)

  c.input.dataset = "fashion_mnist"
  c.input.eval_split = "test[:2000]" if arg.tiny else "test"  # tests: a fifth of the test set
  c.input.batch_size = arg.batch
  c.input.eval_batch_size = 1000
  c.input.preprocess = dict(size=28, channels=1, crop="pad_random", pad=2, flip=True,
                            randaugment=None, erasing=0.0, crop_pct=1.0,
                            mean=(0.286,), std=(0.353,))
  c.mixing = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0, smoothing=0.1)

  finetuning = bool(arg.init)
  if finetuning and arg.warm_start:
    raise ValueError("give init (fine-tune a reduction from a teacher) or warm_start (continue "
                     "training a dense model), not both.")
  warmup_epochs = 0.2 if finetuning else (0.5 if arg.warm_start else 2.0)
  if arg.steps:  # a short run warms up over at most a fifth of its steps
    warmup_epochs = min(warmup_epochs, 0.2 * arg.steps * arg.batch / TRAIN_EXAMPLES)
  c.total_epochs = arg.epochs or (2.0 if finetuning else (8.0 if arg.warm_start else 12.0))
  c.total_steps = arg.steps
  default_lr = 5e-4 if finetuning else (1e-3 if arg.warm_start else 2e-3)
  c.optim = dict(lr=arg.lr or default_lr, backbone_lr_scale=1.0,
                 weight_decay=0.05, warmup_epochs=warmup_epochs,
                 warmup_init_lr=1e-6, min_lr=1e-5, clip_norm=1.0)
  if finetuning:
    common.finetune(c, arg.method)
    c.init.checkpoint = arg.init
    c.teacher.checkpoint = arg.init
  elif arg.warm_start:  # a second cosine cycle from a dense checkpoint, no teacher
    c.init.checkpoint = arg.warm_start
  if arg.devices:  # the first N devices (0: all of them)
    c.mesh.num_devices = arg.devices
  c.log_every_steps = 5 if arg.tiny else 50
  c.checkpoint.every_steps = 10 if arg.tiny else 200
  return c
