"""Shared test fixtures: the authors' golden outputs and small random inputs."""

import os
import pathlib

# Eight simulated CPU devices for the sharding tests; set before JAX starts its backend.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compiling dominates this suite (small shapes, many programs): skip LLVM's optimisations and
# XLA:CPU's MLIR fusion emitters, whose code generation costs more than the older emitters'.
# Both change only how fast the programs run; the golden tests pass at their tolerances.
# Subprocesses started by the tests inherit them. Speed is measured in benchmarks/, never here.
def _xla_knows(flag: str) -> bool:
  """Whether this jaxlib's XLA accepts `--flag` (one that does not know a flag in XLA_FLAGS
  aborts at start-up; the emitters' switch is newer, and may go, than the optimisation level)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=f"--{flag}", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        capture_output=True, check=False).returncode == 0


for _flag, _value in (("xla_backend_optimization_level", "0"),
                      ("xla_cpu_use_fusion_emitters", "false")):
  # Set once, by the first process (pytest's controller); its workers inherit the flags.
  if _flag not in os.environ.get("XLA_FLAGS", "") and (
      _flag == "xla_backend_optimization_level" or _xla_knows(f"{_flag}={_value}")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()

# One persistent compilation cache for this run's workers and subprocesses: many tests compile
# the same small programs (the tiny recipe's steps, evaluations), which then load instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tps_jax_test_xla_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# tcmalloc for the xdist workers and the tests' subprocesses, which inherit this environment
# (XLA on the CPU re-faults its buffers every step under glibc's malloc: tps_jax/host.py).
from tps_jax import host  # pylint: disable=g-import-not-at-top,wrong-import-position
os.environ.update(host.with_tcmalloc())

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The TPS authors' outputs on seeded inputs (their PyTorch code): tests/goldens/tps/.
TPS_GOLDENS = ROOT / "tests" / "goldens" / "tps"


# The modules whose tests take longest (training runs, subprocesses, the main job) go first, so
# the two workers do not end on one long test while the other idles.
_SLOW_FIRST = ("test_trainer.py", "test_study.py")


# The methods the contract suite (tests/test_methods.py) runs on. By default every registered
# method and the two examples defined outside the package; `--method NAME_OR_MODULE`
# (repeatable) runs it on those methods alone:
#   python -m pytest tests/test_methods.py --method my_pkg.my_method --method mine.py:Mine
CUSTOM_EXAMPLE = str(ROOT / "examples" / "custom_method.py")
OUTSIDE_EXAMPLES = (CUSTOM_EXAMPLE, str(ROOT / "examples" / "adaptive_squeeze.py"))
CONTRACT_METHODS: list[str] = []


def pytest_addoption(parser):
  parser.addoption("--method", "--method-module", action="append", default=[],
                   dest="contract_methods", metavar="NAME_OR_MODULE",
                   help="run the method contract (tests/test_methods.py) on this method: a "
                        "registered name, a module path (my_pkg.my_method[:Name]) or a .py file")


def pytest_configure(config):
  from tps_jax import methods  # pylint: disable=g-import-not-at-top
  chosen = config.getoption("contract_methods")
  try:
    resolved = [methods.registry.resolve(m) for m in chosen or OUTSIDE_EXAMPLES]
  except ValueError as e:
    raise pytest.UsageError(str(e)) from None
  CONTRACT_METHODS[:] = resolved if chosen else [*methods.names()]


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in _SLOW_FIRST)  # stable: order kept within


def jit_init(model, *args, **static):
  """`model.init(*args, **static)` as one compiled program: eager flax dispatches (and XLA:CPU
  compiles) every op on its own, 5 to 10 times slower for these models."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda *a: model.init(*a, **static))(*args)


def jit_apply(model, variables, *args, **kw):
  """`model.apply(variables, *args, **kw)` compiled (kw, rngs included, are closed over)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda v, *a: model.apply(v, *a, **kw))(variables, *args)


def golden(name: str) -> dict:
  """Loads `tests/goldens/tps/<name>.npz`; a missing file fails loudly, never skips."""
  path = TPS_GOLDENS / f"{name}.npz"
  if not path.exists():
    pytest.fail(f"golden file {path} is missing.")
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def opentome_deit(method: str, r: int):
  """OpenToMe's patched timm DeiT at `r` (tests/goldens/<method>/deit.npz: a seeded 64 px,
  patch 8, width 48, depth 6 DeiT of 5 classes) and ours with `method` at `r` on its weights:
  (our logits, our outputs, their logits at `r`, their logits at r = 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  with np.load(ROOT / "tests" / "goldens" / method / "deit.npz") as data:
    g = {k: data[k] for k in data.files}
  sd = {k[3:]: v for k, v in g.items() if k.startswith("sd:")}
  model = Model(5, width=48, depth=6, num_heads=3, mlp_dim=192, patch_size=8, image_size=64,
                reduction={"method": method, "r": r})
  params = checkpoints.from_torch_state_dict(sd, model)
  logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, g["images"])
  return logits, out, g[f"logits:{r}"], g["logits:0"]


def tokens(seed: int, *shape, dtype=np.float32) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)
