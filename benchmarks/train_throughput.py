"""Pre-training step throughput: sequences/s, tokens/s, TFLOP/s and MFU of the flaxbert train
step; optionally beside transformers' FlaxBertForPreTraining, with the largest batch that
fits, and with the data loader in the loop.

    python benchmarks/train_throughput.py --config configs/pretrain.py:mini
    python benchmarks/train_throughput.py --config configs/pretrain.py:base --compare-hf \
        --config.model.vocab_size=30522 --config.model.dtype=bfloat16 --max-batch --loader
    python benchmarks/train_throughput.py --config configs/pretrain.py:tiny --steps 3 \
        --warmup 1 --compare-hf --loader --max-batch --memory-gb 2     # a quick check on a CPU
    python benchmarks/train_throughput.py --config configs/pretrain.py:mini --compare-torch

The step is built and compiled as `flaxbert pretrain` builds it: the same config file and
`--config.KEY=VALUE` overrides, the same strategy over every device JAX sees. Its time is the
median over --steps steps after --warmup untimed ones (compiled before those), each step waited
for with `jax.block_until_ready`, on batches built by the real loader and put on the devices
before timing. The data are the config's own (the embedded synthetic corpus by default, with
500 documents unless --config.data.synthetic_documents says otherwise); the model keeps the
config's `model.vocab_size` whatever the corpus's vocabulary.

Model FLOPs per step (6 per parameter per token for forward + backward: Kaplan et al. 2020,
"Scaling Laws for Neural Language Models"; the attention term 12·L·H·S per token as in
Hoffmann et al. 2022, "Chinchilla", appendix F, and Chowdhery et al. 2022, "PaLM", appendix B):

    6·N·T + 12·L·H·S·T + 6·(H² + H·V)·B·P + 6·(H² + 2H)·B

N = parameters of the transformer layers (embeddings and heads excluded), T = B·S tokens, L
layers, H hidden size, S sequence length, V vocabulary, B global batch, P masked positions per
sequence (the MLM transform and the tied decoder run only there); the last term is the pooler
and the NSP head. These are the FLOPs of the task, the same for any implementation. XLA's own
count of the compiled step (`cost_analysis()`, per device, times the devices) is printed
beside them; it also counts the optimizer, the softmaxes and what an implementation does on
top (transformers computes vocabulary logits at every position, not only the masked ones).

MFU (model FLOPs utilisation, as PaLM defines it) = model FLOPs per second / (peak dense
FLOP/s of one device x devices), the peak for the compute dtype (16-bit when model.dtype is
bfloat16 or float16, else fp32; on GPUs JAX's default precision may run float32 matmuls as
TF32, which the output notes) from a table of device kinds, or --peak-tflops; "n/a" where none
is known (CPUs).

--compare-hf times transformers' FlaxBertForPreTraining (transformers<5) in the same run: the
same sizes, batches, optimizer (`flaxbert.optim.make_optimizer`), dropout, dtype and devices,
its loss the cross-entropy of its (B, S, V) logits at the masked positions plus NSP; the last
line is then `step_time_ratio_vs_hf=<flaxbert median step time / transformers' one>`.

--compare-torch times transformers' PyTorch BertForPreTraining (`benchmarks/torch_reference.py`:
SDPA attention, AdamW with the same hyper-parameters and clipping, the same dropout; bfloat16
through torch.autocast when model.dtype is bfloat16; on the GPU JAX uses, else on the CPU) on
the same host batches, in the same process, its steps alternated with flaxbert's: flaxbert step
i (waited for with `jax.block_until_ready`), then torch step i (waited for by reading its loss),
so both see the same machine load. After --warmup untimed pairs (flaxbert compiled before
them), each of the --steps pairs gives a ratio flaxbert time / torch time; the last line is
`step_time_ratio_vs_torch=<the median of those ratios>` (below 1: flaxbert is faster). The
table's "transformers (PyTorch)" row is torch's median step time, its model TFLOP/s from the
same formula (transformers does more: vocabulary logits at every position). Unpacked batches
only. Threads: torch gets as many as XLA:CPU uses, the CPUs this process may run on
(`os.sched_getaffinity`); --threads N first restricts the process to N of them, before JAX
starts its CPU backend, since XLA:CPU sizes its pool from them (jax 0.10.2 has no flag for
it: XLA_FLAGS' `intra_op_parallelism_threads=N` is ignored after another flag), and gives
torch N.
The notes print both counts, XLA's counted from its threads (Linux), and the load average:
on a machine shared with other work, more threads than free cores cost torch's OpenMP far
more than XLA's pool (seen on a loaded 2-core machine: torch's tiny step 4-8x slower with 2
threads than with 1, flaxbert's up to 2x), so compare there with --threads 1.

--loader times the loop with the prefetching loader building each batch, as `pretrain()` runs
it, against the same loop on pre-loaded batches. --max-batch bisects for the largest global
batch whose compiled step (XLA's memory analysis, as `flaxbert compile`) fits in the device's
memory (--memory-gb on a CPU), and on an accelerator confirms it by running one step.
--json PATH writes every number. One process (one host, all its devices) is what it measures.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks.torch_reference import (
    TorchBert,
    hf_config_kwargs,
    mlm_labels,
    torch_version_line,
)
from flaxbert import optim, train
from flaxbert.cli import split_config_overrides
from flaxbert.config import ConfigError, load_config, require
from flaxbert.data.pretraining import PretrainingBatches, prefetch
from flaxbert.data.sources import load_corpus
from flaxbert.preflight import compile_train_step, xla_flops

# Dense peak TFLOP/s of one device (vendor data sheets), for device kinds containing the key.
_H100_SXM = {"16bit": 989.0, "tf32": 494.5, "fp32": 66.9}
PEAK_TFLOPS = {
    "H100 80GB HBM3": _H100_SXM,
    "H100 SXM": _H100_SXM,
    "H200": _H100_SXM,  # the H100 SXM's compute with more memory
    "A100": {"16bit": 312.0, "tf32": 156.0, "fp32": 19.5},
}
SMALL_CORPUS = "--config.data.synthetic_documents=500"
TORCH_SYSTEM = "transformers (PyTorch)"
MAX_BATCH_CEILING = 1 << 20  # --max-batch stops doubling here


@dataclasses.dataclass
class Timing:
    system: str
    step_times_s: list[float]  # the timed steps
    first_step_s: float  # the first step run (a warm-up one unless --warmup 0)
    first_loss: float  # at initialisation: about ln V + ln 2
    xla_flops: float | None  # per step, all devices (XLA cost analysis)
    compile_s: float = 0.0  # lowering and compiling, before the first step

    @property
    def median_s(self) -> float:
        return float(np.median(self.step_times_s))


@dataclasses.dataclass
class Bench:
    """What every measurement shares: the config, the compiled setup and host batches."""

    config: object
    model_config: train.BertConfig
    setup: train.TrainingSetup
    loader: PretrainingBatches
    host_batches: list[dict[str, np.ndarray]]
    build_s_per_batch: float  # host time of PretrainingBatches.batch, one thread


def _scalar(x) -> float:
    """A device scalar (or pmap's per-device copies of it) as a float."""
    return float(np.asarray(jax.device_get(x)).reshape(-1)[0])


def prepare(config, workdir: str, num_batches: int) -> Bench:
    """Checks the config and builds the loader as `flaxbert.train.pretrain` does."""
    jax.config.update("jax_threefry_partitionable", True)
    model_config = train.validate_pretrain_config(config)
    setup = train.setup_training(config, model_config)
    corpus = load_corpus(config.data, workdir)
    train.check_vocab(corpus, model_config)
    loader = train.make_train_batches(config, corpus, setup.parallel)
    start = time.perf_counter()
    host_batches = [loader.batch(i) for i in range(num_batches)]
    build_s = (time.perf_counter() - start) / num_batches
    return Bench(config, model_config, setup, loader, host_batches, build_s)


def model_flops(bench: Bench) -> dict:
    """The formula of the module docstring, with N counted from the actual parameter tree."""
    params = jax.eval_shape(bench.setup.init_fn, jax.random.key(0)).params
    # layer_0..layer_{L-1}, or one stacked `layers` tree with model.scan_layers
    layers = {k: v for k, v in params["bert"].items() if k.startswith("layer")}
    n = sum(x.size for x in jax.tree.leaves(layers))
    m, d = bench.model_config, bench.config.data
    b, s, p = bench.config.train.batch_size, d.max_seq_length, d.max_predictions_per_seq
    h, v, layers_l, tokens = m.hidden_size, m.vocab_size, m.num_layers, b * s
    terms = [
        6 * n * tokens,
        12 * layers_l * h * s * tokens,
        6 * (h * h + h * v) * b * p,
        6 * (h * h + 2 * h) * b,
    ]
    return {
        "per_step": float(sum(terms)),
        "terms": terms,
        "n_nonembedding": n,
        "n_total": sum(x.size for x in jax.tree.leaves(params)),
        "formula": (
            "model FLOPs/step = 6·N·T + 12·L·H·S·T + 6·(H²+H·V)·B·P + 6·(H²+2H)·B = "
            + " + ".join(f"{t:.3e}" for t in terms)
            + f" = {sum(terms):.3e}  (N={n:,} transformer-layer parameters, T=B·S={tokens:,}, "
            f"L={layers_l}, H={h}, S={s}, V={v}, B={b}, P={p}; Kaplan et al. 2020, "
            "Hoffmann et al. 2022 app. F)"
        ),
    }


def peak_tflops(peak_flag: float | None, dtype: str) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device or None, a line saying which peak and why)."""
    device = jax.devices()[0]
    if peak_flag:
        return peak_flag, f"peak {peak_flag:g} TFLOP/s per device (--peak-tflops)"
    peaks = next((p for key, p in PEAK_TFLOPS.items() if key in device.device_kind), None)
    if peaks is None:
        return None, f"peak: none known for {device.device_kind!r}; MFU n/a (--peak-tflops X)"
    if dtype in ("bfloat16", "float16"):
        return peaks[
            "16bit"
        ], f"peak: {peaks['16bit']:g} TFLOP/s dense 16-bit (model.dtype={dtype})"
    line = f"peak: {peaks['fp32']:g} TFLOP/s dense fp32 (model.dtype={dtype})"
    if device.platform == "gpu" and jax.config.jax_default_matmul_precision is None:
        line += (
            f"; JAX's default matmul precision lets XLA run float32 dots on TF32 tensor cores, "
            f"whose peak is {peaks['tf32']:g}: pass --peak-tflops {peaks['tf32']:g} for MFU "
            "against that"
        )
    return peaks["fp32"], line


# ------------------------------------------------------------------------------ timing


def compile_step(step, state, batch, rng, devices: int) -> tuple[float | None, float]:
    """(XLA's FLOP count of the compiled step, all devices, or None; seconds to compile)."""
    start = time.perf_counter()
    per_device = xla_flops(step.lower(state, batch, rng).compile())
    compile_s = time.perf_counter() - start
    return (None if per_device is None else per_device * devices), compile_s


def run_step(step, state, batch, rng):
    """One step, waited for: (state, metrics, seconds)."""
    start = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready((state.step, metrics))
    return state, metrics, time.perf_counter() - start


def compile_and_time(name, step, state, batches, rng, warmup, devices: int):
    """Compiles `step` (reading XLA's FLOP count), then runs one step per batch, each waited
    for; the steps after `warmup` are timed."""
    flops, compile_s = compile_step(step, state, batches[0], rng, devices)
    times, first_loss = [], None
    for batch in batches:
        state, metrics, seconds = run_step(step, state, batch, rng)
        times.append(seconds)
        if first_loss is None:
            first_loss = _scalar(metrics["loss"])
    return state, Timing(name, times[warmup:], times[0], first_loss, flops, compile_s)


def compile_and_pair(step, state, batches, rng, ref: TorchBert, host_batches, warmup, devices):
    """Compiles flaxbert's `step`, then runs it and `ref`'s step alternately on the same
    batches (flaxbert step i, then torch step i, each waited for); the pairs after `warmup`
    are timed. Returns (state, flaxbert's Timing, torch's Timing)."""
    flops, compile_s = compile_step(step, state, batches[0], rng, devices)
    torch_batches = [ref.batch(b) for b in host_batches]
    flax_s, torch_s, first_losses = [], [], None
    for batch, torch_batch in zip(batches, torch_batches, strict=True):
        state, metrics, seconds = run_step(step, state, batch, rng)
        flax_s.append(seconds)
        start = time.perf_counter()
        torch_loss = ref.step(torch_batch)  # a float: the step has finished
        torch_s.append(time.perf_counter() - start)
        if first_losses is None:
            first_losses = (_scalar(metrics["loss"]), torch_loss)
    flax = Timing("flaxbert", flax_s[warmup:], flax_s[0], first_losses[0], flops, compile_s)
    torch_timing = Timing(TORCH_SYSTEM, torch_s[warmup:], torch_s[0], first_losses[1], None)
    return state, flax, torch_timing


def time_loop(step, state, batches, rng, warmup: int, steps: int) -> tuple[object, float]:
    """Median seconds per step of a loop run as `pretrain()` runs it: nothing waited for but
    each step's metrics, fetched one step late; `batches` yields device batches. A step's time
    is the interval between the fetches of its metrics and of the previous step's."""
    pending, done = None, []
    for i in range(warmup + steps):
        if i == warmup:
            jax.block_until_ready(state.step)
            done = [time.perf_counter()]
        state, metrics = step(state, next(batches), rng)
        if pending is not None:
            _scalar(pending["loss"])
            if i > warmup:
                done.append(time.perf_counter())
        pending = metrics
    _scalar(pending["loss"])
    done.append(time.perf_counter())
    return state, float(np.median(np.diff(done)))


@dataclasses.dataclass
class FlaxbertRun:
    timing: Timing
    loader: dict | None = None  # --loader
    torch: Timing | None = None  # --compare-torch: the steps paired with flaxbert's

    @property
    def pair_ratios(self) -> list[float]:
        """flaxbert's step time / torch's, pair by pair (--compare-torch)."""
        return [
            f / t for f, t in zip(self.timing.step_times_s, self.torch.step_times_s, strict=True)
        ]


def bench_flaxbert(bench: Bench, args, ref: TorchBert | None = None) -> FlaxbertRun:
    """flaxbert's step timed alone, or paired with `ref`'s (--compare-torch); then --loader."""
    setup = bench.setup
    parallel = setup.parallel
    state = setup.create_state(jax.random.key(bench.config.train.seed))
    step = setup.compile_train_step(state)
    rng = parallel.put_replicated(jax.random.key(1))
    batches = [parallel.put_batch(b) for b in bench.host_batches]
    if ref is None:
        state, timing = compile_and_time(
            "flaxbert", step, state, batches, rng, args.warmup, parallel.num_devices
        )
        run = FlaxbertRun(timing)
    else:
        state, timing, torch_timing = compile_and_pair(
            step, state, batches, rng, ref, bench.host_batches, args.warmup, parallel.num_devices
        )
        run = FlaxbertRun(timing, torch=torch_timing)
    if not args.loader:
        return run
    log("timing the loop with the data loader")
    state, preloaded_s = time_loop(step, state, iter(batches), rng, args.warmup, args.steps)
    source = prefetch(bench.loader.batch, range(len(batches)), bench.config.data.prefetch)
    try:  # as pretrain(): built on the prefetch thread, put on the devices by the loop
        device_batches = (parallel.put_batch(b) for _, b in source)
        state, loader_s = time_loop(step, state, device_batches, rng, args.warmup, args.steps)
    finally:
        source.close()
    run.loader = {
        "preloaded_ms_per_step": 1e3 * preloaded_s,
        "loader_ms_per_step": 1e3 * loader_s,
        "overhead_pct": 100 * (loader_s - preloaded_s) / preloaded_s,
        "host_build_ms_per_batch": 1e3 * bench.build_s_per_batch,
        "prefetch": bench.config.data.prefetch,
    }
    return run


def hf_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A flaxbert batch as transformers takes it: MLM labels over every position, -100 where
    nothing is predicted."""
    b, s = batch["input_ids"].shape
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["input_mask"],
        "token_type_ids": batch["segment_ids"],
        "position_ids": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
        "labels": mlm_labels(batch),
        "next_sentence_label": batch["next_sentence_labels"],
    }


def hf_classes():
    try:
        from transformers import BertConfig, FlaxBertForPreTraining
    except ImportError:
        sys.exit(
            "--compare-hf needs transformers with its Flax models: pip install 'transformers<5'"
        )
    return BertConfig, FlaxBertForPreTraining


def bench_hf(bench: Bench, args) -> Timing:
    """transformers' FlaxBertForPreTraining at the same size, batch, optimizer and dtype,
    jitted with the state donated, data-parallel over the same devices."""
    HFBertConfig, FlaxBertForPreTraining = hf_classes()
    m = bench.model_config
    hf_config = HFBertConfig(**hf_config_kwargs(m))
    model = FlaxBertForPreTraining(hf_config, seed=0, dtype=jnp.dtype(m.dtype), _do_init=True)
    module, params = model.module, flax.core.unfreeze(model.params)
    _, tx = optim.make_optimizer(bench.config.train)

    def loss_fn(params, batch, rng):
        out = module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            batch["position_ids"],
            None,  # head_mask
            deterministic=False,
            rngs={"dropout": rng},
        )
        labels_BL = batch["labels"]
        weights_BL = (labels_BL >= 0).astype(jnp.float32)
        logits_BLV = out.prediction_logits.astype(jnp.float32)
        nll_BL = optax.softmax_cross_entropy_with_integer_labels(
            logits_BLV, jnp.maximum(labels_BL, 0)
        )
        mlm = jnp.sum(nll_BL * weights_BL) / jnp.maximum(jnp.sum(weights_BL), 1.0)
        nsp = optax.softmax_cross_entropy_with_integer_labels(
            out.seq_relationship_logits.astype(jnp.float32), batch["next_sentence_label"]
        )
        return mlm + jnp.mean(nsp)

    def hf_train_step(state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return optim.TrainState(state.step + 1, params, opt_state), {"loss": loss}

    mesh = Mesh(np.array(jax.devices()[: bench.setup.parallel.num_devices]), ("data",))
    replicated, rows = (
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec("data")),
    )
    state = optim.TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params))
    state = jax.device_put(state, replicated)
    rng = jax.device_put(jax.random.key(1), replicated)
    batches = [jax.device_put(hf_batch(b), rows) for b in bench.host_batches]
    step = jax.jit(hf_train_step, donate_argnums=(0,))
    return compile_and_time("transformers", step, state, batches, rng, args.warmup, mesh.size)[1]


# ----------------------------------------------------------------------- PyTorch reference


def cpu_count() -> int:
    """The CPUs this process may run on: XLA:CPU sizes its thread pool from them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_cpus(n: int) -> None:
    """--threads N: this process runs on the first N of its CPUs from now on. Before JAX
    starts its CPU backend, that makes XLA:CPU's thread pool N threads (seen in jax 0.10.2)."""
    if not hasattr(os, "sched_setaffinity"):
        log(f"--threads {n}: this OS cannot restrict a process's CPUs; only torch gets {n}")
        return
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        raise ConfigError(f"--threads {n}: this process may run on {len(cpus)} CPUs only")
    os.sched_setaffinity(0, cpus[:n])


def xla_cpu_threads() -> int | None:
    """Threads of XLA:CPU's pool in this process (named tf_XLAEigen), counted on Linux once
    the backend has started; None where they cannot be counted."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "tf_XLAEigen"
        except OSError:  # the thread has ended
            pass
    return count or None


def check_torch_devices() -> None:
    """--compare-torch on an accelerator compares one device with one device."""
    devices = jax.devices()
    if devices[0].platform not in ("cpu", "gpu"):
        raise ConfigError(
            f"--compare-torch compares on a CPU or a GPU; JAX runs on {devices[0].platform}"
        )
    if devices[0].platform == "gpu" and len(devices) > 1:
        raise ConfigError(
            f"--compare-torch: flaxbert would run on {len(devices)} GPUs and torch on one; "
            "compare on one GPU (CUDA_VISIBLE_DEVICES=0)"
        )


def make_torch_reference(bench: Bench, args) -> tuple[TorchBert, int]:
    """(the PyTorch reference on the device JAX uses, torch's default thread count)."""
    import torch

    default_threads = torch.get_num_threads()
    device = "cpu"
    if jax.devices()[0].platform == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--compare-torch: JAX runs on a GPU but this torch has no CUDA (a CPU build); "
                "install a CUDA build of torch, or compare on the CPU with JAX_PLATFORMS=cpu"
            )
        device = "cuda"
    m = bench.model_config
    ref = TorchBert(
        m,
        bench.config.train,
        device=device,
        autocast_dtype=None if m.dtype == "float32" else m.dtype,
        threads=args.threads or cpu_count(),
        seed=bench.config.train.seed,
    )
    return ref, default_threads


def torch_lines(run: FlaxbertRun, ref: TorchBert, default_threads: int, args) -> list[str]:
    ratios = run.pair_ratios
    of_medians = run.timing.median_s / run.torch.median_s
    if ref.device.type == "cpu":
        xla = xla_cpu_threads()
        xla_text = "not counted" if xla is None else f"{xla} (its tf_XLAEigen pool, counted)"
        threads = (
            f"threads: XLA:CPU {xla_text}, torch {ref.threads} (torch.set_num_threads; its "
            f"default here {default_threads}); {cpu_count()} CPUs for this process"
            + (f" (--threads {args.threads})" if args.threads else "")
        )
        if hasattr(os, "getloadavg"):
            threads += (
                f"; load average {os.getloadavg()[0]:.1f} over the last minute on "
                f"{os.cpu_count()} CPUs"
            )
    else:
        threads = f"torch on {ref.device}, flaxbert on {jax.devices()[0].device_kind}"
    return [
        f"--compare-torch: transformers' PyTorch BertForPreTraining (SDPA attention, "
        f"{'float32' if ref.autocast_dtype is None else 'autocast ' + ref.autocast_dtype}, "
        f"{ref.device}) on the same batches, its steps alternated with flaxbert's; "
        f"{len(ratios)} timed pairs after {args.warmup} warm-up pairs; per-pair ratio "
        f"flaxbert/torch min {min(ratios):.3f}, median {np.median(ratios):.3f}, max "
        f"{max(ratios):.3f} (ratio of the medians {of_medians:.3f}); transformers computes "
        "vocabulary logits at all L positions, flaxbert at the P masked ones",
        threads,
    ]


# ----------------------------------------------------------------------------- max batch


def memory_limit(memory_gb: float | None) -> tuple[int, str]:
    if memory_gb:
        return int(memory_gb * 2**30), f"--memory-gb {memory_gb:g}"
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ConfigError(
            f"--max-batch: the device ({device.device_kind}) reports no memory limit; give "
            "the memory per device to fit in, in GiB, with --memory-gb (e.g. --memory-gb 2)"
        )
    return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"


def runs_one_step(config) -> bool:
    """Runs one real step at `config`'s batch; False on an out-of-memory error."""
    model_config = train.validate_pretrain_config(config)
    setup = train.setup_training(config, model_config)
    p, t = setup.parallel, config.train
    try:
        state = setup.create_state(jax.random.key(0))
        shapes = setup.train_batch_shapes(t.batch_size)
        local = p.local_rows(t.batch_size).size
        host = {k: np.zeros((local, *s.shape[1:]), s.dtype) for k, s in shapes.items()}
        step = setup.compile_train_step(state)
        _, metrics = step(state, p.put_batch(host), p.put_replicated(jax.random.key(1)))
        jax.block_until_ready(metrics)
        return True
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e):
            return False
        raise


