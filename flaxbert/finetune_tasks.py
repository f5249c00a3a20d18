"""The four kinds of fine-tuning task: how examples become arrays, the head, the loss, and how
outputs become predictions and metrics.

A kind is a small object with no state beyond the config; `flaxbert.finetune` runs any of them
through the same loop. Arrays are numpy, built once on the host; every row carries `weight`
(1 for a real example, 0 for padding rows that fill the last evaluation batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxbert import metrics as metrics_lib
from flaxbert.data.packing import PackedRows, fill_packed, plan_packing
from flaxbert.data.token_labels import IGNORE_INDEX as IGNORE
from flaxbert.model_config import BertConfig
from flaxbert.task_heads import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from flaxbert.tokenizer import CLS_ID, PAD_ID, SEP_ID


@dataclasses.dataclass
class Features:
    """Model inputs and targets for a split, plus what maps predictions back to examples."""

    arrays: dict[str, np.ndarray]  # each (N, ...)
    examples: list  # the examples the rows came from
    info: Any = None  # kind-specific: QA windows, token-to-word maps
    truncated: int = 0  # examples (or words) cut by max_seq_length

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])


def _pad_rows(arrays: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    n = len(arrays["input_ids"])
    extra = -n % multiple
    if not extra:
        return arrays
    return {
        k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in arrays.items()
    }


def padded(arrays: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Rows padded (weight 0) to a multiple of the batch size."""
    return _pad_rows(arrays, multiple)


def _ce(logits, labels, valid):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.where(valid, losses, 0.0)


# ------------------------------------------------------------------------------ sentences


def encode_pair(tokenizer, text_a: str, text_b: str | None, max_seq_length: int):
    """[CLS] a [SEP] (b [SEP]) ids and segment ids, the longer side trimmed first."""
    a = list(tokenizer.encode(text_a))
    b = list(tokenizer.encode(text_b)) if text_b is not None else None
    budget = max_seq_length - (3 if b is not None else 2)
    truncated = False
    if b is None:
        if len(a) > budget:
            a, truncated = a[:budget], True
    else:
        while len(a) + len(b) > budget:
            truncated = True
            (a if len(a) >= len(b) else b).pop()
    ids = [CLS_ID, *a, SEP_ID]
    segments = [0] * len(ids)
    if b is not None:
        ids += [*b, SEP_ID]
        segments += [1] * (len(b) + 1)
    return ids, segments, truncated


def _stack(rows_ids, rows_segments, max_seq_length):
    n = len(rows_ids)
    input_ids = np.full((n, max_seq_length), PAD_ID, np.int32)
    segment_ids = np.zeros((n, max_seq_length), np.int32)
    input_mask = np.zeros((n, max_seq_length), np.int32)
    for i, (ids, seg) in enumerate(zip(rows_ids, rows_segments, strict=True)):
        input_ids[i, : len(ids)] = ids
        segment_ids[i, : len(seg)] = seg
        input_mask[i, : len(ids)] = 1
    return input_ids, input_mask, segment_ids


class SequenceKind:
    """Single sentences and sentence pairs: classification (CE over labels) or regression
    (MSE on one score), from the pooled [CLS] vector."""

    def __init__(self, num_labels: int, regression: bool, metric_set: str):
        self.num_labels = 1 if regression else num_labels
        self.regression = regression
        self.metric_set = metric_set

    def model(self, config: BertConfig):
        return BertForSequenceClassification(config, self.num_labels)

    def features(self, examples, tokenizer, data) -> Features:
        ids, segs, truncated = [], [], 0
        for ex in examples:
            i, s, t = encode_pair(tokenizer, ex.text_a, ex.text_b, data.max_seq_length)
            ids.append(i)
            segs.append(s)
            truncated += t
        input_ids, input_mask, segment_ids = _stack(ids, segs, data.max_seq_length)
        dtype = np.float32 if self.regression else np.int32
        labels = np.asarray([ex.label if ex.label is not None else 0 for ex in examples], dtype)
        arrays = dict(
            input_ids=input_ids,
            input_mask=input_mask,
            segment_ids=segment_ids,
            labels=labels,
            weight=np.ones(len(examples), np.float32),
        )
        return Features(arrays, list(examples), truncated=truncated)

    def count(self, batch):
        """Examples the loss averages over (real rows; packed rows: real slots)."""
        return jnp.sum(batch["weight"])

    def loss_sums(self, outputs, batch):
        # Packed rows: outputs (B, K, C) and labels / weights (B, K), a slot per pair.
        w = batch["weight"]
        if self.regression:
            losses = jnp.square(outputs[..., 0] - batch["labels"])
        else:
            losses = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["labels"])
        return {"loss_sum": jnp.sum(losses * w), "count": self.count(batch)}

    def predict(self, outputs):
        return outputs[:, 0] if self.regression else jnp.argmax(outputs, -1)

    def evaluate(self, predictions: np.ndarray, features: Features, label_names):
        n = len(features.examples)
        pred = predictions[:n]
        gold = features.arrays["labels"][:n]
        scores = metrics_lib.TASK_METRICS[self.metric_set](pred.tolist(), gold.tolist())
        rows = []
        for ex, p in zip(features.examples, pred, strict=True):
            if self.regression:
                rows.append({"guid": ex.guid, "prediction": float(p), "label": ex.label})
            else:
                gold_name = label_names[ex.label] if ex.label is not None else None
                rows.append(
                    {"guid": ex.guid, "prediction": label_names[int(p)], "label": gold_name}
                )
        return scores, rows


