"""A user's mistake ends in one line on stderr and exit status 2, through the real CLI.

Each case runs `python -m flaxbert.cli ...` on tiny inputs written here and checks: status 2,
no traceback, exactly one `flaxbert COMMAND: error:` line saying what the case expects,
every config key the line names exists in the command's config, every `--flag` it names
exists for the command (or for a `flaxbert OTHER` command it names), and the workdir is
left as it was (or holds only the reusable data cache).
"""

import json
import os
import random
import re

import pytest
from cli_test import _run as run_cli

from flaxbert.cli import build_parser
from flaxbert.config import flat_keys, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "configs/pretrain.py:tiny"
FINETUNE = "configs/finetune.py:sst2,tiny"
VOCAB = 400  # the smallest SentencePiece size that fits the tiny corpus's characters

# Config keys in a message: data.x, train.x, data.reader.x ... (not file names such as
# /tmp/train.tsv, hence nothing before them but a space, a quote or a bracket).
_KEY = re.compile(r"(?<![\w/.\-])((?:data|train|model|eval|checkpoint|parallel)(?:\.\w+)+)")
_TOP_KEY = re.compile(r"config key (\w+)=")
_FLAG = re.compile(r"(?<![\w\-])(--[a-z][\w\-]*(?:\.[\w.]+)?)")
_COMMAND = re.compile(r"\bflaxbert ([a-z][\w\-]*)")


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(n)]