def find_max_batch(config, limit: int) -> dict:
    """Doubles the configured global batch until the compiled step's memory (XLA's buffer
    assignment, as `flaxbert compile` reports it) exceeds `limit`, then bisects."""
    parallel = train.parallel_from_config(config, train.validate_pretrain_config(config))
    step = math.lcm(8, parallel.batch_shards * config.train.grad_accum_steps)
    totals: dict[int, int | None] = {}

    def with_batch(b):
        c = copy.deepcopy(config)
        c.train.batch_size = b
        return c

    def fits(b: int) -> bool:
        try:
            totals[b] = compile_train_step(with_batch(b)).total
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            totals[b] = None
        log(f"max batch: {b} -> {totals[b]} bytes")
        return totals[b] is not None and totals[b] <= limit

    lo, hi = config.train.batch_size, None
    if not fits(lo):
        lo, hi = 0, lo
    while hi is None and 2 * lo <= MAX_BATCH_CEILING:
        if fits(2 * lo):
            lo *= 2
        else:
            hi = 2 * lo
    while hi is not None and hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    result = {"max_batch": lo, "granularity": step, "bytes": totals.get(lo), "confirmed": None}
    if jax.devices()[0].platform != "cpu":
        while lo > 0 and not runs_one_step(with_batch(lo)):
            log(f"max batch: {lo} compiled within the limit but ran out of memory")
            lo -= step
        result.update(max_batch=lo, bytes=totals.get(lo), confirmed=lo > 0)
    result["tried"] = {str(k): v for k, v in sorted(totals.items())}
    return result


