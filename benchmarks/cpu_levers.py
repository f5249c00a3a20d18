"""What each CPU speed lever does to flaxbert's pre-training step, each measured against
transformers' PyTorch BertForPreTraining in the same process (issue 15).

    python benchmarks/cpu_levers.py --config configs/pretrain.py:mini
    python benchmarks/cpu_levers.py --config configs/pretrain.py:tiny --steps 3 --warmup 1 \
        --no-flags --config.train.batch_size=8 --config.data.max_seq_length=32   # a quick check

Three tables:

1. Dropout random bits: the keep masks of one training step (the model's dropout sites at
   the config's shapes: embeddings, and per layer the attention probabilities, the attention
   output and the feed-forward output), drawn alone with each generator: flax.linen.Dropout's
   `jax.random.bernoulli` (one 32-bit threefry value per element), 16-bit masks from the
   halves of `jax.random.bits` 32-bit words, flaxbert's 16-bit masks (`flaxbert.dropout`: the
   quarters of threefry's two 32-bit output words), the same in one draw for every site, 8-bit
   masks (rate rounded to a multiple of 1/256: 0.1 becomes 0.1016, not used), and the `rbg` /
   `unsafe_rbg` PRNG implementations (XLA's RngBitGenerator) with bernoulli. Alternated round
   by round.
2. Train-step variants, each paired with torch: flaxbert as it is; with flax.linen.Dropout
   (what flaxbert used before); with a fused QKV projection (one (D, 3·N·H) matmul instead of
   three: a benchmark-only variant, its parameter tree differs); with the dense layers computed
   as flax's Dense / DenseGeneral compute them (what flaxbert did before
   `flaxbert.model.Projection`); with the rows flattened but the weight gradient left in
   autodiff's orientation (no `_rows_matmul`); without dropout (a different
   model: what dropout costs). Each round runs every variant's step then torch's, each waited
   for, so all see the same load; a variant's figure is the median over rounds of its time /
   that round's torch time. torch gets as many threads as XLA:CPU uses.
3. XLA:CPU flags (unless --no-flags): flaxbert as it is, with each flag set in XLA_FLAGS, in
   its own process (XLA reads the flags once), paired with torch the same way.

Batches come from the config's loader (the embedded synthetic corpus unless --config.data.*
says otherwise), as in train_throughput.py; one CPU device is what it measures (run it as a
plain command, without the tests' fake devices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_throughput as tt
from benchmarks.torch_reference import TorchBert, torch_version_line
from flaxbert import dropout as fdropout
from flaxbert import model as fmodel
from flaxbert.cli import split_config_overrides
from flaxbert.config import load_config

FLAGS = [
    "",
    "--xla_cpu_experimental_ynn_fusion_type=",  # no YNNPACK fusions (dots through XLA's own)
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_enable_fast_math=true",  # approximate math: not for training, shown for scale
]


def log(message: str) -> None:
    print(f"[cpu_levers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- dropout bits


def dropout_sites(config) -> list[tuple[int, ...]]:
    """The shapes of one step's dropout masks: embeddings (B, L, D), then per layer the
    attention probabilities (B, N, L, L) and two (B, L, D)."""
    m, b, s = config.model, config.train.batch_size, config.data.max_seq_length
    hidden, probs = (b, s, m.hidden_size), (b, m.num_heads, s, s)
    return [hidden] + [probs, hidden, hidden] * m.num_layers


def _bernoulli(rate):
    return lambda key, shape: jax.random.bernoulli(key, 1.0 - rate, shape)


def _bits16(rate):
    threshold = fdropout.drop_threshold(rate)

    def draw(key, shape):
        *rows, last = shape
        words = jax.random.bits(key, (*rows, last // 2), jnp.uint32)
        return jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(shape) >= threshold

    return draw


def _bits8(rate):
    threshold = round(rate * 256)

    def draw(key, shape):
        *rows, last = shape
        words = jax.random.bits(key, (*rows, last // 4), jnp.uint32)
        return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(shape) >= threshold

    return draw


def mask_generators(rate: float, sites) -> dict:
    """name -> (function of a key drawing every site's mask, the key it takes)."""

    def per_site(draw):
        return lambda key: [
            draw(k, s) for k, s in zip(jax.random.split(key, len(sites)), sites, strict=True)
        ]

    def one_draw(key):  # one flat 16-bit draw, cut into the sites
        sizes = [int(np.prod(s)) for s in sites]
        flat = fdropout.keep_mask(key, (sum(sizes),), rate)
        cuts = np.cumsum(sizes)[:-1]
        return [m.reshape(s) for m, s in zip(jnp.split(flat, cuts), sites, strict=True)]

    sixteen = lambda key, shape: fdropout.keep_mask(key, shape, rate)
    return {
        "flax.linen.Dropout: bernoulli, threefry, 32 bits": (
            per_site(_bernoulli(rate)),
            jax.random.key(0),
        ),
        "16-bit halves of jax.random.bits 32-bit words": (
            per_site(_bits16(rate)),
            jax.random.key(0),
        ),
        "flaxbert: 16-bit quarters of threefry's 64 bits (as shipped)": (
            per_site(sixteen),
            jax.random.key(0),
        ),
        "16 bits, one draw for all sites": (one_draw, jax.random.key(0)),
        "8 bits (rate to 1/256; not used)": (per_site(_bits8(rate)), jax.random.key(0)),
        "bernoulli, rbg": (per_site(_bernoulli(rate)), jax.random.key(0, impl="rbg")),
        "bernoulli, unsafe_rbg": (
            per_site(_bernoulli(rate)),
            jax.random.key(0, impl="unsafe_rbg"),
        ),
    }


def time_masks(config, rounds: int) -> list[dict]:
    rate = config.model.hidden_dropout_rate or 0.1
    sites = dropout_sites(config)
    gens = {k: (jax.jit(f), key) for k, (f, key) in mask_generators(rate, sites).items()}
    times = {k: [] for k in gens}
    for r in range(rounds + 1):
        for name, (f, key) in gens.items():
            start = time.perf_counter()
            jax.block_until_ready(f(jax.random.fold_in(key, r)))
            if r:  # the first round compiles
                times[name].append(time.perf_counter() - start)
    elements = sum(int(np.prod(s)) for s in sites)
    base = times[next(iter(times))]
    return [
        {
            "generator": name,
            "ms": 1e3 * float(np.median(t)),
            "ns_per_element": 1e9 * float(np.median(t)) / elements,
            "vs_flax": float(np.median(np.array(t) / np.array(base))),
            "elements": elements,
        }
        for name, t in times.items()
    ]


# ------------------------------------------------------------------------ step variants


class FusedQKVSelfAttention(nn.Module):
    """flaxbert's SelfAttention with one (D, 3, N, H) Projection for query, key and value
    (benchmark-only variant)."""

    config: fmodel.BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_B1QL, deterministic: bool):
        cfg = self.config
        n, h = cfg.num_heads, cfg.head_dim
        qkv_BL3NH = fmodel.Projection(
            (cfg.hidden_size,), (3, n, h), ("embed", None, "heads", "kv"), cfg, name="qkv"
        )(x_BLD)
        q_BLNH, k_BLNH, v_BLNH = (qkv_BL3NH[:, :, i] for i in range(3))
        out_BLNH = fmodel.attend_heads(cfg, q_BLNH, k_BLNH, v_BLNH, mask_B1QL, deterministic)
        return fmodel.Projection(
            (n, h), (cfg.hidden_size,), ("heads", "kv", "embed"), cfg, name="output"
        )(out_BLNH)


