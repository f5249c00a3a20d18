import pytest

from flaxbert.config import ConfigError, load_config, override_keys
from flaxbert.model_config import BertConfig
from flaxbert.train import validate_pretrain_config


def _spec(repo_root, arg="tiny"):
    return f"{repo_root / 'configs/pretrain.py'}:{arg}"


@pytest.mark.parametrize(
    "variant,layers,hidden,heads",
    [
        ("tiny", 2, 128, 2),
        ("mini", 4, 256, 4),
        ("small", 4, 512, 8),
        ("medium", 8, 512, 8),
        ("base", 12, 768, 12),
        ("large", 24, 1024, 16),
    ],
)
def test_variants(repo_root, variant, layers, hidden, heads):
    config = load_config(_spec(repo_root, variant))
    model = validate_pretrain_config(config)
    assert isinstance(model, BertConfig)
    assert (model.num_layers, model.hidden_size, model.num_heads) == (layers, hidden, heads)
    assert model.intermediate_size == 4 * hidden


@pytest.mark.parametrize("variant", ["tiny", "mini", "cpu30"])
@pytest.mark.parametrize("corpus", ["ko", "en"])
def test_cpu_sizes_on_a_shared_corpus_stop_within_the_hour(repo_root, variant, corpus):
    """The corpus variants of the CPU sizes are sized for a workstation (about half an hour,
    configs/pretrain.py:CORPUS_STEPS), with evaluations and checkpoints along the way; the
    accelerator sizes keep the paper's scale."""
    config = load_config(_spec(repo_root, f"{variant},corpus={corpus}"))
    assert 1000 <= config.train.num_steps <= 6000
    assert 0 < config.eval.every_steps < config.train.num_steps
    assert 0 < config.checkpoint.every_steps < config.train.num_steps
    assert load_config(_spec(repo_root, f"base,corpus={corpus}")).train.num_steps == 100_000


def test_override_keys_are_what_the_command_line_names():
    overrides = ["--config.model.hidden_size=64", "--config.train.num_steps", "5"]
    assert override_keys(overrides) == {"model.hidden_size", "train.num_steps"}


def test_required_keys_exist(repo_root):
    c = load_config(_spec(repo_root))
    for key in (
        "data.corpus",
        "data.max_seq_length",
        "data.max_predictions_per_seq",
        "data.masked_lm_prob",
        "train.num_steps",
        "train.batch_size",
        "train.learning_rate",
        "train.warmup_steps",
        "train.optimizer",
        "train.grad_accum_steps",
        "train.seed",
        "train.log_every",
        "eval.every_steps",
        "parallel.strategy",
        "parallel.data",
        "parallel.fsdp",
        "parallel.tensor",
        "checkpoint.every_steps",
        "checkpoint.keep",
    ):
        group, name = key.split(".")
        assert name in c[group], key


def test_overrides_keep_types(repo_root):
    c = load_config(
        _spec(repo_root),
        [
            "--config.train.learning_rate=3e-4",
            "--config.train.num_steps",
            "7",
            "--config.model.dtype=bfloat16",
            "--config.data.corpus=foo.txt",
        ],
    )
    assert c.train.learning_rate == 3e-4 and c.train.num_steps == 7
    assert c.model.dtype == "bfloat16" and c.data.corpus == "foo.txt"


def test_unknown_key_is_named_with_the_closest_valid_key(repo_root):
    with pytest.raises(ConfigError) as e:
        load_config(_spec(repo_root), ["--config.train.lerning_rate=3e-4"])
    assert "train.lerning_rate" in str(e.value) and "train.learning_rate" in str(e.value)
    with pytest.raises(ConfigError, match="traim.num_steps.*train.num_steps"):
        load_config(_spec(repo_root), ["--config.traim.num_steps=3"])


def test_wrong_type_is_named(repo_root):
    with pytest.raises(ConfigError, match="train.num_steps"):
        load_config(_spec(repo_root), ["--config.train.num_steps=1.5"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(_spec(repo_root), ["--config.train.batch_size=lots"])


def test_config_is_locked(repo_root):
    c = load_config(_spec(repo_root))
    with pytest.raises(AttributeError):
        c.train.new_key = 1


def test_bad_values_are_named_before_work_starts(repo_root):
    bad = {
        "--config.model.num_heads=3": "model.hidden_size",
        "--config.train.grad_accum_steps=5": "train.batch_size",
        "--config.train.optimizer=sgd": "train.optimizer",
        "--config.data.max_seq_length=1024": "data.max_seq_length",
        "--config.train.lr_decay=cosine": "train.lr_decay",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_pretrain_config(load_config(_spec(repo_root), [override]))


def test_bad_file_and_variant(repo_root, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        load_config(_spec(repo_root, "huge"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(str(empty))
