import itertools
import json
import pathlib
import pickle
import sys

import pytest
import tensorflow_datasets as tfds
from shared_data import DATA, EN_CORPUS, KO_CORPUS, needs_data  # noqa: F401

from flaxbert.data.sentences import split_sentences
from flaxbert.data.text import (
    iter_corpus_documents,
    read_jsonl_documents,
    read_text_documents,
    read_tfds_documents,
)
from flaxbert.data.text_io import CorpusError, ReadStats


def _head(path: pathlib.Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in itertools.islice(f, n)]


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            'Mr. Woodhouse was ill. He said so. "Go!" she cried. "Why?" he asked.',
            ["Mr. Woodhouse was ill.", "He said so.", '"Go!" she cried.', '"Why?" he asked.'],
        ),
        (
            "J. R. R. Tolkien wrote it, e.g. The Hobbit, i.e. A book. Pi is 3.14 and "
            "more. 42 people agree.",
            [
                "J. R. R. Tolkien wrote it, e.g. The Hobbit, i.e. A book.",
                "Pi is 3.14 and more.",
                "42 people agree.",
            ],
        ),
        (
            "I saw Dr. Smith at St. Paul's, vs. Mrs. Jones etc. It rained. So did I. Then",
            ["I saw Dr. Smith at St. Paul's, vs. Mrs. Jones etc. It rained.", "So did I.", "Then"],
        ),
        (
            "It was cheap… Then he left! (It was late.) “Really?” “Yes.” 'Fine.' The end",
            [
                "It was cheap…",
                "Then he left!",
                "(It was late.)",
                "“Really?”",
                "“Yes.”",
                "'Fine.'",
                "The end",
            ],
        ),
        ('"Where?" he asked. "Here," she said.', ['"Where?" he asked.', '"Here," she said.']),
        ("1. First point. 2. Second point.", ["1. First point.", "2. Second point."]),
        (
            "He paid $3.50 at 5 p.m. on the U.S. coast.",
            ["He paid $3.50 at 5 p.m. on the U.S. coast."],
        ),
        ("Wait... what? no.", ["Wait... what? no."]),  # lower case next: not a new sentence
        ("  spaced \t out  ", ["spaced out"]),
        ("", []),
        (" \t ", []),
    ],
)
def test_split_sentences_english(line, expected):
    assert split_sentences(line) == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        # Real NSMC lines.
        ("다른영화가 기억이 나질 않을 정도로...♥", ["다른영화가 기억이 나질 않을 정도로...♥"]),
        (
            "감동적임. 아마 건축학개론에 상당한 영감을",
            ["감동적임.", "아마 건축학개론에 상당한 영감을"],
        ),
        (
            "와진짜 지금의 저한테 딱맞는영화.. 대학여름방학에 고향에 오니까 먼가 과거에 멈춰서 "
            "있는느낌?? 방학동안 발전이 없는 느낌??",
            [
                "와진짜 지금의 저한테 딱맞는영화..",
                "대학여름방학에 고향에 오니까 먼가 과거에 멈춰서 있는느낌??",
                "방학동안 발전이 없는 느낌??",
            ],
        ),
        # Endings without punctuation; "오니까" (because) and "생각보다" (than) are no ending.
        ("정말 재밌다 또 보고 싶다", ["정말 재밌다", "또 보고 싶다"]),
        (
            "생각보다 재밌네요 배우들 연기가 좋아요 추천합니다",
            ["생각보다 재밌네요", "배우들 연기가 좋아요", "추천합니다"],
        ),
        ("왜 이렇게 평점이 낮을까 이해가 안된다", ["왜 이렇게 평점이 낮을까", "이해가 안된다"]),
        ("그렇죠 역시 명작", ["그렇죠", "역시 명작"]),
        # Not endings: 다 "all", 필요 "need", 엄마네 "mom's", 할까 말까, 하다 보니.
        ("다 알고 봐서 감동 반감", ["다 알고 봐서 감동 반감"]),
        ("필요 없는 장면이 많다 그래도 볼만함", ["필요 없는 장면이 많다", "그래도 볼만함"]),
        ("엄마네 집에서 봤는데 좋네 강추", ["엄마네 집에서 봤는데 좋네", "강추"]),
        ("볼까 말까 고민했는데 잘봤다~~ 최고", ["볼까 말까 고민했는데 잘봤다~~", "최고"]),
        ("하다 보니 끝까지 봤다", ["하다 보니 끝까지 봤다"]),
        # Laughter, tears and emoticons stay with the sentence before them.
        ("ㅋㅋㅋ 진짜 웃기다ㅋㅋㅋ 또 보고싶다", ["ㅋㅋㅋ 진짜 웃기다ㅋㅋㅋ", "또 보고싶다"]),
        ("정말... ^^ 다음에 또 볼게요", ["정말... ^^", "다음에 또 볼게요"]),
        ("슬프다 ㅠㅠ 눈물이 났다", ["슬프다 ㅠㅠ", "눈물이 났다"]),
        ("좋다 !!! 다음 편도", ["좋다 !!!", "다음 편도"]),
        ("최고! ost 도 좋고", ["최고!", "ost 도 좋고"]),  # Korean: any next word after "!"
        ("영화.ㅡ제작한 여러분", ["영화.ㅡ제작한 여러분"]),  # never inside a word
    ],
)
def test_split_sentences_korean(line, expected):
    assert split_sentences(line) == expected