# ------------------------------------------------------------------------------ tokens


class TokenKind:
    """NER: a label on the first sub-token of each word, evaluated per word (per character for
    character-level data) with entity-level precision/recall/F1."""

    metric_set = "entity_f1"

    def __init__(self, label_names: list[str]):
        self.label_names = list(label_names)
        self.num_labels = len(label_names)

    def model(self, config: BertConfig):
        return BertForTokenClassification(config, self.num_labels)

    def features(self, examples, tokenizer, data) -> Features:
        from flaxbert.data import token_labels

        label_to_id = {name: i for i, name in enumerate(self.label_names)}
        arrays, dropped = token_labels.batch_token_examples(
            tokenizer, examples, label_to_id, data.max_seq_length
        )
        arrays = {k: np.asarray(v, np.int32) for k, v in arrays.items()}
        arrays["weight"] = np.ones(len(examples), np.float32)
        return Features(arrays, list(examples), truncated=int(np.sum(np.asarray(dropped) > 0)))

    @staticmethod
    def _valid(batch):
        return (batch["label_ids"] != IGNORE) & (batch["weight"][:, None] > 0)

    def count(self, batch):
        """Labelled tokens (first pieces of words) of real rows: what the loss averages over."""
        return jnp.sum(self._valid(batch))

    def loss_sums(self, outputs, batch):
        valid = self._valid(batch)
        losses = _ce(outputs, batch["label_ids"], valid)
        return {"loss_sum": jnp.sum(losses), "count": jnp.sum(valid)}

    def predict(self, outputs):
        return jnp.argmax(outputs, -1)

    def evaluate(self, predictions: np.ndarray, features: Features, label_names):
        from flaxbert.data import token_labels

        id_to_label = dict(enumerate(self.label_names))
        gold, pred, rows = [], [], []
        for i, ex in enumerate(features.examples):
            tags = token_labels.word_predictions(
                predictions[i],
                features.arrays["word_index"][i],
                len(ex.words),
                id_to_label,
                last_word=features.arrays["last_word"][i],
            )
            gold.append(list(ex.labels))
            pred.append(tags)
            rows.append(
                {"guid": ex.guid, "words": ex.words, "prediction": tags, "label": ex.labels}
            )
        return metrics_lib.TASK_METRICS["entity_f1"](pred, gold), rows


# ------------------------------------------------------------------------------ QA


