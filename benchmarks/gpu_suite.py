"""The GPU suite: one command, at most 8 minutes on one H100/H200 (compiles included), for the
GPU figures flaxbert reports.

    python benchmarks/gpu_suite.py OUTDIR              # one GPU; --budget-s 480 (the default)
    python benchmarks/gpu_suite.py --smoke OUTDIR      # the same code at tiny shapes, on a CPU

It writes OUTDIR/gpu_suite.json after every section (a kill loses nothing) with OUTDIR/gpu_suite.md
beside it, and prints the Markdown at the end; progress goes to stderr, timestamped. Sections:

  1. Environment: Python, JAX, jaxlib and its CUDA plugin packages, the CUDA runtime and cuDNN
     versions JAX loaded, `jax.print_environment_info()`, the device, nvidia-smi, torch (its
     CUDA and cuDNN) and transformers.
  2. Attention, bf16, padded: `jax.nn.dot_product_attention` implementation='cudnn' against
     'xla' (batch 8 x 512, 16 heads of 64, padding as key_value_seq_lengths, as flaxbert gives
     it), output and q/k/v gradients; then flaxbert's model (BERT-base width, 4 layers, batch 16
     x 128, deterministic) with model.attention_impl=cudnn against xla, loss and parameter
     gradients, and whether the compiled step holds a cuDNN kernel. Each also against float32
     (matmul precision 'highest'). On a CPU the cuDNN rows say "n/a: cuDNN needs an NVIDIA GPU".
  3. bf16 against float32: BERT-base s128 batch 32, 50 steps (warm-up 5, then linear decay), the
     same init, batches and dropout masks; float32 at matmul precision 'highest' (so XLA
     attention: cuDNN's needs 16-bit). Both loss curves, their largest and final difference.
  4. Throughput, bf16: the train step as `flaxbert pretrain` compiles it, timed by
     benchmarks/train_throughput.py (median of 20 steps after 3 warm-up ones, each waited for):
     BERT-base s128 batch 256, BERT-large s128 batch 128, BERT-large s512 batch 32 (80
     predictions per sequence, BERT's s512 phase); batches a GPU of 80 GB or more holds easily,
     large enough that a step is far past launch overhead. Vocabulary 30522,
     model.attention_dropout_rate=0 so that model.attention_impl='' takes cuDNN flash
     attention (JAX's fused kernels have no dropout). Model TFLOP/s and MFU against
     train_throughput.PEAK_TFLOPS (H100 SXM and H200: 989 TFLOP/s dense bf16).
  5. The largest BERT-base s128 batch whose compiled step fits (train_throughput.find_max_batch
     from batch 1024 against JAX's bytes_limit, confirmed by one real step; past its deadline it
     compiles no more and reports the largest batch known to fit), and, measured with section
     4's first shape, the loop with the real data loader against pre-loaded batches.
  6. transformers' PyTorch BertForPreTraining (benchmarks/torch_reference.py: SDPA attention,
     bf16 autocast, AdamW) on each shape's batches right after flaxbert, and flaxbert/torch
     throughput. Without torch: "skipped: torch not installed".

They run in the order 1, 2, 4 with 6 and 5's loader, 3, 5's batch search. Each step has a
deadline inside --budget-s (a fraction of it: attention 10%, throughput 68%, precision 82%,
batch search 94%) and one that would start later says "skipped: time budget"; a watchdog at
the budget marks the section in progress "stopped", writes both files and exits 0. JAX runs
with XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set) so that torch, in the same process, gets
the memory JAX does not use.

--smoke: the same code at tiny shapes for a CPU, 80-115 s on 2 busy cores
(tests/gpu_suite_test.py runs it): configs/pretrain.py:tiny, vocabulary 1024, throughput in
float32 (XLA:CPU compiles bf16 steps 3x slower) at s32 batch 8 and s64 batch 4, 2 timed steps
after 1, 6 precision steps, the batch search from 8 within 0.02 GiB, XLA's optimisations off
(jax_disable_most_optimizations: compiling dominates tiny runs).

On this workplace's GPU machine: its image (python3 3.12, jax, flax, optax, orbax, torch,
transformers) lacks ml_collections, which flaxbert's configs need (tensorflow-datasets and
tensorboardX, also absent there, are not imported on this path); the suite says so and exits
2 when a package is missing. Carry it as wheels. Here, once:

    echo /.wheels/ >> .git/info/exclude
    launch/wheelhouse.sh .wheels --python 3.12 --platform manylinux_2_28_x86_64 \
        --only "ml_collections"

then the device tool's run, with carry [".wheels"] and timeout_s 600:

    python3 -m pip install -q --no-index --find-links .wheels ml_collections && \
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py $OUT/suite

Both files come back from $OUT/suite (one folder down; at most 8 files come back).
"""

from __future__ import annotations

import time

_START = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

# What this suite's path imports (module, pip name); checked before anything is imported.
REQUIRED = [
    ("numpy", "numpy"),
    ("jax", "jax"),
    ("flax", "flax"),
    ("optax", "optax"),
    ("orbax.checkpoint", "orbax-checkpoint"),
    ("ml_collections", "ml_collections"),  # configs/*.py and flaxbert.config
    ("absl", "absl-py"),
    ("yaml", "PyYAML"),  # ml_collections needs it
]


def missing_packages() -> list[str]:
    missing = []
    for module, pip_name in REQUIRED:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(pip_name)
    return missing


