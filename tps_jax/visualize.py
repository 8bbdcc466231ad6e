"""Pictures of what a reduction did to an image, stage by stage (PNG, matplotlib).

  from tps_jax import visualize
  visualize.token_pictures(model, params, images, "tokens.png")   # runs the model, draws

For each image: the input, then one panel per stage. In a stage's panel
  - patches still kept after the stage are drawn as they are;
  - patches pruned at this stage are tinted with their host's colour, and an
    arrow runs from each to the kept patch it was squeezed into (TPS), or they
    are hatched red when they were dropped (top-k, DynamicViT) or fused into
    EViT's extra token (no single host);
  - patches pruned at an earlier stage are greyed out.

`patch_status` is the pure-numpy part (testable without drawing); `draw` only
draws; `token_pictures` runs the model on the gather path (`train=False`).
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

KEPT, PRUNED_HERE, PRUNED_BEFORE = 0, 1, 2


def patch_status(decisions: Sequence[np.ndarray],
                 hosts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per stage, what happened to each patch.

  decisions: per stage (B, N0), 1 where the patch is still kept after it.
  hosts: per stage (B, N0), host patch of each patch pruned there, else -1.
  Returns status (S, B, N0) in {KEPT, PRUNED_HERE, PRUNED_BEFORE} and
  host (S, B, N0) (-1 where there is none).
  """
  if len(decisions) != len(hosts) or not len(decisions):
    raise ValueError(f"need one decisions and one hosts array per stage (at least one), got "
                     f"{len(decisions)} and {len(hosts)}.")
  dec = np.stack([np.asarray(d) > 0.5 for d in decisions])  # (S, B, N0)
  host = np.stack([np.asarray(h).astype(np.int64) for h in hosts])
  if dec.shape != host.shape:
    raise ValueError(f"decisions {dec.shape} and hosts {host.shape} must have the same shape.")
  before = np.concatenate([np.ones_like(dec[:1]), dec[:-1]], axis=0)
  status = np.where(dec, KEPT, np.where(before, PRUNED_HERE, PRUNED_BEFORE))
  bad = (host >= 0) & (status != PRUNED_HERE)
  if bad.any():
    raise ValueError("a host is given for a patch that was not pruned at that stage.")
  if (host >= 0).any():
    kept_host = np.take_along_axis(dec, np.maximum(host, 0), axis=-1)
    if not kept_host[host >= 0].all():
      raise ValueError("a patch was squeezed into a host that was itself not kept.")
  return status, host


def _centre(index: np.ndarray, grid: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
  """Patch index -> (x, y) pixel centre of that patch."""
  return (index % grid + 0.5) * patch - 0.5, (index // grid + 0.5) * patch - 0.5


def draw(images: np.ndarray, status: np.ndarray, host: np.ndarray, *, patch_size: int,
         stage_names: Sequence[str] | None = None, title: str | None = None,
         path: str | pathlib.Path | None = None):
  """Draws `images` (B, H, W, C) with `patch_status`'s output; returns the Figure.

  Saves a PNG to `path` when given (parent folders are created).
  """
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  from matplotlib import patches as mpatches

  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}.")
  s, b, n0 = status.shape
  grid = images.shape[1] // patch_size
  if grid * grid != n0 or images.shape[0] != b:
    raise ValueError(f"{b} images of {images.shape[1]}px with patch {patch_size} give "
                     f"{grid * grid} patches, but the status is for {b} x {n0}.")
  lo, hi = images.min(axis=(1, 2, 3), keepdims=True), images.max(axis=(1, 2, 3), keepdims=True)
  rgb = (images - lo) / np.maximum(hi - lo, 1e-6)
  rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb[..., :3]
  palette = plt.get_cmap("tab20")
  names = list(stage_names or [f"stage {i + 1}" for i in range(s)])

  fig, axes = plt.subplots(b, s + 1, figsize=(1.9 * (s + 1), 1.9 * b + (0.4 if title else 0)),
                           squeeze=False)
  for i in range(b):
    axes[i, 0].imshow(rgb[i], interpolation="nearest")
    axes[i, 0].set_title("input" if i == 0 else "", fontsize=8)
    for st in range(s):
      ax = axes[i, st + 1]
      pic = rgb[i].copy()
      kept_count = int((status[st, i] == KEPT).sum())
      for p in range(n0):
        r, c = divmod(p, grid)
        cell = (slice(r * patch_size, (r + 1) * patch_size),
                slice(c * patch_size, (c + 1) * patch_size))
        if status[st, i, p] == PRUNED_BEFORE:
          pic[cell] = 0.15 + 0.2 * pic[cell].mean(axis=-1, keepdims=True)
        elif status[st, i, p] == PRUNED_HERE and host[st, i, p] >= 0:
          colour = np.asarray(palette(host[st, i, p] % 20)[:3], np.float32)
          pic[cell] = 0.45 * pic[cell] + 0.55 * colour
      ax.imshow(pic, interpolation="nearest")
      for p in np.flatnonzero(status[st, i] == PRUNED_HERE):
        r, c = divmod(int(p), grid)
        if host[st, i, p] < 0:  # dropped or fused: no single host
          ax.add_patch(mpatches.Rectangle((c * patch_size - 0.5, r * patch_size - 0.5),
                                          patch_size, patch_size, fill=False, hatch="////",
                                          edgecolor="red", linewidth=0.0))
          continue
        x0, y0 = _centre(np.asarray(p), grid, patch_size)
        x1, y1 = _centre(np.asarray(host[st, i, p]), grid, patch_size)
        colour = palette(host[st, i, p] % 20)
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color=colour, lw=0.8, shrinkA=0,
                                    shrinkB=1))
      for h in np.unique(host[st, i][host[st, i] >= 0]):
        r, c = divmod(int(h), grid)
        ax.add_patch(mpatches.Rectangle((c * patch_size - 0.5, r * patch_size - 0.5),
                                        patch_size, patch_size, fill=False,
                                        edgecolor=palette(h % 20), linewidth=1.2))
      ax.set_title(f"{names[st]}: {kept_count} kept" if i == 0 else f"{kept_count} kept",
                   fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([]); ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  if path is not None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
  return fig


def token_pictures(model, params, images, path: str | pathlib.Path | None = None, *,
                   display_images: np.ndarray | None = None, title: str | None = None):
  """Runs `model` (inference, gather path) on `images` (B, H, W, C) and draws its stages.

  `display_images` (same shape, e.g. before normalisation) are what is drawn;
  by default the model's input itself. Returns the Figure.
  """
  import jax

  red = model.plan()
  stage_blocks = model.stage_blocks()
  if not stage_blocks:
    raise ValueError(f"method {red.method!r} records no stages to draw (token_pictures needs "
                     f"a method that prunes at a few blocks, such as dtps or etps).")
  _, out = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images)
  status, host = patch_status(jax.device_get(out["decisions"]), jax.device_get(out["hosts"]))
  tokens = model.tokens()
  entering = [model.num_prefix + model.num_reducible] + [t[2] for t in tokens[:-1]]
  # A stage "before" a block runs that block's attention on fewer tokens than entered it.
  names = [f"{red.method} {'before' if tokens[loc][0] < entering[loc] else 'inside'} block {loc}"
           for loc in stage_blocks]
  shown = images if display_images is None else display_images
  return draw(np.asarray(shown), status, host, patch_size=model.patch_size, stage_names=names,
              title=title, path=path)