class QAKind:
    """Extractive QA: start/end logits over sliding windows of the context; n-best decoding
    maps the best span back to the original text; SQuAD exact match and F1."""

    metric_set = "squad"
    num_labels = 2

    def model(self, config: BertConfig):
        return BertForQuestionAnswering(config)

    def features(self, examples, tokenizer, data) -> Features:
        from flaxbert.data import qa

        f = qa.qa_features(
            examples,
            tokenizer,
            max_seq_length=data.max_seq_length,
            doc_stride=data.doc_stride,
            max_query_length=data.max_query_length,
        )
        arrays = dict(
            input_ids=np.asarray(f.input_ids, np.int32),
            input_mask=np.asarray(f.input_mask, np.int32),
            segment_ids=np.asarray(f.segment_ids, np.int32),
            start_positions=np.asarray(f.start_positions, np.int32),
            end_positions=np.asarray(f.end_positions, np.int32),
            weight=np.ones(len(f.input_ids), np.float32),
        )
        return Features(arrays, list(examples), info=f)

    def count(self, batch):
        """Windows of real rows: what the loss averages over."""
        return jnp.sum(batch["weight"])

    def loss_sums(self, outputs, batch):
        start_logits, end_logits = outputs
        w = batch["weight"]
        losses = 0.5 * (
            optax.softmax_cross_entropy_with_integer_labels(start_logits, batch["start_positions"])
            + optax.softmax_cross_entropy_with_integer_labels(end_logits, batch["end_positions"])
        )
        return {"loss_sum": jnp.sum(losses * w), "count": jnp.sum(w)}

    def predict(self, outputs):
        return jnp.stack(outputs, axis=-1)  # (B, L, 2)

    def evaluate(self, predictions: np.ndarray, features: Features, label_names, data=None):
        from flaxbert.data import qa

        n = len(features.info.input_ids)
        answers = qa.decode_qa(
            predictions[:n, :, 0],
            predictions[:n, :, 1],
            features.info,
            features.examples,
            n_best_size=data.n_best_size if data is not None else 20,
            max_answer_length=data.max_answer_length if data is not None else 30,
        )
        gold = {ex.qid: [a[0] for a in ex.answers] for ex in features.examples}
        scores = metrics_lib.squad_scores(answers, gold)
        rows = [
            {"qid": ex.qid, "prediction": answers.get(ex.qid, ""), "answers": gold[ex.qid]}
            for ex in features.examples
        ]
        return {k: float(v) for k, v in scores.items()}, rows


# config.kind -> the kind, from (label names, metric set). A new kind is one more row.
KINDS = {
    "classification": lambda labels, metrics: SequenceKind(len(labels), False, metrics),
    "regression": lambda labels, metrics: SequenceKind(1, True, metrics),
    "token_classification": lambda labels, metrics: TokenKind(labels),
    "qa": lambda labels, metrics: QAKind(),
}


def make_kind(kind: str, label_names: list[str], metric_set: str):
    """The task kind `config.kind` names, for `label_names` (data.label_list) and
    `metric_set` (config.metrics). Raises ValueError for a kind not in `KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    return KINDS[kind](label_names, metric_set)


def dummy_inputs(seq_len: int):
    z = jnp.zeros((1, seq_len), jnp.int32)
    return z, jnp.ones_like(z), z


def num_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ packing


class PackedEpochs:
    """Training batches of packed rows (`data.packing`, [CLS] tasks): each epoch visits the
    examples in a fresh order (seeded by (seed, epoch)) and packs them, in that order, into
    batches of `batch_size` rows (`flaxbert.data.packing.plan_packing`). Epochs differ a
    little in length; a step's batch is a pure function of (seed, step), so resuming needs
    only the step."""

    def __init__(self, arrays, batch_size: int, seq_len: int, max_pairs: int, seed: int):
        self.arrays = arrays
        self.lengths = arrays["input_mask"].sum(1)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_pairs = max_pairs
        self.seed = seed
        self._plans: list[list[np.ndarray]] = []
        self._first_step = [0]  # first step of each planned epoch

    def plan(self, epoch: int) -> list[np.ndarray]:
        """(example index, row) placements of each batch of `epoch`."""
        while len(self._plans) <= epoch:
            e = len(self._plans)
            order = np.random.default_rng([self.seed, e]).permutation(len(self.lengths))
            batches = plan_packing(
                self.lengths[order], self.batch_size, self.seq_len, self.max_pairs
            )
            self._plans.append([np.stack([order[b[:, 0]], b[:, 1]], 1) for b in batches])
            self._first_step.append(self._first_step[-1] + len(batches))
        return self._plans[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch within it) of a global step (0-based)."""
        while self._first_step[-1] <= step:
            self.plan(len(self._plans))
        epoch = int(np.searchsorted(self._first_step, step, side="right")) - 1
        return epoch, step - self._first_step[epoch]

    def steps_for(self, num_epochs: float) -> int:
        """Steps that cover `num_epochs` epochs (the last one pro rata)."""
        whole = int(num_epochs)
        steps = sum(len(self.plan(e)) for e in range(whole))
        if num_epochs > whole:
            steps += int(np.ceil((num_epochs - whole) * len(self.plan(whole))))
        return steps

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = self.locate(step)
        placement = self.plan(epoch)[i]
        a = self.arrays
        packed = PackedRows(
            self.batch_size,
            self.seq_len,
            self.max_pairs,
            pair_keys=("labels", "weight"),
            pair_dtypes={"labels": a["labels"].dtype, "weight": np.float32},
        )
        keys = ("input_ids", "input_mask", "segment_ids", "labels", "weight")
        return fill_packed({k: a[k] for k in keys}, placement, packed).arrays
