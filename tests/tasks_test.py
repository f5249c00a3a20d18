"""Fine-tuning task readers: every preset on its real dev file, every bad-row error on a
small hand-made file, the config checks, and a TFDS array_record round trip (no network)."""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from shared_data import DATA

from flaxbert.config import ConfigError
from flaxbert.data import task_files, task_tfds, tasks
from flaxbert.data.task_files import read_examples
from flaxbert.data.task_spec import (
    QAExample,
    ReaderSpec,
    TaskDataError,
    TextExample,
    TokenExample,
)
from flaxbert.data.task_tfds import read_tfds
from flaxbert.data.tasks import METRIC_SETS, TASK_PRESETS

TASKS = DATA / "tasks"

# Dev sizes from ../shared/data/README.md (NER: sentences; SQuAD: questions).
DEV_SIZES = {
    "nsmc": 10_000,
    "korsts": 1500,
    "kornli": 2490,
    "klue_ner": 500,
    "sst2": 872,
    "cola": 1043,
    "mrpc": 408,
    "rte": 277,
    "stsb": 1500,
    "wikiann_en": 10_000,
    "wnut17": 1009,
    "squad_v1": 1378,
}
EXAMPLE_TYPE = {
    "classification": TextExample,
    "regression": TextExample,
    "token_classification": TokenExample,
    "qa": QAExample,
}


def _task_dir(task: str):
    if not TASKS.is_dir():
        pytest.skip(f"the shared task files are absent: {TASKS} (<repo>/../shared/data/tasks)")
    return TASKS / task


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _spec(**config) -> ReaderSpec:
    return ReaderSpec.from_config(config)


def _error(spec: ReaderSpec, path, match: str | None = None) -> str:
    with pytest.raises(TaskDataError) as info:
        read_examples(spec, path)
    message = str(info.value)
    assert str(path) in message
    if match:
        assert match in message, message
    return message


# ------------------------------------------------------------------------------ real files


def test_the_presets_cover_the_tasks_and_are_consistent():
    assert set(TASK_PRESETS) == set(DEV_SIZES)
    for task, preset in TASK_PRESETS.items():
        assert preset["kind"] in tasks.KINDS, task
        assert preset["main_metric"] in METRIC_SETS[preset["metrics"]], task
        spec = ReaderSpec.from_config(ml_collections.ConfigDict(preset))
        if preset["kind"] == "classification":
            assert len(spec.label_list) >= 2 and not spec.is_regression, task
        if preset["kind"] == "regression":
            assert spec.is_regression, task
        if preset["kind"] == "token_classification":
            assert "O" in spec.label_list, task
            assert list(spec.label_list) == sorted(spec.label_list), task
            assert all(t == "O" or t[:2] in ("B-", "I-") for t in spec.label_list), task


@pytest.mark.parametrize("task", sorted(DEV_SIZES))
def test_every_preset_reads_its_dev_file_without_errors(task):
    folder = _task_dir(task)
    preset = TASK_PRESETS[task]
    assert (folder / preset["train_file"]).is_file()
    result = read_examples(ReaderSpec.from_config(preset), folder / preset["eval_file"])
    assert result.skipped == []
    assert len(result.examples) == DEV_SIZES[task]
    assert all(isinstance(e, EXAMPLE_TYPE[preset["kind"]]) for e in result.examples)
    if preset["kind"] == "classification":
        counts = np.bincount([e.label for e in result.examples])
        assert len(counts) == len(preset["label_list"].split(",")) and counts.min() > 0
    if preset["kind"] == "regression":
        scores = [e.label for e in result.examples]
        assert 0.0 <= min(scores) and max(scores) <= 5.0 and len(set(scores)) > 50
    if preset["kind"] == "token_classification":
        assert all(len(e.words) == len(e.labels) > 0 for e in result.examples)
        if task == "klue_ner":  # characters, spaces included
            assert all(len(w) == 1 for e in result.examples for w in e.words)
        else:
            assert all(w and w.strip() == w for e in result.examples for w in e.words)
    if preset["kind"] == "qa":
        assert len({e.qid for e in result.examples}) == len(result.examples)


