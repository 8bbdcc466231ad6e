"""The config schema every recipe fills, and big_vision-style argument parsing.

  config = common.base()                      # every key the trainer reads, with defaults
  arg = common.parse_arg("method=dtps,keep=0.5", method="none", keep=0.7)
"""

from __future__ import annotations

import ml_collections

from tps_jax import methods


_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def _typed(key: str, value: str, default):
  """`value` parsed as the type of `default`; a value that is not one is an error."""
  if isinstance(default, bool):
    if value.lower() in _TRUE:
      return True
    if value.lower() in _FALSE:
      return False
    raise ValueError(f"config argument {key}={value!r} is not a boolean (true/false, 1/0, "
                     f"yes/no).")
  if isinstance(default, (int, float)):
    kind = "an integer" if isinstance(default, int) else "a number"
    try:
      number = float(value)
    except ValueError:
      raise ValueError(f"config argument {key}={value!r} is not {kind}.") from None
    if isinstance(default, int):
      if number != int(number):
        raise ValueError(f"config argument {key}={value!r} is not an integer.")
      return int(number)
    return number
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"a=1,b=x,flag" -> ConfigDict, typed like the defaults; unknown keys and values that do
  not parse as their default's type are errors that name the argument."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}.")
    out[key] = _typed(key, value.strip(), defaults[key])
  return out


def takes_knobs(method: str) -> bool:
  """Whether a method takes the recipes' knobs (keep, locations, r: it defines `Method.spec`);
  one that does not runs at its `example`."""
  return type(methods.get(method)).spec is not methods.Method.spec


def merge_r(num_patches: int, depth: int, r: int = 13) -> int:
  """ToMe's merges per block: `r` (13, the paper's at 196 patches and 12 blocks) capped where a
  deeper model's last block could not merge that many (every block merges at most half of
  its tokens: N >= (depth + 1) r), e.g. 7 for ViT-L/16 at 224 px."""
  return max(1, min(r, num_patches // (depth + 1)))


def reduction(method: str, keep: float, locations=(3, 6, 9), r: int = 0,
              score: str = "auto", *, model=None) -> dict | None:
  """config.model.reduction for a recipe's method argument.

  `method` is any name `tps_jax.methods.get` takes: registered, or a module path
  ("my_pkg.my_method", "path/to/mine.py") imported here. A method that takes the recipes' knobs
  (`Method.spec`: keep, locations, r) gets them; any other runs at its `example` for the model
  section `model` (its fields without the reduction), and its options are then overridden
  field by field (--config.model.reduction.<option>=...).
  """
  impl = methods.get(method)
  if not takes_knobs(method) and model is not None:
    from tps_jax.models.vit import build_model  # pylint: disable=g-import-not-at-top
    spec = dict(impl.example(build_model(model, 1, reduction=None).plan().geometry))
    spec["method"] = method
    return spec
  spec = impl.spec(keep_ratio=keep, locations=tuple(locations), r=r)
  if spec is not None:
    spec["method"] = method  # the name as given (a module path resolves in a fresh process too)
    if score != "auto":
      spec["score"] = score
  return spec


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_classes = 0  # 0: take it from the dataset
  c.total_epochs = 1.0
  c.total_steps = 0  # > 0 overrides total_epochs
  c.mixed_precision = False  # bfloat16 compute, float32 parameters and optimizer state
  c.eval_precision = "train"  # evaluate as trained (bfloat16 if mixed), or "float32"
  c.log_every_steps = 50
  c.eval_every_steps = 0  # 0: evaluate at the end only
  c.eval_at_steps = ()  # and at these steps too (learning curves)
  c.tensorboard = True

  c.model = ml_collections.ConfigDict()
  c.model.variant = ml_collections.FieldReference(None, field_type=str)
  c.model.image_size = 224
  c.model.layout = "deit"
  c.model.reduction = ml_collections.FieldReference(None, field_type=dict)
  c.model.drop_path = 0.0
  c.model.remat = False
  c.model.attention = "auto"  # auto | einsum | xla | cudnn
  c.model.policy_form = "exact"  # dtps/dynamicvit training attention: ops.POLICY_FORMS

  c.input = ml_collections.ConfigDict()
  c.input.dataset = "fashion_mnist"
  c.input.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.input.train_split = "train"
  c.input.eval_split = "test"
  c.input.batch_size = 128  # global, over all processes and devices
  c.input.eval_batch_size = 500
  c.input.threads = 0  # host decode/crop threads per process; 0: min(16, CPUs)
  c.input.workers = 0  # grain worker processes (0: threads only); same batches either way
  c.input.bad_image_budget = 0.001  # undecodable images tolerated per split (a fraction)
  c.input.preprocess = ml_collections.ConfigDict(dict(
      size=224, channels=3, crop="random_resized", flip=True, randaugment=(2, 9.0),
      erasing=0.25, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))

  c.mixing = ml_collections.ConfigDict(dict(
      mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, smoothing=0.1))

  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4, backbone_lr_scale=1.0, weight_decay=0.05, warmup_epochs=5.0,
      warmup_init_lr=1e-6, min_lr=1e-5, clip_norm=0.0))

  c.loss = ml_collections.ConfigDict(dict(keep_weight=0.0, distill_weight=0.0,
                                          token_distill=True))
  c.init = ml_collections.ConfigDict(dict(checkpoint="", fresh=()))
  c.teacher = ml_collections.ConfigDict(dict(checkpoint=""))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True,
                                                fresh_despite_corrupt=False))
  return c


def finetune(c: ml_collections.ConfigDict, method: str) -> None:
  """The fine-tuning recipe (docs/method.md, section 9) on top of `c`: backbone lr x 0.01 for
  learned scorers, distillation."""
  learned = methods.get(method).learned
  c.optim.backbone_lr_scale = 0.01 if learned else 1.0
  c.loss.keep_weight = 2.0 if learned else 0.0
  c.loss.distill_weight = 0.5
  c.init.fresh = ("score_heads",) if learned else ()
