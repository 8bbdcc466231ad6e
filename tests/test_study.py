"""The Fashion-MNIST study: token pictures, the committed teacher, and the main job end to end."""

import argparse
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from experiments import fashion_mnist as cli
from experiments import study
from tps_jax import data, visualize
from tps_jax.checkpoints import runs as run_checkpoints
from tps_jax.data import fashion_mnist as fm
from tps_jax.models.vit import Model
from conftest import jit_init


def test_patch_status_follows_patches_through_stages():
  # 2 stages over 4 patches: stage 1 squeezes patch 3 into 0; stage 2 drops patch 2.
  decisions = [np.array([[1, 1, 1, 0]]), np.array([[1, 1, 0, 0]])]
  hosts = [np.array([[-1, -1, -1, 0]]), np.array([[-1, -1, -1, -1]])]
  status, host = visualize.patch_status(decisions, hosts)
  np.testing.assert_array_equal(status[:, 0], [[0, 0, 0, 1], [0, 0, 1, 2]])
  np.testing.assert_array_equal(host[0, 0], [-1, -1, -1, 0])
  with pytest.raises(ValueError, match="not kept"):  # a host must itself be kept
    visualize.patch_status([np.array([[0, 1, 1, 0]])], [np.array([[-1, -1, -1, 0]])])
  with pytest.raises(ValueError, match="not pruned"):
    visualize.patch_status([np.array([[1, 1, 1, 1]])], [np.array([[-1, -1, -1, 0]])])
  with pytest.raises(ValueError, match="one decisions and one hosts"):
    visualize.patch_status(decisions, hosts[:1])


@pytest.mark.parametrize("method", ["dtps", "evit"])
def test_token_pictures_of_a_model(method, tmp_path):
  model = Model(10, width=16, depth=3, num_heads=2, patch_size=4, image_size=16, channels=1,
                reduction=dict(method=method, keep_ratio=0.5, locations=(1, 2)))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  _, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  status, host = visualize.patch_status(out["decisions"], out["hosts"])
  assert status.shape == host.shape == (2, 2, 16)
  assert ((status[0] == visualize.KEPT).sum(-1) == 8).all()  # floor(16 * 0.5)
  assert ((status[1] == visualize.KEPT).sum(-1) == 4).all()  # floor(16 * 0.25)
  squeezed = (host >= 0).sum()
  assert squeezed == (12 * 2 if method == "dtps" else 0)  # every pruned patch, or none
  visualize.token_pictures(model, params, images, tmp_path / "t.png")
  assert (tmp_path / "t.png").stat().st_size > 5_000
  with pytest.raises(ValueError, match="no stages"):
    visualize.token_pictures(Model(10, width=16, depth=2, num_heads=2, patch_size=4,
                                   image_size=16, channels=1), params, images)