# -------------------------------------------------------------------------------- report


def log(message: str) -> None:
    print(f"[train_throughput] {message}", file=sys.stderr, flush=True)


def report_rows(timings: list[Timing], flops: dict, peak: float | None, devices: int, tokens):
    rows = []
    for t in timings:
        model_tflops = flops["per_step"] / t.median_s / 1e12
        rows.append(
            {
                "system": t.system,
                "step_ms": 1e3 * t.median_s,
                "seq_per_s": tokens[0] / t.median_s,
                "tokens_per_s": tokens[0] * tokens[1] / t.median_s,
                "model_tflops": model_tflops,
                "mfu": model_tflops / (peak * devices) if peak else None,
                "xla_tflops": t.xla_flops / t.median_s / 1e12 if t.xla_flops else None,
                "first_loss": t.first_loss,
                **dataclasses.asdict(t),
            }
        )
    return rows


def print_report(rows, lines: list[str]) -> None:
    print(
        "| system | step ms (median) | seq/s | tokens/s | model TFLOP/s | MFU "
        "| XLA TFLOP/s (cost analysis) | first-step loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        xla = "n/a" if r["xla_tflops"] is None else f"{r['xla_tflops']:.3g}"
        print(
            f"| {r['system']} | {r['step_ms']:.2f} | {r['seq_per_s']:,.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.3g} | {mfu} | {xla} | "
            f"{r['first_loss']:.4f} |"
        )
    print()
    for line in lines:
        print(line)


def parse_args(argv: list[str]):
    rest, overrides = split_config_overrides(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="e.g. configs/pretrain.py:mini; then --config.KEY=VALUE overrides",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps (the step is compiled before them)"
    )
    switches = {
        "--compare-hf": "also time transformers' FlaxBertForPreTraining on the same work",
        "--compare-torch": "also time transformers' PyTorch BertForPreTraining, its steps "
        "alternated with flaxbert's",
        "--max-batch": "find the largest global batch whose compiled step fits in memory",
        "--loader": "also time the loop with the data loader building the batches",
    }
    for flag, text in switches.items():
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument(
        "--memory-gb",
        type=float,
        help="GiB per device for --max-batch (default: "
        "the device's bytes_limit; required on a CPU)",
    )
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device, for MFU")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="run on N CPUs: XLA:CPU's pool and torch's threads (default: every CPU this "
        "process may use, for both)",
    )
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON")
    args = p.parse_args(rest)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if not any(o.split("=")[0] == SMALL_CORPUS.split("=")[0] for o in overrides):
        overrides = [SMALL_CORPUS, *overrides]
    return args, overrides


def summary_lines(args, overrides, bench: Bench, flops: dict, peak_line: str) -> list[str]:
    m, d, t = bench.model_config, bench.config.data, bench.config.train
    parallel, device = bench.setup.parallel, jax.devices()[0]
    masks = np.stack([b["input_mask"] for b in bench.host_batches])
    real_fraction = float(np.mean(masks > 0))
    pairs = float(np.mean(masks.max(-1)))  # packed rows number their pairs 1..K
    versions = f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}"
    if args.compare_torch:
        versions += f", {torch_version_line()}"
    elif args.compare_hf:
        import transformers

        versions += f", transformers {transformers.__version__}"
    return [
        flops["formula"],
        "XLA TFLOP/s: the compiled step's cost analysis (per device) x devices / median step "
        "time; it also counts the optimizer and, for transformers, the MLM head at every position",
        f"expected first-step loss at initialisation: ln V + ln 2 = "
        f"{math.log(m.vocab_size) + math.log(2):.4f}",
        f"device: {parallel.num_devices} x {device.device_kind} ({device.platform}); {peak_line}",
        f"dtype: model.dtype={m.dtype}, param_dtype={m.param_dtype}",
        f"config: {args.config} {' '.join(overrides)}; global batch {t.batch_size} x seq "
        f"{d.max_seq_length}, {d.max_predictions_per_seq} predictions/seq; {parallel.description}",
        f"timing: median of {args.steps} steps after {args.warmup} warm-up steps; {versions}; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"model switches: remat={m.remat or 'off'}, scan_layers={m.scan_layers}, "
        f"attention_impl={m.attention_impl or 'auto'}, attention dropout "
        f"{m.attention_dropout_rate}; data.packing={d.packing}: "
        f"{100 * real_fraction:.1f}% of the row positions hold real tokens, "
        f"{pairs:.2f} pairs a row",
    ]


