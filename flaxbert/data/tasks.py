"""The fine-tuning tasks this project knows, as data configs: `TASK_PRESETS`.

Each preset is the `data` config of one task in ../shared/data/tasks/<task>/ (nsmc,
korsts, kornli, klue_ner, sst2, cola, mrpc, rte, stsb, wikiann_en, wnut17, squad_v1): the
reader keys its format reads (see `flaxbert.data.task_files`), with the task keys `kind`,
`metrics`, `main_metric` and the train/eval file names. `ReaderSpec.from_config` takes a
preset as it is; a config for a new task is a dict like these. The readers themselves live
in `flaxbert.data.task_spec`, `task_rows`, `task_files` and `task_tfds`.
"""

from __future__ import annotations

from flaxbert.data.task_spec import DEFAULT_ENCODING

KINDS = ("classification", "regression", "token_classification", "qa")
# The metric names each metric set reports; a preset's `main_metric` is one of these.
METRIC_SETS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "accuracy_f1": ("accuracy", "f1"),
    "matthews": ("matthews_corrcoef",),
    "pearson_spearman": ("pearson", "spearman"),
    "entity_f1": ("precision", "recall", "f1"),
    "squad": ("exact_match", "f1"),
}

# ------------------------------------------------------------------------------ presets

_KLUE_NER_TAGS = (
    "B-DT,B-LC,B-OG,B-PS,B-QT,B-TI,I-DT,I-LC,I-OG,I-PS,I-QT,I-TI,O"  # sorted, from train.tsv
)
_WIKIANN_TAGS = "B-LOC,B-ORG,B-PER,I-LOC,I-ORG,I-PER,O"
_WNUT17_TAGS = (
    "B-corporation,B-creative-work,B-group,B-location,B-person,B-product,"
    "I-corporation,I-creative-work,I-group,I-location,I-person,I-product,O"
)


def _tsv_task(
    text_a: str,
    text_b: str,
    label: str,
    label_list: str,
    metrics: str,
    main_metric: str,
    header: bool = True,
) -> dict:
    return {
        "format": "tsv",
        "text_a": text_a,
        "text_b": text_b,
        "label": label,
        "header": header,
        "quoting": False,  # every one of these TSVs holds unbalanced double quotes
        "encoding": DEFAULT_ENCODING,
        "label_list": label_list,
        "kind": "classification" if label_list else "regression",
        "metrics": metrics,
        "main_metric": main_metric,
        "train_file": "train.tsv",
        "eval_file": "dev.tsv",
    }


def _ner_task(fmt: str, label_list: str, train: str, dev: str, **reader) -> dict:
    columns = {"token_column": 0, "tag_column": -1, "token_prefix": ""} if fmt == "conll" else {}
    return {
        "format": fmt,
        "encoding": DEFAULT_ENCODING,
        **columns,
        **reader,
        "label_list": label_list,
        "kind": "token_classification",
        "metrics": "entity_f1",
        "main_metric": "f1",
        "train_file": train,
        "eval_file": dev,
    }


# Every key a preset's format reads is in the preset, with its default where the task needs
# nothing else, so the fine-tuning config has it (data.reader.KEY) for an override.
# The data configs of the tasks in ../shared/data/tasks/<task>/ (file names relative to
# that folder). `ReaderSpec.from_config(TASK_PRESETS[task])` reads them; a config for a new
# task is a dict like these.
TASK_PRESETS: dict[str, dict] = {
    "nsmc": _tsv_task("document", "", "label", "0,1", "accuracy", "accuracy"),
    # KorNLU reports Spearman correlation for KorSTS.
    "korsts": _tsv_task("sentence1", "sentence2", "score", "", "pearson_spearman", "spearman"),
    "kornli": _tsv_task(
        "sentence1",
        "sentence2",
        "gold_label",
        "entailment,neutral,contradiction",
        "accuracy",
        "accuracy",
    ),
    "klue_ner": _ner_task("klue_ner", _KLUE_NER_TAGS, "train.tsv", "dev.tsv"),
    "sst2": _tsv_task("sentence", "", "label", "0,1", "accuracy", "accuracy"),
    # headerless: source, label, original label, sentence
    "cola": _tsv_task("3", "", "1", "0,1", "matthews", "matthews_corrcoef", header=False),
    "mrpc": _tsv_task("#1 String", "#2 String", "Quality", "0,1", "accuracy_f1", "f1"),
    "rte": _tsv_task(
        "sentence1", "sentence2", "label", "entailment,not_entailment", "accuracy", "accuracy"
    ),
    "stsb": _tsv_task("sentence1", "sentence2", "score", "", "pearson_spearman", "pearson"),
    "wikiann_en": _ner_task("conll", _WIKIANN_TAGS, "train", "dev", token_prefix="en:"),
    "wnut17": _ner_task("conll", _WNUT17_TAGS, "train.conll", "dev.conll"),
    "squad_v1": {
        "format": "squad",
        "encoding": DEFAULT_ENCODING,
        "kind": "qa",
        "metrics": "squad",
        "main_metric": "f1",
        "train_file": "train.json",
        "eval_file": "dev.json",
    },
}