def _dev(task: str, limit: int | None = None) -> list:
    preset = TASK_PRESETS[task]
    path = _task_dir(task) / preset["eval_file"]
    return read_examples(ReaderSpec.from_config(preset), path, limit=limit).examples


def test_known_examples_of_the_sentence_tasks():
    sst2 = _dev("sst2", limit=1)[0]
    assert sst2 == TextExample(
        "dev.tsv:2", "it 's a charming and often affecting journey . ", None, 1
    )
    cola = _dev("cola", limit=1)[0]  # headerless: line 1 is an example
    assert (cola.guid, cola.text_a, cola.label) == (
        "dev.tsv:1",
        "The sailors rode the breeze clear of the rocks.",
        1,
    )
    mrpc = _dev("mrpc", limit=1)[0]  # BOM before `Quality`, unbalanced quote in text_b
    assert mrpc.label == 1 and mrpc.text_b.startswith('" The foodservice pie business')
    rte = _dev("rte", limit=2)
    assert [e.label for e in rte] == [1, 0]  # not_entailment, entailment
    assert rte[1].text_b == "Bacteria is winning the war against antibiotics."
    stsb = _dev("stsb", limit=2)
    assert [e.label for e in stsb] == [5.0, 4.75]
    assert stsb[0].text_b == "A man wearing a hard hat is dancing."
    korsts = _dev("korsts", limit=2)
    assert [e.label for e in korsts] == [5.0, 4.75]
    assert korsts[0].text_a == "안전모를 가진 한 남자가 춤을 추고 있다."
    kornli = _dev("kornli", limit=2)
    assert [e.label for e in kornli] == [1, 2]  # neutral, contradiction
    assert kornli[0].text_a == '그리고 그가 말했다, "엄마, 저 왔어요."'  # quotes kept as text
    nsmc = _dev("nsmc", limit=1)[0]
    assert (nsmc.text_a, nsmc.text_b, nsmc.label) == ("제일 재미있는 드라마였음", None, 1)


def test_known_examples_of_the_ner_and_qa_tasks():
    klue = _dev("klue_ner", limit=1)[0]
    assert klue.guid == "klue-ner-v1_dev_00007-nsmc"
    assert "".join(klue.words) == "현재 시네마테크에서 하고 있는 영화.. 놓치면 후회합니다."
    assert klue.words[2] == " " and klue.labels[2] == "O"
    assert klue.labels[3:8] == ["B-LC"] + ["I-LC"] * 4  # 시네마테크
    wikiann = _dev("wikiann_en", limit=1)[0]
    assert wikiann.words[:4] == ["Sioux", "Falls", "Arena", "("]  # the `en:` prefix is gone
    assert wikiann.labels[:4] == ["B-ORG", "I-ORG", "I-ORG", "O"]
    wnut = _dev("wnut17")
    assert wnut[1].words[6:9] == ["Redondo", "Beach", "Blvd"]
    assert wnut[1].labels[6:9] == ["B-location", "I-location", "I-location"]
    # The dev file's stray U+FEFF characters are dropped, not kept as tokens.
    assert wnut[-1].words[-3:] == ["Discivery", "Channel", "!"]
    assert not any("\ufeff" in w for e in wnut for w in e.words)
    squad = _dev("squad_v1", limit=1)[0]
    assert squad.qid == "5726d8bd708984140094d35b"
    assert squad.question == "What word is the word pharmacy taken from?"
    assert squad.answers[:2] == [("its root word pharma", 34), ("pharma", 9)]


def test_limit_keeps_the_first_examples_and_stops_reading():
    preset = TASK_PRESETS["nsmc"]
    spec = ReaderSpec.from_config(preset)
    path = _task_dir("nsmc") / preset["train_file"]  # 140,000 rows: only 3 are built
    result = read_examples(spec, path, limit=3)
    assert [e.guid for e in result.examples] == ["train.tsv:2", "train.tsv:3", "train.tsv:4"]
    assert read_examples(spec, path, limit=0).examples == []
    with pytest.raises(ValueError, match="limit"):
        read_examples(spec, path, limit=-1)