def _documents(n: int) -> list[str]:
    rng = random.Random(0)
    words = _words(rng, 300)
    docs = []
    for _ in range(n):
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + "."
            for _ in range(rng.randint(2, 5))
        ]
        docs.append("\n".join(sentences))
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny corpora, task files and a SentencePiece model; paths by name."""
    from flaxbert.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("inputs")
    docs = _documents(40)
    files = {
        "good.txt": "\n\n".join(docs) + "\n",
        "three.txt": "\n\n".join(docs[:3]) + "\n",
        "empty.txt": "\n\n   \n",
        "body.jsonl": "".join(json.dumps({"body": d}) + "\n" for d in docs[:5]),
        "tr_ok.tsv": "sentence\tlabel\nhello world\t0\ngood day\t1\n",
        "tr_label.tsv": "sentence\tlabel\nhello world\t0\ngood day\t1\nbad one\t2\n",
        "tr_column.tsv": "sentence\tlabel\nhello world\t0\ngood day\n",
        "tr_header.tsv": "sentence\tscore\nhello world\t0\n",
        "tr_empty.tsv": "",
    }
    paths = {}
    for name, text in files.items():
        paths[name] = str(root / name)
        (root / name).write_text(text, encoding="utf-8")
    for name, raw in {
        "latin.txt": ("\n\n".join(docs[:5]) + "\nbad \xff byte.\n").encode("latin-1"),
        "tr_latin.tsv": b"sentence\tlabel\nhello w\xf6rld\t0\n",
    }.items():
        paths[name] = str(root / name)
        (root / name).write_bytes(raw)
    paths["missing.txt"] = str(root / "missing.txt")
    paths["sp.model"] = train_tokenizer([paths["good.txt"]], VOCAB, str(root / "sp"))
    sweep = root / "sweep_config.py"
    sweep.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ft', {REPO + '/configs/finetune.py'!r})\n"
        "finetune = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(finetune)\n\n\n"
        "def get_config(arg='sst2,tiny'):\n    return finetune.get_config(arg or 'sst2,tiny')\n\n\n"
        "def get_sweep(arg=''):\n    return [{'train.seed': 0}, {'train.seed': 1}]\n"
    )
    paths["sweep.py"] = str(sweep)
    return paths


def _pretrain(*overrides, config=PRETRAIN):
    return [
        "pretrain",
        "--config",
        config,
        f"--config.data.vocab_size={VOCAB}",
        f"--config.model.vocab_size={VOCAB}",
        *overrides,
    ]


def _finetune(train_file, *overrides):
    return [
        "finetune",
        "--config",
        FINETUNE,
        "--config.data.train_file={" + train_file + "}",
        "--config.data.eval_file={tr_ok.tsv}",
        "--config.data.tokenizer={sp.model}",
        *overrides,
    ]


# (id, argv with {file} placeholders, text the error line must hold). pretrain and finetune
# get --workdir WORKDIR (a fresh path) added.
CASES = [
    ("pretrain-missing-corpus", _pretrain("--config.data.corpus={missing.txt}"), "no such"),
    ("pretrain-empty-corpus", _pretrain("--config.data.corpus={empty.txt}"), "no documents"),
    (
        "pretrain-non-utf8",
        _pretrain("--config.data.corpus={latin.txt}"),
        "--config.data.errors=replace",
    ),
    (
        "pretrain-jsonl-without-text-field",
        _pretrain("--config.data.corpus={body.jsonl}"),
        "--config.data.text_field=",
    ),
    (
        "pretrain-unknown-corpus-name",
        _pretrain(config=PRETRAIN + ",corpus=no_such_corpus_name"),
        "'no_such_corpus_name' is neither a shared corpus name (ko, en)",
    ),
    (
        "pretrain-too-few-documents",
        _pretrain("--config.data.corpus={three.txt}", "--config.data.tokenizer={sp.model}"),
        "at least 4",
    ),
    (
        "pretrain-vocabulary-too-large-for-corpus",
        _pretrain("--config.data.corpus={three.txt}"),
        "set a smaller data.vocab_size",
    ),
    (
        "pretrain-no-validation-split",
        _pretrain("--config.data.corpus={good.txt}", "--config.data.validation_fraction=0"),
        "data.validation_fraction",
    ),
    (
        "pretrain-bad-errors-mode",
        _pretrain("--config.data.corpus={good.txt}", "--config.data.errors=ignore"),
        "data.errors",
    ),
    ("finetune-label-outside-list", _finetune("tr_label.tsv"), "data.reader.label_list"),
    ("finetune-row-missing-column", _finetune("tr_column.tsv"), "data.reader.skip_bad_rows"),
    ("finetune-header-without-label", _finetune("tr_header.tsv"), "(data.reader.label)"),
    ("finetune-non-utf8", _finetune("tr_latin.tsv"), "data.reader.encoding"),
    ("finetune-empty-file", _finetune("tr_empty.tsv"), "the file is empty"),
    (
        "finetune-missing-tokenizer",
        _finetune("tr_ok.tsv", "--config.data.tokenizer={missing.txt}"),
        "data.tokenizer",
    ),
    (
        "prepare-non-utf8-in-a-worker",
        ["prepare", "--corpus", "{latin.txt}", "--tokenizer", "{sp.model}"]
        + ["--output", "WORKDIR", "--num-workers", "2"],
        "--errors replace",
    ),
    (
        "prepare-missing-corpus",
        ["prepare", "--corpus", "{missing.txt}", "--tokenizer", "{sp.model}"]
        + ["--output", "WORKDIR"],
        "no such corpus file",
    ),
    (
        "train-tokenizer-non-utf8",
        ["train-tokenizer", "--input", "{latin.txt}", "--vocab-size", str(VOCAB)]
        + ["--output", "WORKDIR/sp"],
        "--errors replace",
    ),
    (
        "sweep-missing-init-from",
        ["sweep", "--config", "{sweep.py}", "--workdir", "WORKDIR"]
        + ["--config.init_from={missing.txt}"],
        "init_from",
    ),
    (
        "sweep-unknown-metric",
        ["sweep", "--config", "{sweep.py}", "--workdir", "WORKDIR", "--metric", "accuracy"],
        "--metric 'accuracy'",
    ),
    (
        "extract-features-negative-layers",
        ["extract-features", "--workdir", "WORKDIR", "--input", "{good.txt}"]
        + ["--output", "{missing.txt}", "--layers", "-1,-2"],
        "no flaxbert checkpoint",
    ),
]


def _run(argv):
    return run_cli(argv, cwd=REPO, timeout=240, fast_compiles=True)


def _fill(argv, data, workdir="") -> list[str]:
    """{name} → the path of that input; WORKDIR → `workdir`."""
    return [
        re.sub(r"\{([\w.]+)\}", lambda m: data[m.group(1)], a.replace("WORKDIR", str(workdir)))
        for a in argv
    ]


_PARSERS = {}


def _flags(command: str) -> set[str]:
    if not _PARSERS:
        parser = build_parser()
        (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        _PARSERS.update(sub.choices)
    return set(_PARSERS[command]._option_string_actions)


_KEYS = {}


def _config_keys(command: str) -> set[str]:
    spec = {"pretrain": PRETRAIN, "finetune": FINETUNE}.get(command, FINETUNE)
    if spec not in _KEYS:
        _KEYS[spec] = set(flat_keys(load_config(os.path.join(REPO, spec))))
    return _KEYS[spec]


def assert_names_only_real_keys_and_flags(command: str, line: str) -> None:
    """Every config key and flag the message names exists for the command it concerns."""
    keys = _config_keys(command)
    named = set(_KEY.findall(line)) | set(_TOP_KEY.findall(line))
    flags = set(_FLAG.findall(line))
    named |= {f[len("--config.") :] for f in flags if f.startswith("--config.")}
    assert named <= keys, f"{sorted(named - keys)} are no config keys: {line}"
    allowed = _flags(command)
    for other in _COMMAND.findall(line):
        if other in _PARSERS:
            allowed |= _flags(other)
    plain = {f for f in flags if not f.startswith("--config.")}
    assert plain <= allowed, f"{sorted(plain - allowed)} are no {command} flags: {line}"


def assert_one_clean_error(result, command: str, expected: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "RemoteTraceback" not in out, out[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith(f"flaxbert {command}: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "usage:" not in result.stderr, result.stderr  # not argparse refusing the flags
    assert expected in lines[0], lines[0]
    assert_names_only_real_keys_and_flags(command, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_status_2(data, tmp_path, argv, expected):
    workdir = tmp_path / "w"
    argv = _fill(argv, data, workdir)
    command = argv[0]
    if command in ("pretrain", "finetune"):
        argv += ["--workdir", str(workdir)]
    assert_one_clean_error(_run(argv), command, expected)
    if command != "train-tokenizer":  # nothing half-made: no workdir, prepared data, scratch
        assert not workdir.exists(), sorted(os.listdir(workdir))


def test_failed_finetune_leaves_an_existing_workdir_as_it_was(data, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"old": true}\n')
    (workdir / "notes.txt").write_text("mine\n")
    argv = _fill(_finetune("tr_label.tsv"), data)
    assert_one_clean_error(_run([*argv, "--workdir", str(workdir)]), "finetune", "label '2'")
    assert sorted(os.listdir(workdir)) == ["config.json", "notes.txt"]
    assert (workdir / "config.json").read_text() == '{"old": true}\n'


def test_pretrain_cache_follows_the_split_and_reading_options(data, tmp_path):
    """Other data.validation_fraction on the same corpus and cache: its own prepared copy,
    not a refusal. Both runs stop at the model's vocabulary check, after the data."""
    cache = tmp_path / "cache"
    names = []
    for fraction in ("0.2", "0.3"):
        argv = _fill(
            _pretrain(
                "--config.data.corpus={good.txt}",
                f"--config.data.cache_dir={cache}",
                f"--config.data.validation_fraction={fraction}",
                "--config.model.vocab_size=401",
            ),
            data,
        )
        result = _run([*argv, "--workdir", str(tmp_path / f"w{fraction}")])
        assert_one_clean_error(result, "pretrain", "model.vocab_size=401")
        names.append(sorted(n for n in os.listdir(cache) if "-prepared-" in n))
        assert not (tmp_path / f"w{fraction}").exists()
    assert len(names[0]) == 1 and len(names[1]) == 2
    for name in names[1]:
        summary = json.loads((cache / name / "summary.json").read_text())
        assert summary["splits"]["validation"]["documents"] >= 2
    fractions = sorted(
        json.loads((cache / n / "summary.json").read_text())["options"]["validation_fraction"]
        for n in names[1]
    )
    assert fractions == [0.2, 0.3]