def loader_line(r: dict) -> str:
    return (
        f"loader: median {r['loader_ms_per_step']:.2f} ms/step with the data loader in the loop vs "
        f"{r['preloaded_ms_per_step']:.2f} ms/step on pre-loaded batches (the same loop, metrics "
        f"fetched one step late as pretrain() does): overhead {r['overhead_pct']:+.1f}% of step "
        f"time; one batch takes {r['host_build_ms_per_batch']:.2f} ms to build on the host "
        f"(prefetch buffer {r['prefetch']}; on a CPU that thread shares the cores with XLA)"
    )


def max_batch_line(r: dict, seq: int) -> str:
    size = "n/a" if r["bytes"] is None else f"{r['bytes'] / 2**30:.2f} GiB"
    how = {None: "compiled only", True: "confirmed by one step", False: "none ran"}
    capped = r["max_batch"] >= MAX_BATCH_CEILING
    return (
        f"max batch: {r['max_batch']} sequences of {seq} fit in {r['limit_bytes'] / 2**30:.2f} GiB "
        f"per device ({r['limit_source']}; XLA's total per device {size}; searched in steps of "
        f"{r['granularity']}; {how[r['confirmed']]})"
        + (f"; the search stops at {MAX_BATCH_CEILING}" if capped else "")
    )


