"""Step time of the pjit data-parallel train step on 1, 2, 4, 8 devices.

    python benchmarks/scaling.py                       # tiny and mini, 1/2/4/8 CPU devices
    python benchmarks/scaling.py --variants mini --devices 1,8 --steps 30

Each (variant, device count) runs in its own process (the number of fake CPU devices is
fixed when JAX starts), with the variant's global batch split over `parallel.data`.
Batches come from the real loader and are built before timing. It prints one row per run:
the median time of a step after compilation and warm-up, and sequences per second.

On a CPU the fake devices share the machine's cores, so more devices cannot be faster;
the table only shows that splitting costs nothing pathological. On GPUs or TPUs run it
with --devices matching the hardware (no fake devices are set when --real is given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    sys.path.insert(0, REPO)
    import jax
    import numpy as np

    from flaxbert import pretrain_step, sharding, train
    from flaxbert.config import load_config
    from flaxbert.data.pretraining import PretrainingBatches
    from flaxbert.data.sources import load_corpus

    config = load_config(
        os.path.join(REPO, "configs/pretrain.py") + f":{args.variant}",
        [f"--config.parallel.data={args.devices}", "--config.data.synthetic_documents=500"],
    )
    model_config = train.validate_pretrain_config(config)
    parallel = sharding.make_parallel(  # the first N devices (all of them with fake CPUs)
        config.parallel,
        pretrain_step.logical_dims(model_config),
        config.train.batch_size,
        devices=jax.devices()[: args.devices],
    )
    setup = train.setup_training(config, model_config, parallel)
    corpus = load_corpus(config.data, "/tmp")
    inst = train.instance_config(config.data, corpus.vocab_size)
    loader = PretrainingBatches(corpus.train, inst, config.train.batch_size, seed=0)
    host_batches = [loader.batch(i) for i in range(args.steps + args.warmup)]
    parallel = setup.parallel
    state = setup.create_state(jax.random.key(0))
    step = setup.compile_train_step(state)
    rng = parallel.put_replicated(jax.random.key(1))
    batches = [parallel.put_batch(b) for b in host_batches]

    start = time.perf_counter()
    state, metrics = step(state, batches[0], rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for b in batches[1 : args.warmup]:
        state, metrics = step(state, b, rng)
    jax.block_until_ready(metrics)
    times = []
    for b in batches[args.warmup :]:
        start = time.perf_counter()
        state, metrics = step(state, b, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    print(
        json.dumps(
            {
                "variant": args.variant,
                "devices": parallel.num_devices,
                "batch": config.train.batch_size,
                "seq": config.data.max_seq_length,
                "step_ms": 1000 * median,
                "seq_per_s": config.train.batch_size / median,
                "compile_s": compile_s,
                "loss": float(metrics["loss"]),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="tiny,mini")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, compilation included")
    p.add_argument("--real", action="store_true", help="use the real devices, no fake CPUs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.devices = int(args.devices)
        return child(args)

    print("| variant | devices | global batch x seq | step (ms) | seq/s | compile (s) |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        for n in map(int, args.devices.split(",")):
            env = dict(os.environ)
            if not args.real:
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
                env["JAX_PLATFORMS"] = "cpu"
            cmd = [sys.executable, __file__, "--child", "--variant", variant]
            cmd += ["--devices", str(n), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"| {variant} | {n} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {variant} | {r['devices']} | {r['batch']} x {r['seq']} | "
                f"{r['step_ms']:.1f} | {r['seq_per_s']:.0f} | {r['compile_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