def missing_message(missing: list[str]) -> str:
    names = " ".join(missing)
    return (
        f"gpu_suite: missing Python package(s): {', '.join(missing)}. flaxbert's configs and "
        "trainer import them. Where pip can reach an index: pip install " + names + "\n"
        "On a machine without one (the GPU image), carry them as wheels. Here:\n"
        "    echo /.wheels/ >> .git/info/exclude\n"
        "    launch/wheelhouse.sh .wheels --python 3.12 --platform manylinux_2_28_x86_64 "
        f'--only "{names}"\n'
        'there (device tool: carry [".wheels"]):\n'
        f"    python3 -m pip install -q --no-index --find-links .wheels {names} && "
        "python3 benchmarks/gpu_suite.py $OUT/suite\n"
        "(tensorflow-datasets and tensorboardX are not needed by this suite)"
    )


if __name__ == "__main__":
    _missing = missing_packages()
    if _missing:
        print(missing_message(_missing), file=sys.stderr)
        sys.exit(2)
    # Memory on demand, so that torch (same process) gets what JAX does not use.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput as tt  # noqa: E402

from flaxbert import attention, pretrain_step, train  # noqa: E402
from flaxbert.config import load_config  # noqa: E402
from flaxbert.pretraining_model import BertForPreTraining  # noqa: E402

CONFIG_FILE = os.path.join(REPO, "configs", "pretrain.py")
JSON_NAME, MD_NAME = "gpu_suite.json", "gpu_suite.md"
NOT_ON_CPU = "n/a: cuDNN needs an NVIDIA GPU"
TORCH_MISSING = "skipped: torch not installed"
TORCH_SYSTEM = "transformers (PyTorch)"
SECTIONS = {  # key: title, in report order
    "environment": "1. Environment",
    "attention": "2. Attention: cuDNN vs XLA",
    "precision": "3. bf16 vs float32 loss",
    "throughput": "4. Throughput",
    "max_batch_loader": "5. Largest batch and loader overhead",
    "torch": "6. transformers' PyTorch BertForPreTraining on the same shapes",
}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    variant: str  # configs/pretrain.py argument
    seq: int
    batch: int
    predictions: int  # data.max_predictions_per_seq


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every size the suite uses, for a GPU or for --smoke."""

    shapes: tuple[Shape, ...]
    warmup: int
    steps: int
    attention_fn: tuple[int, int, int, int]  # B, L, N, H of the bare attention check
    attention_model: tuple[str, int, int, int]  # variant, layers, seq, batch of the model check
    precision: Shape
    precision_steps: int
    max_batch: Shape  # its batch is where the search starts
    memory_gb: float | None  # None: the device's bytes_limit
    vocab_size: int
    dtype: str  # of the throughput table and the batch search
    # Fractions of the budget by which each step must have started.
    deadlines: dict


GPU_PLAN = Plan(
    shapes=(
        Shape("BERT-base s128", "base", 128, 256, 20),
        Shape("BERT-large s128", "large", 128, 128, 20),
        Shape("BERT-large s512", "large", 512, 32, 80),
    ),
    warmup=3,
    steps=20,
    attention_fn=(8, 512, 16, 64),
    attention_model=("base", 4, 128, 16),
    precision=Shape("BERT-base s128", "base", 128, 32, 20),
    precision_steps=50,
    max_batch=Shape("BERT-base s128", "base", 128, 1024, 20),
    memory_gb=None,
    vocab_size=30522,
    dtype="bfloat16",
    deadlines={"attention": 0.1, "throughput": 0.68, "precision": 0.82, "max_batch": 0.94},
)
SMOKE_PLAN = Plan(
    shapes=(
        Shape("tiny s32", "tiny", 32, 8, 5),
        Shape("tiny s64", "tiny", 64, 4, 10),
    ),  # two: each costs two compiles (init and step), 10-20 s on a busy 2-core CPU
    warmup=1,
    steps=2,
    attention_fn=(2, 64, 2, 32),
    attention_model=("tiny", 2, 32, 4),
    precision=Shape("tiny s32", "tiny", 32, 4, 5),
    precision_steps=6,
    max_batch=Shape("tiny s32", "tiny", 32, 8, 5),
    memory_gb=0.02,  # between batches 8 and 16 (18 and 28 MB): two compiles
    vocab_size=1024,
    dtype="float32",  # XLA:CPU compiles bf16 steps 3x slower (17 s against 6 s for tiny)
    deadlines=GPU_PLAN.deadlines,
)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


# ------------------------------------------------------------------------------ the report


class Report:
    """The JSON document, written (with its Markdown) after every section; thread-safe, so the
    watchdog can write what there is when the budget runs out."""

    def __init__(self, outdir: str, mode: str, budget_s: float):
        self.outdir, self.budget_s = outdir, budget_s
        self.lock = threading.RLock()
        self.running: tuple[str, ...] = ()  # the sections in progress
        self.data = {
            "suite": {
                "mode": mode,
                "budget_s": budget_s,
                "started_utc": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S}",
                "elapsed_s": None,
                "finished": False,
                "command": " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
            },
            "sections": {key: {"status": "not run yet"} for key in SECTIONS},
        }

    def elapsed(self) -> float:
        return time.monotonic() - _START

    def update(self, key: str, **values) -> None:
        with self.lock:
            self.data["sections"][key].update(values)
            self.write()

    def write(self) -> None:
        with self.lock:
            self.data["suite"]["elapsed_s"] = round(self.elapsed(), 1)
            os.makedirs(self.outdir, exist_ok=True)
            for name, text in (
                (JSON_NAME, json.dumps(_finite(self.data), indent=2)),
                (MD_NAME, markdown(self.data)),
            ):
                tmp = os.path.join(self.outdir, name + ".tmp")
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, os.path.join(self.outdir, name))

    def out_of_time(self) -> None:
        """The watchdog: the budget is spent; record where, write, print and exit."""
        with self.lock:
            for key, section in self.data["sections"].items():
                if key in self.running:
                    section["status"] = (
                        f"stopped: time budget ({self.budget_s:g} s) ran out during this section"
                    )
                elif section["status"] in ("not run yet", "running"):
                    section["status"] = "skipped: time budget"
            self.data["suite"]["finished"] = True
            self.write()
            log(f"time budget of {self.budget_s:g} s reached: wrote {self.outdir}; exiting")
            print(markdown(self.data), flush=True)
        os._exit(0)


def _finite(x):
    """JSON without NaN/Infinity (not JSON): non-finite floats become strings."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float | np.floating) and not math.isfinite(x):
        return str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def log(message: str) -> None:
    stamp = f"{datetime.datetime.now():%H:%M:%S}"
    print(f"[gpu_suite {stamp} +{time.monotonic() - _START:.0f}s] {message}", file=sys.stderr)
    sys.stderr.flush()