def run(args, overrides: list[str]) -> dict:
    config = load_config(args.config, overrides)
    # What can fail is checked before any work.
    limit = memory_limit(args.memory_gb) if args.max_batch else None
    for flag, wanted in (
        ("--compare-hf", args.compare_hf),
        ("--compare-torch", args.compare_torch),
    ):
        require(
            not (wanted and config.data.packing),
            "data.packing",
            True,
            f"{flag} times unpacked batches (transformers has no packing); leave it off",
        )
    if args.compare_hf:
        hf_classes()
    if args.compare_torch:
        torch_version_line()  # SystemExit with install advice when torch is missing
        check_torch_devices()
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as workdir:
        bench = prepare(config, workdir, args.warmup + args.steps)
        t, d = config.train, config.data
        parallel = bench.setup.parallel
        log(f"timing flaxbert: {t.batch_size} x {d.max_seq_length}, {parallel.description}")
        ref = None
        if args.compare_torch:
            ref, torch_default_threads = make_torch_reference(bench, args)
            log("pairing its steps with transformers' PyTorch BertForPreTraining")
        flaxbert = bench_flaxbert(bench, args, ref)
        timings, loader = [flaxbert.timing], flaxbert.loader
        if args.compare_hf:
            log("timing transformers' FlaxBertForPreTraining")
            timings.append(bench_hf(bench, args))
        if args.compare_torch:
            timings.append(flaxbert.torch)
        max_batch = None
        if args.max_batch:
            log("searching the largest batch that fits")
            max_batch = find_max_batch(config, limit[0])
            max_batch.update(limit_bytes=limit[0], limit_source=limit[1])
    flops = model_flops(bench)
    peak, peak_line = peak_tflops(args.peak_tflops, bench.model_config.dtype)
    rows = report_rows(timings, flops, peak, parallel.num_devices, (t.batch_size, d.max_seq_length))
    lines = summary_lines(args, overrides, bench, flops, peak_line)
    lines += [loader_line(loader)] if loader else []
    lines += [max_batch_line(max_batch, d.max_seq_length)] if max_batch else []
    result = {
        "systems": rows,
        "flops": flops,
        "peak_tflops_per_device": peak,
        "notes": lines,
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": parallel.num_devices,
        "config": args.config,
        "overrides": overrides,
        "loader": loader,
        "max_batch": max_batch,
    }
    if args.compare_torch:
        lines += torch_lines(flaxbert, ref, torch_default_threads, args)
    if args.compare_hf:
        ratio = timings[0].median_s / timings[1].median_s
        result["step_time_ratio_vs_hf"] = ratio
        lines.append(f"step_time_ratio_vs_hf={ratio:.3f}")
    if args.compare_torch:  # the last line
        ratio = float(np.median(flaxbert.pair_ratios))
        result.update(step_time_ratio_vs_torch=ratio, torch_pair_ratios=flaxbert.pair_ratios)
        lines.append(f"step_time_ratio_vs_torch={ratio:.3f}")
    print_report(rows, lines)
    return result


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.threads:
            limit_cpus(args.threads)  # before JAX starts its CPU backend
        result = run(args, overrides)
    except ConfigError as e:
        print(f"train_throughput: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