# ------------------------------------------------------------------------------ bad rows

TSV = dict(format="tsv", text_a="s1", text_b="s2", label="label", label_list="yes,no")


def test_a_label_outside_the_label_list_names_file_row_and_the_allowed_labels(tmp_path):
    path = _write(tmp_path, "t.tsv", "s1\ts2\tlabel\na\tb\tyes\nc\td\tmaybe\n")
    message = _error(_spec(**TSV), path, "line 3")
    assert "'maybe'" in message and "yes, no" in message and "skip_bad_rows" in message


def test_an_empty_text_is_an_error(tmp_path):
    path = _write(tmp_path, "t.tsv", "s1\ts2\tlabel\na\tb\tyes\nc\t  \tno\n")
    message = _error(_spec(**TSV), path, "line 3")
    assert "'s2' is empty" in message


def test_a_row_with_missing_columns_says_how_many(tmp_path):
    path = _write(tmp_path, "t.tsv", "s1\ts2\tlabel\na\tb\tyes\nc\tno\n")
    message = _error(_spec(**TSV), path, "line 3")
    assert "found 2 tab-separated columns, expected 3" in message


def test_a_non_numeric_regression_score_is_an_error(tmp_path):
    path = _write(tmp_path, "t.tsv", "s1\ts2\tscore\na\tb\t4.5\nc\td\thigh\n")
    spec = _spec(format="tsv", text_a="s1", text_b="s2", label="score", label_list="")
    message = _error(spec, path, "line 3")
    assert "'high'" in message and "not a number" in message
    good = _write(tmp_path, "g.tsv", "s1\ts2\tscore\na\tb\t4.5\n")
    assert read_examples(spec, good).examples[0].label == 4.5


def test_a_missing_header_column_lists_the_header(tmp_path):
    path = _write(tmp_path, "t.tsv", "sentence\tlabel\na\tyes\n")
    message = _error(_spec(**TSV), path, "line 1")
    assert "no column 's1'" in message and "'sentence', 'label'" in message