class TensordotProjection(fmodel.Projection):
    """flaxbert's Projection computed as flax's Dense / DenseGeneral compute it: the feature
    axes contracted in place (one dot_general over (B, L, in) x (in, out)), not flattened
    into rows first (benchmark-only variant: what flaxbert did before)."""

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kernel = self.param(
            "kernel",
            nn.initializers.zeros_init(),
            (*self.in_shape, *self.out_shape),
            cfg.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), self.out_shape, cfg.param_dtype)
        y = jnp.tensordot(x.astype(cfg.dtype), kernel.astype(cfg.dtype), len(self.in_shape))
        return y + bias.astype(cfg.dtype)


VARIANTS = {
    "flaxbert (as shipped)": ({}, []),
    "dense layers as flax's (feature axes contracted in place; before)": (
        {"Projection": TensordotProjection},
        [],
    ),
    "rows flattened, weight gradient in autodiff's orientation": (
        {"_rows_matmul": jnp.matmul},
        [],
    ),
    "with flax.linen.Dropout (32-bit masks; before)": ({"Dropout": nn.Dropout}, []),
    "with a fused QKV projection": ({"SelfAttention": FusedQKVSelfAttention}, []),
    "without dropout (another model: what dropout costs)": (
        {},
        ["--config.model.hidden_dropout_rate=0", "--config.model.attention_dropout_rate=0"],
    ),
}


def build_step(config_arg, overrides, patches: dict, num_batches: int):
    """A compiled flaxbert train step with `patches` set on flaxbert.model while it is traced;
    returns (run(i) -> seconds, bench)."""
    saved = {k: getattr(fmodel, k) for k in patches}
    for k, v in patches.items():
        setattr(fmodel, k, v)
    try:
        return _build_step(config_arg, overrides, num_batches)
    finally:
        for k, v in saved.items():
            setattr(fmodel, k, v)


def _build_step(config_arg, overrides, num_batches: int):
    config = load_config(config_arg, overrides)
    workdir = tempfile.mkdtemp(prefix="cpu_levers_")
    bench = tt.prepare(config, workdir, num_batches)
    setup = bench.setup
    holder = {"state": setup.create_state(jax.random.key(config.train.seed))}
    step = setup.compile_train_step(holder["state"])
    rng = setup.parallel.put_replicated(jax.random.key(1))
    batches = [setup.parallel.put_batch(b) for b in bench.host_batches]

    def run(i: int) -> float:
        start = time.perf_counter()
        holder["state"], metrics = step(holder["state"], batches[i % len(batches)], rng)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    run(0)  # traced and compiled (under the caller's patches)
    return run, bench