@needs_data
def test_split_sentences_keeps_every_character_of_real_lines():
    for path, lines, min_ratio in [(KO_CORPUS, 600, 1.2), (EN_CORPUS, 300, 1.5)]:
        total = 0
        for line in _head(path, lines):
            sentences = split_sentences(line)
            assert " ".join(sentences) == " ".join(line.split()), line
            assert all(s and s == s.strip() and "  " not in s for s in sentences), line
            total += len(sentences)
        nonblank = sum(1 for line in _head(path, lines) if line.strip())
        ratio = total / nonblank
        print(f"{path.name}: {ratio:.2f} sentences per line")
        assert ratio >= min_ratio  # lines hold several sentences: they are being split


def _write(path: pathlib.Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_read_text_documents_structure(tmp_path):
    text = (
        "\ufeffFirst doc. Two sentences.  \r\n"
        "Second line\r\n"
        "\r\n"
        "   \n"
        "\n"
        "Doc two.\t\n"
        "\n"
        "첫 문장이다 둘째 문장이다"  # no newline at the end of the file
    )
    path = _write(tmp_path / "c.txt", text.encode("utf-8"))
    stats = ReadStats()
    docs = list(read_text_documents(path, stats=stats))
    assert docs == [
        ["First doc.", "Two sentences.", "Second line"],
        ["Doc two."],
        ["첫 문장이다", "둘째 문장이다"],
    ]
    assert (stats.documents, stats.lines, stats.sentences) == (3, 4, 6)
    assert stats.characters == sum(len(s) for d in docs for s in d)
    assert not stats.dropped
    assert "3 documents, 4 lines, 6 sentences" in stats.summary()


def test_non_utf8_error_names_file_line_and_offset(tmp_path):
    lines = [b"good line.\n", b"also good.\n", b"bad \xff byte and \xe3\x81 cut.\n", b"ok\n"]
    path = _write(tmp_path / "latin.txt", b"".join(lines))
    with pytest.raises(ValueError) as e:
        list(read_text_documents(path))
    message = str(e.value)
    assert f"{path}:3:" in message
    assert f"byte offset {len(lines[0]) + len(lines[1]) + 4}" in message
    assert "errors='replace'" in message and "--errors" not in message
    # Each caller is told the fix in its own terms, and the error survives pickling (it may
    # come from a `flaxbert prepare` worker process).
    assert isinstance(e.value, CorpusError)
    assert "pass --errors replace" in str(e.value.spelled("flags"))
    assert "set --config.data.errors=replace" in str(e.value.spelled("config"))
    again = pickle.loads(pickle.dumps(e.value.spelled("flags")))
    assert type(again) is CorpusError and str(again) == str(e.value.spelled("flags"))

    stats = ReadStats()
    docs = list(read_text_documents(path, errors="replace", stats=stats))
    assert docs == [["good line.", "also good.", "bad \ufffd byte and \ufffd cut.", "ok"]]
    assert stats.dropped["undecodable bytes replaced"] == 2
    assert "undecodable bytes replaced" in stats.summary()
    with pytest.raises(ValueError, match="errors='ignore'"):
        list(read_text_documents(path, errors="ignore"))


def test_over_long_lines_are_split_at_whitespace(tmp_path):
    # Longer than the reader's 64 KiB chunks, with 3-byte characters across chunk borders.
    words = [f"단어{i}" for i in range(40_000)]
    long_line = " ".join(words)
    no_space = "가" * 2500
    path = _write(tmp_path / "long.txt", f"{long_line}\n{no_space}\nshort\n".encode())
    stats = ReadStats()
    (doc,) = list(read_text_documents(path, max_line_chars=1000, stats=stats))
    assert all(len(s) <= 1000 for s in doc)
    assert doc[-4:] == ["가" * 1000, "가" * 1000, "가" * 500, "short"]  # no space: cut anyway
    assert " ".join(doc[:-4]) == long_line
    assert stats.dropped["over-long line split"] == 2
    assert stats.lines == 3


def test_read_jsonl_documents(tmp_path):
    records = [
        {"text": "One. Two.\n\nThree", "id": 1},
        {"text": ["List line.", "첫째다 둘째다"]},
        {"text": ""},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path = _write(tmp_path / "c.jsonl", ("\n".join(lines[:2]) + "\n\n" + lines[2]).encode())
    stats = ReadStats()
    docs = list(read_jsonl_documents(path, stats=stats))
    assert docs == [["One.", "Two.", "Three"], ["List line.", "첫째다", "둘째다"]]
    assert stats.documents == 2 and stats.dropped["empty document"] == 1

    other = _write(tmp_path / "o.jsonl", b'{"body": "x"}\n{"text": "fine"}\n')
    with pytest.raises(ValueError) as e:
        list(read_jsonl_documents(other))
    assert f"{other}:1:" in str(e.value) and "'text'" in str(e.value)
    assert "['body']" in str(e.value) and "on_bad_record='skip'" in str(e.value)
    # Neither the flags nor the pre-training config offer on_bad_record: not suggested there.
    assert "pass --text-field NAME" in str(e.value.spelled("flags"))
    config_message = str(e.value.spelled("config"))
    assert "set --config.data.text_field=NAME" in config_message
    assert "on_bad_record" not in config_message and "skip" not in config_message
    stats = ReadStats()
    assert list(
        read_jsonl_documents(other, text_field="body", on_bad_record="skip", stats=stats)
    ) == [["x"]]
    assert stats.dropped == {"record without field 'body' skipped": 1}

    broken = _write(tmp_path / "b.jsonl", b'{"text": "a."}\n{"text": \n[1]\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: bad JSON"):
        list(read_jsonl_documents(broken))
    stats = ReadStats()
    assert list(read_jsonl_documents(broken, on_bad_record="skip", stats=stats)) == [["a."]]
    assert sum(stats.dropped.values()) == 3


class FlaxbertTinyTextCorpus(tfds.core.GeneratorBasedBuilder):
    """A local TFDS dataset with a text feature, registered by defining it."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"title": tfds.features.Text(), "text": tfds.features.Text()}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3), "validation": self._generate_examples(1)}

    def _generate_examples(self, n):
        for i in range(n):
            text = f"Article {i} starts. It goes on.\n\n둘째 문단이다 끝이다\n"
            yield i, {"title": f"t{i}", "text": text}


def test_read_tfds_documents_with_a_local_builder(tmp_path):
    stats = ReadStats()
    docs = list(read_tfds_documents("flaxbert_tiny_text_corpus", data_dir=tmp_path, stats=stats))
    assert sorted(docs) == [
        [f"Article {i} starts.", "It goes on.", "둘째 문단이다", "끝이다"] for i in range(3)
    ]
    assert stats.documents == 3 and stats.lines == 6
    assert (tmp_path / "flaxbert_tiny_text_corpus" / "1.0.0").is_dir()
    assert any(
        p.name.endswith("-00000-of-00001") and "array_record" in p.name
        for p in (tmp_path / "flaxbert_tiny_text_corpus" / "1.0.0").iterdir()
    )

    # Already prepared: read again through a spec, another split and feature.
    docs = list(
        iter_corpus_documents(
            "tfds:flaxbert_tiny_text_corpus:validation", text_field="title", data_dir=tmp_path
        )
    )
    assert docs == [["t0"]]
    with pytest.raises(ValueError, match="no feature 'body'.*'text', 'title'"):
        list(
            read_tfds_documents("flaxbert_tiny_text_corpus", text_feature="body", data_dir=tmp_path)
        )
    with pytest.raises(ValueError, match="no split 'test'"):
        list(read_tfds_documents("flaxbert_tiny_text_corpus", split="test", data_dir=tmp_path))
    assert "tensorflow" not in sys.modules  # array_record random access, no TensorFlow


def test_iter_corpus_documents_dispatch(tmp_path):
    _write(tmp_path / "b.txt", b"Second file. Yes.\n")
    _write(tmp_path / "a.txt", b"First file.\n\nAnother doc.\n")
    _write(tmp_path / "c.jsonl", b'{"text": "From json."}\n')
    stats = ReadStats()
    docs = list(iter_corpus_documents(str(tmp_path / "*"), stats=stats))
    assert docs == [["First file."], ["Another doc."], ["Second file.", "Yes."], ["From json."]]
    assert stats.documents == 4
    assert list(iter_corpus_documents(str(tmp_path / "b.txt"))) == [["Second file.", "Yes."]]

    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
        list(iter_corpus_documents(pattern))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_corpus_documents(str(tmp_path / "missing.txt")))

    blank = _write(tmp_path / "blank.txt", b"\n  \n\n")
    with pytest.raises(ValueError, match="blank.txt.*no documents"):
        list(iter_corpus_documents(blank))
    empty = _write(tmp_path / "empty.jsonl", b"")
    with pytest.raises(ValueError, match="empty.jsonl.*no documents"):
        list(iter_corpus_documents(empty))
