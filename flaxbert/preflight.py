"""Memory preflight: compile the train step for the configured mesh and report per-device
memory, without data and without training (`flaxbert compile`).

The state and the batch are abstract (`jax.eval_shape` / `ShapeDtypeStruct` with their
shardings), so nothing is allocated: the numbers are XLA's own buffer assignment for one
device, the thing that fails with an out-of-memory error when a job starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Collection

import jax
import ml_collections

from flaxbert.train import planned_model, setup_training

log = logging.getLogger("flaxbert")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device of the compiled train step (XLA's `memory_analysis()`)."""

    strategy: str  # the parallel description
    num_devices: int
    device_kind: str
    arguments: int  # the state and the batch
    outputs: int  # the new state and the metrics
    temps: int  # activations, gradients and other scratch
    generated_code: int
    aliased: int  # outputs written over donated arguments (counted once)
    flops: float | None  # XLA's cost analysis of the per-device program, if it gives one
    compile_seconds: float

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temps + self.generated_code

    def format(self) -> str:
        def size(n: int) -> str:
            for unit in ("B", "KiB", "MiB", "GiB"):
                if abs(n) < 1024 or unit == "GiB":
                    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
                n /= 1024
            return ""

        rows = [
            ("arguments (state + batch)", self.arguments),
            ("outputs (state + metrics)", self.outputs),
            ("  of which aliased to donated arguments", self.aliased),
            ("temporaries (activations, gradients, ...)", self.temps),
            ("generated code", self.generated_code),
            ("total", self.total),
        ]
        lines = [
            f"train step compiled in {self.compile_seconds:.1f}s for {self.num_devices} x "
            f"{self.device_kind}: {self.strategy}",
            "per-device memory:",
        ]
        lines += [f"  {name:<44}{size(n):>12}" for name, n in rows]
        if self.flops is not None:
            lines.append(f"FLOPs per step per device (XLA cost analysis): {self.flops:.3e}")
        return "\n".join(lines)


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def compile_train_step(
    config: ml_collections.ConfigDict, workdir: str = "", explicit: Collection[str] = ()
) -> MemoryReport:
    """Lowers and compiles the train step exactly as `pretrain` would, on abstract inputs: the
    model `train.planned_model` gives (an `init_from` checkpoint's structure, the tokenizer's
    vocabulary unless `explicit` names model.vocab_size)."""
    jax.config.update("jax_threefry_partitionable", True)
    config, model_config = planned_model(config, workdir, explicit)
    setup = setup_training(config, model_config)
    parallel = setup.parallel
    state = setup.abstract_state()
    batch = parallel.abstract_batch(setup.train_batch_shapes(config.train.batch_size))
    rng = parallel.put_replicated(jax.random.key(0))
    start = time.perf_counter()
    compiled = setup.compile_train_step(state).lower(state, batch, rng).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return MemoryReport(
        strategy=parallel.description,
        num_devices=parallel.num_devices,
        device_kind=jax.devices()[0].device_kind,
        arguments=int(mem.argument_size_in_bytes),
        outputs=int(mem.output_size_in_bytes),
        temps=int(mem.temp_size_in_bytes),
        generated_code=int(mem.generated_code_size_in_bytes),
        aliased=int(mem.alias_size_in_bytes),
        flops=xla_flops(compiled),
        compile_seconds=seconds,
    )


def preflight(
    config: ml_collections.ConfigDict, workdir: str, explicit: Collection[str] = ()
) -> MemoryReport:
    """`flaxbert compile`: prints the report and writes it to `workdir/compile.json`."""
    report = compile_train_step(config, workdir, explicit)
    if jax.process_index() == 0:
        print(report.format(), flush=True)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "compile.json"), "w") as f:
            json.dump({**dataclasses.asdict(report), "total": report.total}, f, indent=2)
    return report