def test_committed_teacher_through_the_eval_pipeline():
  """The committed teacher loads into the recipe's model, and the library's eval path (grain
  batches of uint8, device normalisation, padded last batch) gives the same logits as
  normalising the raw test images by hand: 92.0% on the first 1 000 when committed (a full-size
  model under the suite's unoptimised XLA: 1 000 images, not more, about 7 s a pass here)."""
  cfg = study.fashion_mnist_config()
  params = study.load_dense(cfg, study.TEACHER)
  model = study.build_model(cfg, reduction=None)
  images, labels = fm.load("test")
  images, labels = images[:1000], labels[:1000]
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  x, _ = study.normalise(images, cfg)
  direct = np.asarray(fwd(params, x))
  assert np.mean(np.argmax(direct, -1) == labels) >= 0.91
  pre = data.Preprocess(**cfg.input.preprocess.to_dict())
  source = data.ArraySource({"test": (images, labels)}, num_classes=10)
  got, seen = [], []
  for batch in data.eval_batches(source, "test", pre, local_batch=768, shard=(0, 1)):  # 768+pad
    logits = np.asarray(fwd(params, data.eval_images(batch["image"], pre)))
    got.append(logits[batch["mask"]])
    seen.append(batch["label"][batch["mask"]])
  np.testing.assert_array_equal(np.concatenate(seen), labels)
  np.testing.assert_allclose(np.concatenate(got), direct, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """An (untrained) dense tiny model saved as a teacher checkpoint."""
  path = tmp_path_factory.mktemp("teacher") / "params.npz"
  cfg = study.fashion_mnist_config("tiny")
  model = study.build_model(cfg)
  params = jit_init(model, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  run_checkpoints.save_params_npz(params, path)
  return path


def test_main_job_end_to_end_fine_tuning_live(tiny_teacher, tmp_path, capsys):
  cli.main(["--teacher", str(tiny_teacher), "--arg", "tiny,devices=1", "quick", "--finetune", "3",
            "--methods", "dtps", "--study", str(tmp_path / "none.json"),
            "--out", str(tmp_path / "quick")])
  printed = capsys.readouterr().out
  assert "MMACs" in printed and "speed-up" in printed
  result = json.loads((tmp_path / "quick" / "quick.json").read_text())
  rows = result["rows"]
  assert [r["model"] for r in rows] == ["dense", "dtps", "etps", "topk", "tome"]
  assert all(r["examples"] == 2000 for r in rows)  # tiny: test[:2000]
  assert all(r["gmacs"] < rows[0]["gmacs"] for r in rows[1:])
  assert rows[1]["step"] == 3 and rows[1]["training"].endswith("(live)")
  for png in ("quick.png", "tokens_dtps.png"):
    assert (tmp_path / "quick" / png).stat().st_size > 5_000


def test_main_job_evaluates_committed_models_beside_the_study(tiny_teacher, tmp_path, capsys):
  # The README's main job loads the committed fine-tuned models (here tiny stand-ins with
  # score heads) and prints the study's mean ± std over seeds beside each model's figure.
  models = tmp_path / "models"
  for method in cli.FINETUNE_METHODS:
    cfg = study.fashion_mnist_config("tiny", f"method={method}", "keep=0.5")
    params = jit_init(study.build_model(cfg), jax.random.key(1),
                      jnp.zeros((1, 28, 28, 1)))["params"]
    (models / f"{method}_0.5").mkdir(parents=True)
    run_checkpoints.save_params_npz(params, models / f"{method}_0.5" / "params.npz")
    (models / f"{method}_0.5" / "summary.json").write_text(json.dumps({"step": 500}))
  rows = [{"method": m, "keep": 0.5, "seeds": 3, "top1_mean": 0.8 + i / 100, "top1_std": 0.002,
           "top1_runs": [0.8, 0.8, 0.8]} for i, m in enumerate(cli.FINETUNE_METHODS)]
  (tmp_path / "study.json").write_text(json.dumps({"what": "a stand-in study", "rows": rows}))
  cli.main(["--teacher", str(tiny_teacher), "--arg", "tiny,devices=1", "quick", "--models", str(models),
            "--study", str(tmp_path / "study.json"), "--out", str(tmp_path / "quick")])
  printed = capsys.readouterr().out
  assert "80.00 ± 0.20 (n=3)" in printed and "83.00 ± 0.20 (n=3)" in printed, printed
  result = json.loads((tmp_path / "quick" / "quick.json").read_text())
  got = [(r["model"], r["training"].split(" (")[0]) for r in result["rows"]]
  assert got == [("dense", "teacher"), ("dtps", "fine-tuned 500 steps"),
                 ("dynamicvit", "fine-tuned 500 steps"), ("etps", "fine-tuned 500 steps"),
                 ("evit", "fine-tuned 500 steps"), ("etps", "none"), ("topk", "none"),
                 ("tome", "none")]
  assert result["rows"][1]["source"].endswith("dtps_0.5/params.npz")
  shutil.rmtree(models / "evit_0.5")
  with pytest.raises(SystemExit, match="no fine-tuned evit model"):
    cli.main(["--teacher", str(tiny_teacher), "--arg", "tiny,devices=1", "quick", "--models", str(models),
              "--out", str(tmp_path / "quick")])


def test_main_job_never_deletes_a_users_folder(tiny_teacher, tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("months of work")
  with pytest.raises(SystemExit, match="was not written by this job"):
    cli.main(["--teacher", str(tiny_teacher), "--arg", "tiny,devices=1", "quick", "--finetune", "1",
              "--out", str(mine)])
  assert (mine / "thesis.tex").read_text() == "months of work"
  # A folder the job wrote itself is replaced on the next run.
  again = cli.fresh_out(tmp_path / "run")
  (again / "old.json").write_text("{}")
  assert not (cli.fresh_out(again) / "old.json").exists()


def test_offshelf_sweep_writes_curves(tiny_teacher, tmp_path, capsys):
  # A method defined outside the package, by its file: without the recipes' knobs (keep, r)
  # it runs once, at its example.
  outside = str(ROOT / "examples" / "custom_method.py")
  cli.main(["--teacher", str(tiny_teacher), "--arg", "tiny,devices=1", "--results", str(tmp_path),
            "offshelf", "--methods", f"topk,tome,{outside}", "--keeps", "0.5", "--rs", "2"])
  result = json.loads((tmp_path / "fmnist_offshelf.json").read_text())
  got = [(p["method"], p.get("keep"), p["r"]) for p in result["points"]]
  assert got == [("topk", 0.5, 0), ("tome", None, 2), (outside, 0.5, 0)]
  assert all(p["gmacs"] < result["dense"]["gmacs"] for p in result["points"])
  assert all(p["examples"] == 2000 for p in result["points"])  # tiny: test[:2000]
  assert (tmp_path / "fmnist_offshelf.png").stat().st_size > 5_000
  capsys.readouterr()
  cli.main(["--results", str(tmp_path), "report"])
  table = capsys.readouterr().out
  assert "| 0.5 | 24, 12 |" in table and "| 2 |" in table, table  # keep counts; ToMe r


def test_scores_compares_the_cls_free_scores(tiny_teacher, tmp_path, capsys):
  cli.main(["--teacher", str(tiny_teacher), "--arg", "tiny,devices=1", "--results", str(tmp_path),
            "scores", "--scores", "received,mean_query", "--methods", "topk", "--keeps", "0.5",
            "--name", "s"])
  result = json.loads((tmp_path / "s.json").read_text())
  (row,) = result["rows"]
  assert (row["method"], row["keep"]) == ("topk", 0.5)
  top1 = {sc: result["points"][sc][0]["top1"] for sc in ("received", "mean_query")}
  assert row["top1"] == top1 and row["best"] == max(top1, key=top1.get)
  assert row["margin"] == pytest.approx(abs(top1["received"] - top1["mean_query"]))
  assert result["winner"] == row["best"]
  assert "winner by mean top-1" in capsys.readouterr().out


def test_score_table_ranks_by_mean():
  pts = lambda *t: [{"method": "etps", "keep": k, "top1": v} for k, v in zip((0.7, 0.3), t)]
  table = cli.score_table({"a": pts(0.9, 0.2), "b": pts(0.8, 0.5), "c": pts(0.1, 0.1)})
  assert [(r["best"], round(r["margin"], 6)) for r in table["rows"]] == [("a", 0.1), ("b", 0.3)]
  assert table["winner"] == "b" and table["mean_top1"]["b"] == pytest.approx(0.65)


def test_map_models_score_by_the_committed_studys_winner():
  """`score="auto"` on a MAP model takes what results/fmnist_map_scores.json measured best."""
  from tps_jax.methods import scored  # pylint: disable=g-import-not-at-top
  result = json.loads((study.RESULTS / "fmnist_map_scores.json").read_text())
  assert set(result["points"]) == {"received", "mean_query", "map_probe"}
  assert all(len(v) == 6 and all(p["examples"] == 10_000 for p in v)
             for v in result["points"].values())
  assert result["winner"] == result["auto_takes"] == scored.MAP_SCORE
  assert scored.resolve_score("auto", has_cls=False, has_probe=True) == scored.MAP_SCORE
  m = Model(10, width=32, depth=3, num_heads=2, patch_size=4, image_size=16, pool_type="map",
            reduction=dict(method="etps", keep_ratio=0.5, locations=(1,)))
  assert m.reduction.options.score == scored.MAP_SCORE


def test_study_aggregates_seeds():
  runs = [{"method": "dtps", "keep": 0.5, "top1": t, "gmacs": 1.0, "images_per_s": 10.0}
          for t in (0.8, 0.9)] + [{"method": "evit", "keep": 0.7, "top1": 0.7, "gmacs": 2.0,
                                   "images_per_s": 5.0}]
  rows = study.aggregate(runs)
  assert [(r["method"], r["keep"], r["seeds"]) for r in rows] == [("evit", 0.7, 1),
                                                                  ("dtps", 0.5, 2)]
  assert rows[1]["top1_mean"] == pytest.approx(0.85)
  assert rows[1]["top1_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))


def test_missing_teacher_names_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="experiments.fashion_mnist teacher"):
    study.load_dense(study.fashion_mnist_config("tiny"), tmp_path / "nope.npz")


def test_teacher_and_finetune_recipes():
  from configs import fashion_mnist as recipe
  scratch = recipe.get_config("")
  assert (scratch.total_epochs, scratch.optim.lr, scratch.init.checkpoint) == (12.0, 2e-3, "")
  warm = recipe.get_config("warm_start=t.npz")  # a later teacher cycle: no teacher, no KD
  assert (warm.total_epochs, warm.optim.lr, warm.init.checkpoint) == (8.0, 1e-3, "t.npz")
  assert warm.teacher.checkpoint == "" and warm.loss.distill_weight == 0.0
  short = recipe.get_config("method=dtps,init=t.npz,steps=100")  # warm-up a fifth of the run
  assert short.optim.warmup_epochs == pytest.approx(0.2 * 100 * 128 / 60_000)
  assert short.teacher.checkpoint == "t.npz" and short.optim.backbone_lr_scale == 0.01
  with pytest.raises(ValueError, match="not both"):
    recipe.get_config("init=a.npz,warm_start=b.npz")


def test_publish_copies_the_seed0_models_and_names_those_trained_elsewhere(tmp_path, capsys):
  # A run carried from the GPU machine without its parameters is named and skipped; the others
  # are copied (params, config, summary) under the method and keep.
  for name, with_params in (("dtps_0.7_s0", True), ("evit_0.7_s0", False), ("etps_0.7_s1", True)):
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    for f in ("config.json", "summary.json") + (("params.npz",) if with_params else ()):
      (run / f).write_text(name)
  args = argparse.Namespace(results=str(tmp_path / "results"), workdir=str(tmp_path / "runs"),
                            publish_keep=0.7)
  runs = [{"method": m, "keep": 0.7, "seed": s, "workdir": f"{m}_0.7_s{s}"}
          for m, s in (("dtps", 0), ("evit", 0), ("etps", 1))]
  cli._publish(args, runs)  # pylint: disable=protected-access
  published = tmp_path / "results" / "fmnist_finetuned"
  assert sorted(p.name for p in published.iterdir()) == ["dtps_0.7"]
  assert (published / "dtps_0.7" / "params.npz").read_text() == "dtps_0.7_s0"
  assert "not published" in capsys.readouterr().out