class Clock:
    def __init__(self, budget_s: float, deadlines: dict):
        self.budget_s, self.deadlines = budget_s, deadlines

    def before(self, name: str) -> bool:
        """Whether step `name` may still start (its deadline is a fraction of the budget)."""
        ok = time.monotonic() - _START < self.deadlines[name] * self.budget_s
        if not ok:
            log(f"{name}: skipped (time budget)")
        return ok

    def at(self, name: str) -> float:
        return _START + self.deadlines[name] * self.budget_s


# ------------------------------------------------------------------------------- configs


def suite_config(plan: Plan, shape: Shape, *, dtype: str, steps: int = 1000, **extra):
    """configs/pretrain.py at `shape`; model.attention_impl stays '' (cuDNN where it can run)."""
    overrides = {
        "model.vocab_size": plan.vocab_size,
        "model.dtype": dtype,
        "model.attention_dropout_rate": 0.0,  # JAX's fused kernels cannot drop probabilities
        "data.max_seq_length": shape.seq,
        "data.max_predictions_per_seq": shape.predictions,
        "data.synthetic_documents": 500,  # as train_throughput: a small corpus builds fast
        "train.batch_size": shape.batch,
        "train.num_steps": steps,
        **extra,
    }
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    return load_config(f"{CONFIG_FILE}:{shape.variant}", args), args


# ---------------------------------------------------------------------------- 1. environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_versions() -> dict:
    """CUDA, cuDNN and the rest as the jaxlib CUDA plugin loaded them (none on a CPU build)."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        cuda_versions = None
    if cuda_versions is None:
        return {}
    out = {}
    for name in dir(cuda_versions):
        fn = getattr(cuda_versions, name)
        if not name.endswith("_version") or not callable(fn):
            continue
        try:
            out[name] = fn()
        except Exception as e:  # a getter that needs arguments, or a library not loaded
            out[name] = f"error: {e}"
    return out


def _dotted(v, cudnn: bool = False) -> str:
    if not isinstance(v, int):
        return str(v)
    if cudnn:  # 9.x: major*10000 + minor*100 + patch
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 10000 else str(v)
    return f"{v // 1000}.{v % 1000 // 10}"  # CUDA: major*1000 + minor*10


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]}: not found"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cmd[0]}: {e}"
    return (done.stdout + done.stderr).strip()


def cuda_libraries() -> dict[str, list[str]]:
    """The CUDA libraries this process has mapped, by name (Linux): torch and JAX in one process
    can load two copies of cuDNN or cuBLAS, and then the version JAX reports may not be the
    one that runs."""
    found: dict[str, set[str]] = {}
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/lib" in line and ".so" in line}
    except OSError:
        return {}
    for path in paths:
        base = os.path.basename(path)
        for lib in ("libcudnn", "libcublas", "libcudart", "libnccl"):
            if base.startswith(lib):
                found.setdefault(lib, set()).add(path)
    return {lib: sorted(p) for lib, p in sorted(found.items())}


def torch_line() -> tuple[str | None, str]:
    """(None, the versions) or (why torch cannot run, install advice)."""
    try:
        from benchmarks import torch_reference

        return None, torch_reference.torch_version_line()
    except SystemExit as e:
        return TORCH_MISSING, str(e.code if e.code is not None else "")
    except ImportError as e:
        return TORCH_MISSING, f"{e}: pip install torch transformers"


def environment() -> dict:
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    cuda = _cuda_versions()
    env = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "platform_version": getattr(device.client, "platform_version", None),
        "memory_bytes_limit": (device.memory_stats() or {}).get("bytes_limit"),
        "jax_cuda_packages": {
            d: v
            for d in (
                "jax-cuda13-plugin",
                "jax-cuda13-pjrt",
                "jax-cuda12-plugin",
                "jax-cuda12-pjrt",
                "nvidia-cudnn-cu13",
                "nvidia-cudnn-cu12",
            )
            if (v := _version(d))
        },
        "cuda_versions": cuda,
        "cuda_runtime": _dotted(cuda.get("cuda_runtime_get_version")) if cuda else None,
        "cudnn": _dotted(cuda.get("cudnn_get_version"), cudnn=True) if cuda else None,
        "environment_info": jax.print_environment_info(return_string=True),
        "nvidia_smi_query": _run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ]
        ),
        "nvidia_smi": _run(["nvidia-smi"]),
        "env": {
            k: os.environ.get(k)
            for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")
        },
        "not_needed_here": {
            m: "installed" if importlib.util.find_spec(m) else "absent"
            for m in ("tensorflow_datasets", "tensorboardX")
        },
    }
    skipped, line = torch_line()
    env["torch"] = line if skipped is None else f"{skipped} ({line})"
    if skipped is None:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["torch_cudnn"] = (
            torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        )
        env["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env["cuda_libraries"] = cuda_libraries()  # after torch started CUDA, if it did
    return env


# ----------------------------------------------------------------------------- 2. attention


def _max_abs(a, b, where=None) -> float:
    d = jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))
    if where is not None:
        d = jnp.where(where, d, 0.0)
    return float(jnp.max(d))


def _tree_max_abs(a, b) -> float:
    return max(_max_abs(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _tree_scale(a) -> float:
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(a))


def _uses_cudnn(jitted, *args) -> bool:
    """Whether the compiled function calls cuDNN's fused attention (its custom call)."""
    text = jitted.lower(*args).compile().as_text() or ""
    return "__cudnn$fmha" in text