def test_sweep_summary_refuses_an_unknown_metric_and_keeps_its_figure(data, tmp_path):
    root = tmp_path / "sweep"
    argv = ["sweep", "--config", data["sweep.py"], "--workdir", str(root), "--emit", "slurm"]
    assert _run(argv).returncode == 0
    assert _run(["sweep-summary", str(root)]).returncode == 0
    figure = (root / "summary.png").read_bytes()
    result = _run(["sweep-summary", str(root), "--metric", "eval/no_such_metric"])
    line = assert_one_clean_error(result, "sweep-summary", "eval/no_such_metric")
    assert "no point" in line
    assert (root / "summary.png").read_bytes() == figure


def test_a_mistake_found_after_a_checkpoint_keeps_the_training(tmp_path):
    from flaxbert.cli import nothing_half_made
    from flaxbert.config import ConfigError

    fresh, trained = tmp_path / "fresh", tmp_path / "trained"
    for workdir, step in ((fresh, None), (trained, "5")):
        with pytest.raises(ConfigError), nothing_half_made(str(workdir), keep=("data",)):
            (workdir / "checkpoints").mkdir(parents=True)
            (workdir / "metrics.jsonl").write_text("{}\n")
            if step:
                (workdir / "checkpoints" / step).mkdir()
            raise ConfigError("config key data.test_file='x': no such file")
    assert not fresh.exists()
    assert sorted(os.listdir(trained)) == ["checkpoints", "metrics.jsonl"]
    assert os.listdir(trained / "checkpoints") == ["5"]
