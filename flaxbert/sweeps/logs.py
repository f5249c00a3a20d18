"""What a run leaves in its workdir, read back: the rows of its metrics.jsonl, its JSON files
(final_metrics.json, sweep_status.json, ...), and the scalars of its TensorBoard event files,
read without TensorFlow or TensorBoard. Used by the sweep's status and summary and by
`flaxbert plot`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Iterable


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl ([] without one; a line cut short by a kill is
    dropped)."""
    rows = []
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return rows


# --- TensorBoard events ----------------------------------------------------------------


def _records(path: str) -> Iterable[bytes]:
    """The records of a TFRecord file (length, its CRC, data, its CRC); a record cut short at
    the end (a writer killed mid-write) ends the file. CRCs are not checked."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def read_tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] from the event files in `logdir`, oldest file first, as
    TensorBoard shows them: a session restart at step S (a resumed run's `purge_step`) drops
    the earlier values at steps >= S. Uses tensorboardX's protobuf classes only."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for data in _records(path):
            event = event_pb2.Event.FromString(data)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                for tag, values in scalars.items():
                    scalars[tag] = [(s, v) for s, v in values if s < event.step]
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    x = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:
                    x = value.tensor.float_val[0]
                else:
                    continue
                scalars.setdefault(value.tag, []).append((int(event.step), float(x)))
    return scalars