def attention_function_check(b: int, length: int, n: int, h: int) -> dict:
    """Bare `jax.nn.dot_product_attention`, bf16, padding given as key_value_seq_lengths (as
    flaxbert gives it to cuDNN); outputs compared on real query rows only."""
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (b, length, n, h), jnp.float32) for key in keys[:3])
    lengths = jax.random.randint(keys[3], (b,), length // 4, length + 1).at[0].set(length)
    valid_BL = jnp.arange(length)[None, :] < lengths[:, None]
    cot = jax.random.normal(keys[4], (b, length, n, h)) * valid_BL[:, :, None, None]

    def run(impl, dtype):
        def loss(q, k, v):
            out = jax.nn.dot_product_attention(
                q.astype(dtype),
                k.astype(dtype),
                v.astype(dtype),
                key_value_seq_lengths=lengths,
                implementation=impl,
            ).astype(jnp.float32)
            return jnp.sum(out * cot), out

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
        grads, out = fn(q, k, v)
        return out, grads, on_gpu() and _uses_cudnn(fn, q, k, v)

    with jax.default_matmul_precision("highest"):
        ref = run("xla", jnp.float32)
    impls = {"xla": run("xla", jnp.bfloat16)}
    if on_gpu():
        impls["cudnn"] = run("cudnn", jnp.bfloat16)
    where = valid_BL[:, :, None, None]
    out = {
        "shape": {"batch": b, "length": length, "heads": n, "head_dim": h},
        "lengths": [int(x) for x in lengths],
        "output_scale": float(jnp.max(jnp.abs(ref[0]))),
        "grad_scale": _tree_scale(ref[1]),
    }
    for name, (o, g, _) in impls.items():
        out[f"{name}_bf16_vs_f32"] = {
            "forward": _max_abs(o, ref[0], where),
            "grad": _tree_max_abs(g, ref[1]),
        }
    if "cudnn" in impls:
        (o1, g1, fused1), (o2, g2, fused2) = impls["cudnn"], impls["xla"]
        out["cudnn_vs_xla"] = {"forward": _max_abs(o1, o2, where), "grad": _tree_max_abs(g1, g2)}
        out["fused_attention_in_hlo"] = {"cudnn": fused1, "xla": fused2}
    else:
        out["cudnn_vs_xla"] = NOT_ON_CPU
    return out


def synthetic_batch(rng: np.random.Generator, b: int, s: int, p: int, vocab: int) -> dict:
    """A padded pre-training batch: random lengths, two segments, predictions inside."""
    lengths = rng.integers(s // 4, s + 1, b)
    lengths[0] = s
    pos = np.arange(s)[None, :]
    mask = (pos < lengths[:, None]).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(n, p, replace=n < p)) for n in lengths])
    return {
        "input_ids": (rng.integers(5, vocab, (b, s)) * mask).astype(np.int32),
        "input_mask": mask,
        "segment_ids": ((pos >= lengths[:, None] // 2) * mask).astype(np.int32),
        "masked_lm_positions": positions.astype(np.int32),
        "masked_lm_ids": rng.integers(5, vocab, (b, p)).astype(np.int32),
        "masked_lm_weights": np.ones((b, p), np.float32),
        "next_sentence_labels": rng.integers(0, 2, b).astype(np.int32),
    }


def attention_model_check(plan: Plan) -> dict:
    """flaxbert's model, deterministic (so the fused path runs), bool padding mask: the loss and
    parameter gradients with attention_impl cudnn against xla, and each against float32."""
    variant, layers, seq, batch = plan.attention_model
    shape = Shape(variant, variant, seq, batch, max(1, round(0.15 * seq)))
    config, _ = suite_config(plan, shape, dtype="bfloat16")
    with config.unlocked():
        config.model.num_layers = layers
    base = train.validate_pretrain_config(config)
    batch_np = synthetic_batch(
        np.random.default_rng(0), batch, seq, shape.predictions, plan.vocab_size
    )
    params = pretrain_step.init_params(
        BertForPreTraining(base), jax.random.key(0), seq, shape.predictions
    )

    def run(impl, dtype):
        model = BertForPreTraining(dataclasses.replace(base, attention_impl=impl, dtype=dtype))

        def loss_fn(params, batch):
            sums = pretrain_step.pretraining_sums(model, params, batch, deterministic=True)
            return pretrain_step.summarise(sums)["loss"]

        fn = jax.jit(jax.value_and_grad(loss_fn))
        loss, grads = fn(params, batch_np)
        return float(loss), grads, on_gpu() and _uses_cudnn(fn, params, batch_np)

    with jax.default_matmul_precision("highest"):
        ref = run("xla", "float32")
    impls = {"xla": run("xla", "bfloat16")}
    if on_gpu():
        impls["cudnn"] = run("cudnn", "bfloat16")
    out = {
        "model": f"{variant} width, {layers} layers, batch {batch} x seq {seq}",
        "real_token_fraction": float(batch_np["input_mask"].mean()),
        "f32_loss": ref[0],
        "grad_scale": _tree_scale(ref[1]),
    }
    for name, (loss, grads, _) in impls.items():
        out[f"{name}_bf16_vs_f32"] = {
            "loss": abs(loss - ref[0]),
            "grad": _tree_max_abs(grads, ref[1]),
        }
    if "cudnn" in impls:
        (l1, g1, fused1), (l2, g2, fused2) = impls["cudnn"], impls["xla"]
        out["cudnn_vs_xla"] = {"loss": abs(l1 - l2), "grad": _tree_max_abs(g1, g2)}
        out["fused_attention_in_hlo"] = {"cudnn": fused1, "xla": fused2}
    else:
        out["cudnn_vs_xla"] = NOT_ON_CPU
    return out


# ---------------------------------------------------------------------------- 4-6. throughput


def attention_reason(m) -> dict:
    """What flaxbert's attention runs for model config `m` in training (flaxbert.attention)."""
    choice = attention.choose_attention(
        backend=attention.platform(),
        dtype=m.dtype,
        packed=False,
        dropout=m.attention_dropout_rate > 0,
        jax_version=jax.__version__,
        requested=m.attention_impl,
        head_dim=m.head_dim,
    )
    return {"impl": choice.impl, "reason": choice.reason}


def time_flaxbert(plan: Plan, shape: Shape, loader: bool):
    """(bench, row, loader result or None) of flaxbert's train step at `shape`."""
    config, overrides = suite_config(plan, shape, dtype=plan.dtype)
    args = types.SimpleNamespace(warmup=plan.warmup, steps=plan.steps, loader=loader)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as workdir:
        bench = tt.prepare(config, workdir, plan.warmup + plan.steps)
        run = tt.bench_flaxbert(bench, args)
    flops = tt.model_flops(bench)
    peak, peak_line = tt.peak_tflops(None, bench.model_config.dtype)
    devices = bench.setup.parallel.num_devices
    row = tt.report_rows([run.timing], flops, peak, devices, (shape.batch, shape.seq))[0]
    row.update(shape=shape.name, batch=shape.batch, seq=shape.seq, status="done")
    row.update(
        dtype=bench.model_config.dtype,
        overrides=overrides,
        attention=attention_reason(bench.model_config),
        model_flops_per_step=flops["per_step"],
        formula=flops["formula"],
        peak_tflops=peak,
        peak_line=peak_line,
    )
    return bench, row, run.loader


def time_torch(plan: Plan, bench, shape: Shape, flax_row: dict) -> dict:
    """transformers' PyTorch BertForPreTraining on `bench`'s batches, each step waited for."""
    from benchmarks import torch_reference

    ref = torch_reference.TorchBert(
        bench.model_config,
        bench.config.train,
        device="cuda" if on_gpu() else "cpu",
        autocast_dtype=None if plan.dtype == "float32" else plan.dtype,
        seed=bench.config.train.seed,
    )
    try:
        batches = [ref.batch(b) for b in bench.host_batches]
        times, losses = [], []
        for batch in batches:
            start = time.perf_counter()
            losses.append(ref.step(batch))  # waited for
            times.append(time.perf_counter() - start)
    finally:
        ref = batches = None
        _free_torch_memory()
    timing = tt.Timing(TORCH_SYSTEM, times[plan.warmup :], times[0], losses[0], None)
    flops = {"per_step": flax_row["model_flops_per_step"]}
    row = tt.report_rows([timing], flops, flax_row["peak_tflops"], 1, (shape.batch, shape.seq))[0]
    row.update(shape=shape.name, batch=shape.batch, seq=shape.seq, status="done")
    row["flaxbert_over_torch_throughput"] = row["step_ms"] / flax_row["step_ms"]
    return row


def _free_torch_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _failed(shape: Shape, what: str, e: Exception) -> dict:
    log(f"throughput: {what} {shape.name} failed: {e!r}")
    return {"shape": shape.name, "status": f"error: {e!r}"[:2000]}


def throughput(report: Report, plan: Plan, clock: Clock) -> None:
    """Sections 4 and 6 together, shape by shape (flaxbert, then torch on the same batches);
    the loader's overhead (section 5) on the first shape."""
    torch_skip, torch_advice = torch_line()
    rows, torch_rows = [], []
    report.update("throughput", status="running", rows=rows)
    torch_status = f"{torch_skip} ({torch_advice})" if torch_skip else "running"
    report.update("torch", status=torch_status, rows=torch_rows)
    skipped = {"status": "skipped: time budget"}
    for i, shape in enumerate(plan.shapes):
        if not clock.before("throughput"):
            rows.append({"shape": shape.name, **skipped})
            torch_rows.append({"shape": shape.name, **skipped})
            continue
        log(f"throughput: flaxbert {shape.name} batch {shape.batch}")
        try:  # one shape's failure (out of memory, say) is a result too
            bench, row, loader = time_flaxbert(plan, shape, loader=i == 0)
        except Exception as e:
            rows.append(_failed(shape, "flaxbert", e))
            report.write()
            continue
        rows.append(row)
        report.update("throughput", peak_line=row["peak_line"])
        if loader:
            report.update("max_batch_loader", loader={"shape": shape.name, **loader})
        log(f"throughput: flaxbert {shape.name}: {row['step_ms']:.2f} ms/step")
        if torch_skip:
            continue
        if not clock.before("throughput"):
            torch_rows.append({"shape": shape.name, **skipped})
            continue
        log(f"throughput: {TORCH_SYSTEM} {shape.name} batch {shape.batch}")
        try:
            torch_rows.append(time_torch(plan, bench, shape, row))
            log(f"throughput: torch {shape.name}: {torch_rows[-1]['step_ms']:.2f} ms/step")
        except Exception as e:
            torch_rows.append(_failed(shape, "torch", e))
        report.write()
    report.update("throughput", status=_overall(rows))
    if not torch_skip:
        report.update("torch", status=_overall(torch_rows))


def _overall(rows: list[dict]) -> str:
    if any(r["status"] == "done" for r in rows):
        return "done"
    if all(r["status"] == "skipped: time budget" for r in rows):
        return "skipped: time budget"
    return "no shape measured"


# ----------------------------------------------------------------------------- 3. precision


def loss_curve(config, host_batches, steps: int) -> list[float]:
    setup = train.setup_training(config, train.validate_pretrain_config(config))
    state = setup.create_state(jax.random.key(config.train.seed))
    step = setup.compile_train_step(state)
    rng = setup.parallel.put_replicated(jax.random.key(1))
    losses = []
    for i in range(steps):
        state, metrics = step(state, setup.parallel.put_batch(host_batches[i]), rng)
        losses.append(tt._scalar(metrics["loss"]))
    return losses


def precision(plan: Plan, clock: Clock) -> dict:
    shape, steps = plan.precision, plan.precision_steps
    extra = {"train.warmup_steps": 5}
    bf16, overrides = suite_config(plan, shape, dtype="bfloat16", steps=steps, **extra)
    f32, _ = suite_config(plan, shape, dtype="float32", steps=steps, **extra)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as workdir:
        host_batches = tt.prepare(bf16, workdir, steps).host_batches
    log(f"precision: bf16, {steps} steps of {shape.name} batch {shape.batch}")
    curve_bf16 = loss_curve(bf16, host_batches, steps)
    if not clock.before("precision"):
        return {"status": "skipped: time budget (after the bf16 run)", "bf16": curve_bf16}
    log(f"precision: float32, {steps} steps")
    with jax.default_matmul_precision("highest"):
        curve_f32 = loss_curve(f32, host_batches, steps)
    diff = np.abs(np.array(curve_bf16) - np.array(curve_f32))
    return {
        "status": "done",
        "shape": shape.name,
        "batch": shape.batch,
        "steps": steps,
        "overrides": overrides,
        "note": (
            "same init, batches and dropout masks; float32 with matmul precision 'highest' "
            "and XLA attention, bf16 with model.attention_impl='' (cuDNN on a GPU); "
            "learning rate warm-up 5 steps, then linear decay to 0 at the last step"
        ),
        "max_abs_diff": float(diff.max()),
        "final_abs_diff": float(diff[-1]),
        "mean_abs_diff": float(diff.mean()),
        "bf16": curve_bf16,
        "float32": curve_f32,
    }


# ----------------------------------------------------------------------------- 5. max batch


def max_batch(report: Report, plan: Plan, clock: Clock, memory_gb: float | None) -> dict:
    """train_throughput.find_max_batch, with its compiles and its confirming step bounded by
    the deadline: past it an untried batch counts as "does not fit" (so the search ends at the
    largest batch known to fit) and the confirmation is skipped. Each compile is recorded as
    it ends, so a watchdog exit keeps what the search had found."""
    shape = plan.max_batch
    config, overrides = suite_config(plan, shape, dtype=plan.dtype)
    limit, source = tt.memory_limit(memory_gb)
    deadline = clock.at("max_batch") + 0.03 * clock.budget_s
    compiled: dict[int, int | None] = {}  # batch -> XLA's bytes per device (None: OOM)
    cut, unconfirmed = [], []
    info = {
        "shape": shape.name,
        "seq": shape.seq,
        "start_batch": shape.batch,
        "limit_bytes": limit,
        "limit_source": source,
        "overrides": overrides,
    }

    def known() -> dict:
        fit = [b for b, v in compiled.items() if v is not None and v <= limit]
        too_big = [b for b, v in compiled.items() if v is None or v > limit]
        return {
            "largest_known_fit": max(fit, default=None),
            "smallest_known_too_big": min(too_big, default=None),
            "compiled": {str(b): v for b, v in sorted(compiled.items())},
        }

    def compile_bounded(config):
        b = config.train.batch_size
        if time.monotonic() > deadline:
            cut.append(b)
            return types.SimpleNamespace(total=math.inf)
        try:
            memory = original_compile(config)
            compiled[b] = memory.total
            return memory
        except jax.errors.JaxRuntimeError:
            compiled[b] = None
            raise
        finally:
            report.update("max_batch_loader", search={**info, **known()})

    def run_bounded(config):
        if time.monotonic() > deadline:
            unconfirmed.append(config.train.batch_size)
            return True
        return original_run(config)

    original_compile, original_run = tt.compile_train_step, tt.runs_one_step
    tt.compile_train_step, tt.runs_one_step = compile_bounded, run_bounded
    try:
        result = tt.find_max_batch(config, limit)
    finally:
        tt.compile_train_step, tt.runs_one_step = original_compile, original_run
    result.pop("tried")
    if unconfirmed:
        result["confirmed"] = None
    partial = "partial: time budget (the largest batch known to fit"
    status = (
        "done" if not (cut or unconfirmed) else partial + (", unconfirmed)" if unconfirmed else ")")
    )
    return {**result, **info, **known(), "status": status, "search": None}


# ------------------------------------------------------------------------------ markdown


def _status_line(section: dict) -> list[str]:
    status = section.get("status", "")
    return [] if status == "done" else [f"*{status}*", ""]


def markdown(data: dict) -> str:
    s, sec = data["suite"], data["sections"]
    env = sec["environment"]
    device = env.get("device_kind", "?")
    lines = [
        f"# flaxbert GPU suite: {device} ({s['mode']}), {s['started_utc']} UTC",
        "",
        f"`{s['command']}`: {s['elapsed_s']} s of a {s['budget_s']:g} s budget"
        + ("" if s["finished"] else " (not finished)"),
        "",
    ]
    for key, title in SECTIONS.items():
        lines += [f"## {title}", ""] + _status_line(sec[key])
        lines += globals()[f"_md_{key}"](sec[key])
    return "\n".join(lines).rstrip() + "\n"


def _md_environment(e: dict) -> list[str]:
    if "jax" not in e:
        return []
    cuda = e.get("jax_cuda_packages") or {}
    rows = [
        ("device", f"{e['device_count']} x {e['device_kind']} ({e['backend']})"),
        ("JAX / jaxlib", f"{e['jax']} / {e['jaxlib']}"),
        ("jaxlib CUDA plugin", ", ".join(f"{k} {v}" for k, v in cuda.items()) or "none"),
        (
            "CUDA runtime / cuDNN (as JAX loaded them)",
            f"{e['cuda_runtime']} / {e['cudnn']}" if e["cuda_runtime"] else "n/a: no CUDA jaxlib",
        ),
        ("platform version", e.get("platform_version")),
        ("nvidia-smi", e["nvidia_smi_query"]),
        (
            "flax / optax / numpy / Python",
            f"{e['flax']} / {e['optax']} / {e['numpy']} / {e['python']}",
        ),
        ("torch", e.get("torch")),
    ]
    libs = e.get("cuda_libraries") or {}
    if libs:
        dirs = {lib: sorted({os.path.dirname(p) for p in paths}) for lib, paths in libs.items()}
        rows.append(
            (
                "CUDA libraries mapped (directories)",
                "; ".join(f"{lib}: {', '.join(d)}" for lib, d in dirs.items()),
            )
        )
    if "torch_cuda" in e:
        rows.append(
            (
                "torch CUDA / cuDNN / device",
                f"{e['torch_cuda']} / {e['torch_cudnn']} / {e['torch_device']}",
            )
        )
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _md_attention(a: dict) -> list[str]:
    out = []
    fn, model = a.get("function"), a.get("model")
    if fn:
        sh = fn["shape"]
        out += [
            f"`jax.nn.dot_product_attention`, batch {sh['batch']} x {sh['length']}, "
            f"{sh['heads']} heads of {sh['head_dim']}, padding as key_value_seq_lengths; max abs "
            f"difference on real positions (float32 output scale {fn['output_scale']:.3g}, "
            f"gradient scale {fn['grad_scale']:.3g}):",
            "",
        ]
        out += _md_comparisons(fn, ("forward", "output"), ("grad", "gradient (q, k, v)"))
    if model:
        out += [
            f"flaxbert's model ({model['model']}, {100 * model['real_token_fraction']:.0f}% real "
            f"tokens), deterministic; float32 loss {model['f32_loss']:.4f}, gradient scale "
            f"{model['grad_scale']:.3g}:",
            "",
        ]
        out += _md_comparisons(model, ("loss", "loss"), ("grad", "parameter gradients"))
    return out


def _md_comparisons(check: dict, *columns) -> list[str]:
    out = [
        "| comparison | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    names = {
        "cudnn_vs_xla": "cuDNN vs XLA, bf16",
        "cudnn_bf16_vs_f32": "cuDNN bf16 vs XLA float32",
        "xla_bf16_vs_f32": "XLA bf16 vs XLA float32",
    }
    for key, name in names.items():
        v = check.get(key)
        if isinstance(v, dict):
            out.append(f"| {name} | " + " | ".join(f"{v[k]:.3g}" for k, _ in columns) + " |")
        elif v:
            out.append(f"| {name} | " + " | ".join(v for _ in columns) + " |")
    fused = check.get("fused_attention_in_hlo")
    if fused:
        said = "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in fused.items())
        out += ["", f"cuDNN fused attention (`__cudnn$fmha`) in the compiled code: {said}"]
    return out + [""]


def _md_precision(p: dict) -> list[str]:
    if "float32" not in p:
        return []
    b, f = p["bf16"], p["float32"]
    marks = sorted({0, *range(9, len(b), 10), len(b) - 1})
    out = [
        f"{p['shape']} batch {p['batch']}, {p['steps']} steps; {p['note']}. Max |Δloss| "
        f"**{p['max_abs_diff']:.4f}**, final |Δloss| **{p['final_abs_diff']:.4f}**, mean "
        f"{p['mean_abs_diff']:.4f}.",
        "",
        "| step | " + " | ".join(str(i + 1) for i in marks) + " |",
        "|---|" + "---|" * len(marks),
        "| bf16 | " + " | ".join(f"{b[i]:.4f}" for i in marks) + " |",
        "| float32 | " + " | ".join(f"{f[i]:.4f}" for i in marks) + " |",
        "",
    ]
    return out


THROUGHPUT_HEADER = "| shape | batch | system | step ms | seq/s | tokens/s | model TFLOP/s | MFU |"


def _row(r: dict, extra: str = "") -> str:
    if r.get("status") != "done":
        return f"| {r['shape']} | | | {r.get('status')} | | | | |" + (" |" if extra else "")
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (
        f"| {r['shape']} | {r['batch']} | {r['system']} | {r['step_ms']:.2f} | "
        f"{r['seq_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.3g} | {mfu} |"
        + (f" {extra} |" if extra else "")
    )


def _md_throughput(t: dict) -> list[str]:
    rows = t.get("rows") or []
    if not rows:
        return []
    out = [THROUGHPUT_HEADER, "|---|---|---|---|---|---|---|---|"]
    out += [_row(r) for r in rows]
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return out + [""]
    r = done[0]
    steps = len(r["step_times_s"])
    out += [
        "",
        f"model.dtype={r['dtype']}; median of {steps} steps after the warm-up ones, each waited "
        f"for; {t.get('peak_line', '')}",
    ]
    out += [f"- {r['shape']}: attention {r['attention']['reason']}" for r in done]
    out += ["", f"Model FLOPs ({r['shape']}): {r['formula']}", ""]
    return out


def _md_max_batch_loader(m: dict) -> list[str]:
    out = []
    if m.get("max_batch") is not None:
        out.append(
            tt.max_batch_line(m, m["seq"])
            + f"; {m['shape']}, the search started at {m['start_batch']}"
            + f"; smallest batch known not to fit: {m['smallest_known_too_big']}"
        )
        out.append("")
    elif m.get("search"):
        found = m["search"]
        out += [
            f"batch search ({found['shape']}), cut short: largest batch known to fit "
            f"{found['largest_known_fit']}, smallest known not to {found['smallest_known_too_big']}"
            f" (XLA's bytes per device: {found['compiled']}; limit {found['limit_bytes']})",
            "",
        ]
    if m.get("loader"):
        out += [f"{m['loader']['shape']}: " + tt.loader_line(m["loader"]), ""]
    return out


def _md_torch(t: dict) -> list[str]:
    rows = t.get("rows") or []
    if not rows:
        return []
    out = [
        THROUGHPUT_HEADER + " flaxbert/torch throughput |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.get("flaxbert_over_torch_throughput")
        out.append(_row(r, "n/a" if ratio is None else f"**{ratio:.2f}**"))
    return out + [""]


# ---------------------------------------------------------------------------------- main


def run_section(report: Report, key: str, fn, *args) -> None:
    report.running = (key,)
    start = time.monotonic()
    report.update(key, status="running")
    log(f"{SECTIONS[key]}: start")
    try:
        values = fn(*args)
    except Exception as e:
        log(f"{SECTIONS[key]}: failed: {e!r}")
        values = {"status": f"error: {e!r}"[:2000]}
    values = values or {}
    values.setdefault("status", "done")
    values["seconds"] = round(time.monotonic() - start, 1)
    report.update(key, **values)
    report.running = ()
    log(f"{SECTIONS[key]}: {values['status']} ({values['seconds']} s)")


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("outdir", help="where gpu_suite.json and gpu_suite.md are written")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU (about 2 minutes)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget (s)")
    p.add_argument(
        "--memory-gb",
        type=float,
        help="GiB per device for the batch search (default: the device's bytes_limit; "
        "0.02 with --smoke)",
    )
    args = p.parse_args(argv)
    if args.budget_s <= 10:
        p.error("--budget-s must be more than 10 seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    memory_gb = args.memory_gb or plan.memory_gb
    report = Report(args.outdir, "smoke" if args.smoke else "full", args.budget_s)
    if args.smoke:  # compiling dominates tiny shapes; the code path is the same
        jax.config.update("jax_disable_most_optimizations", True)
    clock = Clock(args.budget_s, plan.deadlines)
    watchdog = threading.Timer(max(1.0, args.budget_s - 5 - report.elapsed()), report.out_of_time)
    watchdog.daemon = True
    watchdog.start()
    report.write()
    if not args.smoke and not on_gpu():
        log(
            f"no GPU ({jax.devices()[0].device_kind}): the full suite is meant for one; try --smoke"
        )

    run_section(report, "environment", environment)

    def attention():
        if not clock.before("attention"):
            return {"status": "skipped: time budget"}
        out = {"function": attention_function_check(*plan.attention_fn)}
        report.update("attention", **out)
        out["model"] = attention_model_check(plan)
        if not on_gpu():
            out["status"] = f"{NOT_ON_CPU} (the XLA rows against float32 are measured)"
        return out

    run_section(report, "attention", attention)

    report.running, start = ("throughput", "torch"), time.monotonic()
    try:
        throughput(report, plan, clock)
    except Exception as e:  # failures of one shape are caught inside; this is anything else
        log(f"throughput: failed: {e!r}")
        report.update("throughput", status=f"error: {e!r}"[:2000])
    report.update("throughput", seconds=round(time.monotonic() - start, 1))
    report.running = ()

    def precision_section():
        if not clock.before("precision"):
            return {"status": "skipped: time budget"}
        return precision(plan, clock)

    run_section(report, "precision", precision_section)

    def max_batch_section():
        if not clock.before("max_batch"):
            return {"status": "skipped: time budget"}
        return max_batch(report, plan, clock, memory_gb)

    run_section(report, "max_batch_loader", max_batch_section)

    watchdog.cancel()
    report.update("environment", cuda_libraries=cuda_libraries())  # torch's and JAX's, by now
    with report.lock:
        report.data["suite"]["finished"] = True
        report.write()
        print(markdown(report.data), flush=True)
    log(f"done in {report.elapsed():.0f} s: {os.path.join(args.outdir, JSON_NAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