def test_a_bom_before_the_header_is_harmless_by_default_and_explained_otherwise(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes("\ufeffs1\ts2\tlabel\na\tb\tno\n".encode())
    assert read_examples(_spec(**TSV), path).examples[0].label == 1
    message = _error(_spec(**TSV, encoding="utf-8"), path, "byte-order mark")
    assert "utf-8-sig" in message


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("s1\ts2\tlabel\na\tb\tno\ncaf\u00e9\tb\tno\n".encode("latin-1"))
    _error(_spec(**TSV), path, "line 3")


def test_a_missing_file_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_examples(_spec(**TSV), tmp_path / "nope.tsv")


def test_headerless_columns_by_index(tmp_path):
    path = _write(tmp_path, "c.tsv", "src\t1\t\tGood one.\nsrc\t0\t*\tBad one.\n")
    spec = _spec(format="tsv", text_a="3", label="1", label_list="0,1", header=False)
    result = read_examples(spec, path)
    assert [(e.guid, e.text_a, e.label) for e in result.examples] == [
        ("c.tsv:1", "Good one.", 1),
        ("c.tsv:2", "Bad one.", 0),
    ]
    spec = _spec(format="tsv", text_a="-1", label="1", label_list="0,1", header=False)
    assert read_examples(spec, path).examples[1].text_a == "Bad one."


def test_skip_bad_rows_counts_and_explains_each_skipped_row(tmp_path, caplog):
    path = _write(
        tmp_path,
        "t.tsv",
        "s1\ts2\tlabel\n"
        "a\tb\tyes\n"  # line 2: good
        "c\td\tmaybe\n"  # line 3: unknown label
        "\n"  # line 4: blank, not a row
        "e\tf\n"  # line 5: missing column
        "\tg\tno\n"  # line 6: empty text
        "h\ti\tno\n",  # line 7: good
    )
    result = read_examples(_spec(**TSV, skip_bad_rows=True), path)
    assert [e.guid for e in result.examples] == ["t.tsv:2", "t.tsv:7"]
    assert [row for row, _ in result.skipped] == [3, 5, 6]
    reasons = [why for _, why in result.skipped]
    assert "not one of the allowed labels yes, no" in reasons[0]
    assert "found 2 tab-separated columns, expected 3" in reasons[1]
    assert "'s1' is empty" in reasons[2]
    assert "skipped 3 bad lines" in caplog.text
    # The limit counts kept examples, not skipped rows.
    result = read_examples(_spec(**TSV, skip_bad_rows=True), path, limit=1)
    assert len(result.examples) == 1 and result.skipped == []


def test_csv_with_quoting(tmp_path):
    path = _write(
        tmp_path,
        "q.csv",
        'text,label\n"Hello, world",pos\n"said ""hi""\nthen left",neg\nplain,pos\nbad,meh\n',
    )
    spec = _spec(format="csv", text_a="text", label="label", label_list="neg,pos")
    assert spec.quoting is True  # the csv default
    message = _error(spec, path, "line 6")  # the quoted newline spans lines 3-4
    assert "'meh'" in message
    result = read_examples(dataclasses.replace(spec, skip_bad_rows=True), path)
    assert [(e.guid, e.text_a, e.label) for e in result.examples] == [
        ("q.csv:2", "Hello, world", 1),
        ("q.csv:3", 'said "hi"\nthen left', 0),
        ("q.csv:5", "plain", 1),
    ]
    assert result.skipped[0][0] == 6
    # With quoting off the quotes are text and the comma splits the first row.
    off = _spec(format="csv", text_a="text", label="label", label_list="neg,pos", quoting=False)
    _error(off, path, "found 3 comma-separated columns, expected 2")


def test_tsv_quoting_off_keeps_unbalanced_quotes(tmp_path):
    path = _write(tmp_path, "k.tsv", 'a\tb\n"open quote\t1\nclosed"\t2\n')
    spec = _spec(format="tsv", text_a="a", label="b", label_list="")
    assert [e.text_a for e in read_examples(spec, path).examples] == ['"open quote', 'closed"']
    on = _spec(format="tsv", text_a="a", label="b", label_list="", quoting=True)
    assert len(read_examples(on, path).examples) == 1  # the quote swallowed a row


def test_jsonl(tmp_path):
    rows = [
        {"premise": "A", "hypothesis": "B", "label": "entailment"},
        {"premise": "C", "hypothesis": "D", "label": "contradiction"},
    ]
    path = _write(tmp_path, "n.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = _spec(
        format="jsonl",
        text_a="premise",
        text_b="hypothesis",
        label="label",
        label_list="entailment,contradiction",
    )
    result = read_examples(spec, path)
    assert result.examples == [
        TextExample("n.jsonl:1", "A", "B", 0),
        TextExample("n.jsonl:2", "C", "D", 1),
    ]
    bad = _write(tmp_path, "b.jsonl", json.dumps(rows[0]) + '\n{"premise": "E"}\n{oops\n')
    message = _error(spec, bad, "line 2")
    assert "1 of the 3 expected keys" in message and "'hypothesis'" in message
    skipped = read_examples(dataclasses.replace(spec, skip_bad_rows=True), bad).skipped
    assert [row for row, _ in skipped] == [2, 3] and "not valid JSON" in skipped[1][1]
    scores = _write(tmp_path, "s.jsonl", '{"t": "x", "y": 3}\n{"t": "z", "y": "2.5"}\n')
    spec = _spec(format="jsonl", text_a="t", label="y", label_list="")
    assert [e.label for e in read_examples(spec, scores).examples] == [3.0, 2.5]


CONLL = dict(format="conll", label_list="B-PER,I-PER,O")


def test_conll_sentences_prefixes_and_whitespace_breaks(tmp_path):
    path = _write(
        tmp_path,
        "n.conll",
        "en:John\tB-PER\nen:runs\tO\n\t\nen:Mary\tB-PER\n  \n\nen:Sue\tB-PER\n",
    )
    result = read_examples(_spec(**CONLL, token_prefix="en:"), path)
    assert result.examples == [
        TokenExample("n.conll:1", ["John", "runs"], ["B-PER", "O"]),
        TokenExample("n.conll:4", ["Mary"], ["B-PER"]),
        TokenExample("n.conll:7", ["Sue"], ["B-PER"]),
    ]
    spaced = _write(tmp_path, "s.conll", "-DOCSTART- -X- O O\n\nEU NNP B-ORG B-ORG\n")
    spec = _spec(format="conll", token_column=0, tag_column=3)
    assert read_examples(spec, spaced).examples == [TokenExample("s.conll:3", ["EU"], ["B-ORG"])]


def test_conll_line_with_the_wrong_number_of_fields(tmp_path):
    path = _write(tmp_path, "n.conll", "John\tB-PER\n\nMary\tB-PER\textra\n")
    message = _error(_spec(**CONLL), path, "line 3")
    assert "found 3 fields, expected 2" in message


def test_conll_tag_outside_the_label_list_and_empty_tag(tmp_path):
    path = _write(tmp_path, "n.conll", "John\tB-PER\nParis\tB-LOC\n")
    message = _error(_spec(**CONLL), path, "line 2")
    assert "'B-LOC'" in message and "B-PER, I-PER, O" in message
    empty = _write(tmp_path, "e.conll", "John\tB-PER\nruns\t \n")
    _error(_spec(**CONLL), empty, "line 2: the tag is empty")


def test_conll_skip_drops_the_whole_sentence(tmp_path):
    path = _write(tmp_path, "n.conll", "John\tB-PER\nParis\tB-LOC\nx\tO\n\nMary\tB-PER\n")
    result = read_examples(_spec(**CONLL, skip_bad_rows=True), path)
    assert [e.words for e in result.examples] == [["Mary"]]
    assert len(result.skipped) == 1 and result.skipped[0][0] == 2


KLUE = dict(format="klue_ner", label_list="B-PS,I-PS,O")


def _klue(*sentences: str) -> str:
    header = "## 토큰, 레이블 구분자 : \\t\n## 컬럼명 : CHAR\tNE_TAG\n"
    return header + "\n".join(sentences) + "\n"


def test_klue_ner_keeps_spaces_as_characters(tmp_path):
    text = _klue(
        "## s1\t<철수:PS> 왔다\n철\tB-PS\n수\tI-PS\n \tO\n왔\tO\n다\tO\n", "## s2\t가\n가\tO\n"
    )
    result = read_examples(_spec(**KLUE), _write(tmp_path, "k.tsv", text))
    assert [e.guid for e in result.examples] == ["s1", "s2"]
    assert "".join(result.examples[0].words) == "철수 왔다"
    assert result.examples[0].labels == ["B-PS", "I-PS", "O", "O", "O"]


def test_klue_ner_empty_tag_sequence_and_bad_lines(tmp_path):
    empty = _write(
        tmp_path, "e.tsv", _klue("## s1\t가\n가\tO\n", "## s2\t\n", "## s3\t나\n나\tO\n")
    )
    message = _error(_spec(**KLUE), empty, "line 6")  # s2's `## ` line
    assert "no characters" in message
    result = read_examples(_spec(**KLUE, skip_bad_rows=True), empty)
    assert [e.guid for e in result.examples] == ["s1", "s3"] and result.skipped[0][0] == 6
    fields = _write(tmp_path, "f.tsv", _klue("## s1\t가나\n가\tO\t?\n나\tO\n"))
    _error(_spec(**KLUE), fields, "line 4: found 3 tab-separated fields, expected 2")
    wide = _write(tmp_path, "w.tsv", _klue("## s1\t가나\n가나\tO\n"))
    _error(_spec(**KLUE), wide, "is not one character")
    tag = _write(tmp_path, "t.tsv", _klue("## s1\t가\n가\tB-XX\n"))
    _error(_spec(**KLUE), tag, "line 4: tag 'B-XX' is not one of the allowed labels")


def _squad(tmp_path, answers, context="The cat sat on the mat. The cat left.", extra=()):
    qas = [{"id": "q1", "question": "Who sat?", "answers": answers}, *extra]
    data = {"version": "1.1", "data": [{"title": "Cats", "paragraphs": [
        {"context": context, "qas": qas}]}]}  # fmt: skip
    return _write(tmp_path, "squad.json", json.dumps(data))


def test_squad_reads_answers_with_their_starts(tmp_path):
    path = _squad(
        tmp_path, [{"text": "The cat", "answer_start": 0}, {"text": "cat", "answer_start": 28}]
    )
    (example,) = read_examples(_spec(format="squad"), path).examples
    assert example == QAExample(
        "q1", "Who sat?", "The cat sat on the mat. The cat left.", [("The cat", 0), ("cat", 28)]
    )


def test_squad_answer_not_at_its_start_says_where_it_occurs(tmp_path):
    path = _squad(tmp_path, [{"text": "cat", "answer_start": 5}])
    message = _error(_spec(format="squad"), path, "question 1")
    assert "'cat' is not at its answer_start 5" in message and "occurs at 4, 28" in message
    path = _squad(tmp_path, [{"text": "dog", "answer_start": 4}])
    _error(_spec(format="squad"), path, "does not occur anywhere in the context")
    path = _squad(tmp_path, [{"text": "", "answer_start": 4}])
    _error(
        _spec(format="squad"), path, "question 1: (id 'q1', article 'Cats') answer 1 has no text"
    )


def test_squad_skip_counts_questions(tmp_path):
    good = {"id": "q2", "question": "Who left?", "answers": [{"text": "cat", "answer_start": 28}]}
    empty = {"id": "q3", "question": " ", "answers": [{"text": "cat", "answer_start": 4}]}
    path = _squad(tmp_path, [{"text": "mat", "answer_start": 0}], extra=[good, empty])
    result = read_examples(_spec(format="squad", skip_bad_rows=True), path)
    assert [e.qid for e in result.examples] == ["q2"]
    assert [row for row, _ in result.skipped] == [1, 3]
    assert (
        "occurs at 19" in result.skipped[0][1] and "question text is empty" in result.skipped[1][1]
    )
    broken = _write(tmp_path, "broken.json", '{"data": [')
    _error(_spec(format="squad"), broken, "not valid JSON")


# ------------------------------------------------------------------------------ config


def test_from_config_names_the_key_that_is_wrong():
    with pytest.raises(ConfigError, match="data.reader.format is missing"):
        ReaderSpec.from_config({"text_a": "s"})
    with pytest.raises(ConfigError, match="did you mean 'tsv'"):
        ReaderSpec.from_config({"format": "tvs", "text_a": "s"})
    with pytest.raises(
        ConfigError, match="unknown config key data.reader.lable.*did you mean 'label'"
    ):
        ReaderSpec.from_config({"format": "tsv", "text_a": "s", "lable": "y"})
    with pytest.raises(
        ConfigError, match="data.reader.quoting=False does not apply to format 'conll'"
    ):
        ReaderSpec.from_config({"format": "conll", "quoting": False})
    with pytest.raises(ConfigError, match="data.reader.text_a is missing"):
        ReaderSpec.from_config({"format": "tsv", "label": "y"})
    with pytest.raises(ConfigError, match="data.reader.header='no': must be True or False"):
        ReaderSpec.from_config({"format": "tsv", "text_a": "s", "header": "no"})
    with pytest.raises(ConfigError, match="data.reader.text_a='sentence'.*0-based index"):
        ReaderSpec.from_config({"format": "tsv", "text_a": "sentence", "header": False})
    with pytest.raises(ConfigError, match="data.reader.label is empty"):
        ReaderSpec.from_config({"format": "tsv", "text_a": "s", "label_list": "a,b"})
    with pytest.raises(ConfigError, match="distinct"):
        ReaderSpec.from_config({"format": "tsv", "text_a": "s", "label": "y", "label_list": "a,a"})
    with pytest.raises(ConfigError, match="data.reader.encoding"):
        ReaderSpec.from_config({"format": "squad", "encoding": "no-such-codec"})
    assert issubclass(ConfigError, ValueError)


def test_from_config_accepts_a_config_dict_and_unset_keys_of_other_formats():
    config = ml_collections.ConfigDict(
        {"format": "conll", "text_a": "", "token_prefix": "en:", "label_list": "O", "kind": "x"}
    )
    spec = ReaderSpec.from_config(config)
    assert (spec.token_prefix, spec.label_list, spec.quoting) == ("en:", ("O",), False)
    spec = ReaderSpec.from_config({"format": "tsv", "text_a": 3, "header": False})
    assert spec.text_a == "3"


# ------------------------------------------------------------------------------ TFDS


class FlaxbertTasksTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Three sentences with a class label and a score. Not registered: read back by name
    from its data_dir, as a dataset prepared elsewhere would be."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test data."}
    code_path = None  # no checksums file to look for next to this module

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["negative", "positive"]),
                    "score": np.float32,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3), "test": self._generate_examples(2, -1)}

    def _generate_examples(self, n, label=None):
        sentences = ["좋은 영화", "bad film", "fine"]
        for i in range(n):
            yield i, {"sentence": sentences[i], "label": i % 2 if label is None else label,
                      "score": i + 0.5}  # fmt: skip


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.display_progress_bar(False)
    FlaxbertTasksTiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def test_tfds_round_trip(tfds_dir):
    spec = _spec(format="tsv", text_a="sentence", label="label", label_list="negative,positive")
    result = read_tfds("tfds:flaxbert_tasks_tiny:train", spec, data_dir=tfds_dir)
    assert result.path == "tfds:flaxbert_tasks_tiny:train" and result.skipped == []
    assert [(e.text_a, e.text_b, e.label) for e in result.examples] == [
        ("좋은 영화", None, 0),
        ("bad film", None, 1),
        ("fine", None, 0),
    ]
    assert result.examples[0].guid == "tfds:flaxbert_tasks_tiny:train:1"
    assert len(read_tfds("flaxbert_tasks_tiny", spec, data_dir=tfds_dir, limit=2).examples) == 2
    unlabelled = read_tfds("flaxbert_tasks_tiny:test", spec, data_dir=tfds_dir)
    assert [e.label for e in unlabelled.examples] == [None, None]  # label -1
    scores = _spec(format="tsv", text_a="sentence", label="score", label_list="")
    assert [e.label for e in read_tfds("flaxbert_tasks_tiny", scores, tfds_dir).examples] == [
        0.5,
        1.5,
        2.5,
    ]