def time_variants(args, overrides, variants: dict) -> dict:
    runs, bench = {}, None
    for name, (patches, extra) in variants.items():
        log(f"compiling: {name}")
        runs[name], b = build_step(args.config, overrides + extra, patches, args.steps)
        bench = bench or b
    ref = TorchBert(bench.model_config, bench.config.train, threads=xla_threads())
    torch_batches = [ref.batch(b) for b in bench.host_batches]
    times = {k: [] for k in [*runs, "torch"]}
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():
            seconds = run(i)
            if i >= args.warmup:
                times[name].append(seconds)
        start = time.perf_counter()
        ref.step(torch_batches[i % len(torch_batches)])
        if i >= args.warmup:
            times["torch"].append(time.perf_counter() - start)
        log(f"round {i + 1}/{args.warmup + args.steps}")
    torch_s = np.array(times["torch"])
    return {
        name: {
            "ms": 1e3 * float(np.median(t)),
            "ratio_vs_torch": float(np.median(np.array(t) / torch_s)),
        }
        for name, t in times.items()
    } | {"torch_threads": ref.threads}


def xla_threads() -> int:
    """The CPUs XLA:CPU sizes its thread pool from (this process's affinity)."""
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------- the report


def parse_args(argv):
    rest, overrides = split_config_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, metavar="FILE[:ARG]")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (medians reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after compiling")
    p.add_argument("--no-flags", action="store_true", help="skip the XLA flag table")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--only-shipped", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(rest)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if not any(o.startswith(tt.SMALL_CORPUS.split("=")[0]) for o in overrides):
        overrides = [tt.SMALL_CORPUS, *overrides]
    return args, overrides


def flag_rows(argv) -> list[dict]:
    rows = []
    for flags in FLAGS:
        log(f"XLA_FLAGS={flags!r}: a process of its own")
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, *argv, "--only-shipped", "--json", out.name]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                rows.append({"flags": flags, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            result = json.load(open(out.name))["variants"]
        rows.append({"flags": flags, **result["flaxbert (as shipped)"]})
        rows[-1]["torch_ms"] = result["torch"]["ms"]
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    if args.only_shipped:  # one row of the flag table, in a process of its own
        variants = time_variants(args, overrides, {"flaxbert (as shipped)": ({}, [])})
        json.dump({"variants": variants}, open(args.json, "w"))
        return 0
    config = load_config(args.config, overrides)
    m, d, t = config.model, config.data, config.train
    print(
        f"# CPU levers: {args.config} {' '.join(overrides)}\n"
        f"L{m.num_layers} H{m.hidden_size} A{m.num_heads}, vocab {m.vocab_size}, batch "
        f"{t.batch_size} x seq {d.max_seq_length}, dropout {m.hidden_dropout_rate} / "
        f"{m.attention_dropout_rate}, {m.dtype}; {len(jax.devices())} x "
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}, {torch_version_line()}; "
        f"{args.steps} timed rounds after {args.warmup}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    log("dropout masks")
    masks = time_masks(config, args.steps)
    print("## Dropout keep masks of one step\n")
    print("| generator | ms / step | ns / element | time vs flax.linen.Dropout |")
    print("|---|---:|---:|---:|")
    for r in masks:
        print(
            f"| {r['generator']} | {r['ms']:.1f} | {r['ns_per_element']:.2f} | {r['vs_flax']:.2f} |"
        )
    print(f"\n{masks[0]['elements']:,} elements per step; medians of {args.steps} rounds\n")
    variants = time_variants(args, overrides, VARIANTS)
    print("## Train step, each variant paired with transformers' PyTorch step\n")
    print("| variant | step ms (median) | step_time_ratio_vs_torch (median of pairs) |")
    print("|---|---:|---:|")
    for name, r in variants.items():
        if name != "torch_threads":
            label = "transformers (PyTorch) BertForPreTraining" if name == "torch" else name
            print(f"| {label} | {r['ms']:.1f} | {r['ratio_vs_torch']:.3f} |")
    print(f"\ntorch threads: {variants['torch_threads']}; XLA:CPU threads: {xla_threads()}\n")
    flags = []
    if not args.no_flags:
        flags = flag_rows(argv)
        print("## XLA:CPU flags (flaxbert as shipped; each in its own process with torch)\n")
        print("| XLA_FLAGS | flaxbert step ms | torch step ms | step_time_ratio_vs_torch |")
        print("|---|---:|---:|---:|")
        for r in flags:
            if "error" in r:
                print(f"| `{r['flags']}` | failed: {r['error']} | | |")
            else:
                print(
                    f"| `{r['flags'] or '(none)'}` | {r['ms']:.1f} | {r['torch_ms']:.1f} | "
                    f"{r['ratio_vs_torch']:.3f} |"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"masks": masks, "variants": variants, "flags": flags}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