def test_tfds_errors_say_what_to_do(tfds_dir, tmp_path):
    spec = _spec(format="tsv", text_a="sentence", label="label", label_list="negative,positive")
    with pytest.raises(TaskDataError, match="the splits are train, test"):
        read_tfds("flaxbert_tasks_tiny:validation", spec, data_dir=tfds_dir)
    with pytest.raises(ConfigError, match="no such feature; its features are"):
        read_tfds("flaxbert_tasks_tiny", _spec(format="tsv", text_a="text"), data_dir=tfds_dir)
    with pytest.raises(ConfigError, match="has 2 classes"):
        three = dict(TSV, text_a="sentence", text_b="", label_list="a,b,c")
        read_tfds("flaxbert_tasks_tiny", _spec(**three), data_dir=tfds_dir)
    with pytest.raises(TaskDataError, match="tfds build"):
        read_tfds("flaxbert_tasks_tiny", spec, data_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="must be one of tsv, csv, jsonl"):
        read_tfds("flaxbert_tasks_tiny", _spec(format="squad"), data_dir=tfds_dir)


def test_read_examples_sends_tfds_sources_to_read_tfds(monkeypatch):
    calls = []
    monkeypatch.setattr(task_files, "read_tfds", lambda *a, **k: calls.append((a, k)) or "result")
    spec = _spec(format="tsv", text_a="sentence")
    assert read_examples(spec, "tfds:glue/sst2:validation", limit=5) == "result"
    assert calls == [(("tfds:glue/sst2:validation", spec), {"limit": 5})]
    assert task_tfds.parse_tfds_source("tfds:glue/sst2") == ("glue/sst2", "train")
    assert task_tfds.parse_tfds_source("glue/sst2:train[:10]") == ("glue/sst2", "train[:10]")
