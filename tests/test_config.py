"""Configs: YAML round trip, dotted overrides, and a clear error for every bad input."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from megatron_ki.config import (
    Config,
    ConfigError,
    config_from_dict,
    describe,
    field_docs,
    load_config,
    model_config_from_yaml,
    parse_args,
)

CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs" / "models"


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        CONFIGS / "tiny_llama.yaml",
        ["--ki.enabled", "true", "--ki.teacher_path", "ckpt/teacher", "--train.zero_stage", "2"],
    )
    text = cfg.to_yaml()
    path = tmp_path / "run.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg
    assert again.to_yaml() == text
    assert yaml.safe_load(text)["model"]["family"] == "llama"


def test_teacher_round_trip(tmp_path):
    teacher = model_config_from_yaml(CONFIGS / "tiny_gpt2.yaml")
    cfg = config_from_dict(
        {
            "model": {"family": "gpt2", "vocab_size": 512},
            "ki": {"enabled": True, "teacher": dataclasses.asdict(teacher)},
        }
    )
    assert cfg.ki.teacher == teacher
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_shipped_model_configs_load(name):
    cfg = model_config_from_yaml(CONFIGS / f"{name}.yaml")
    assert cfg.num_parameters() > 0


@pytest.mark.parametrize(
    "name,millions",
    [("roberta_medium", 74), ("roberta_base", 125), ("roberta_base_plus", 211), ("roberta_large", 355)],
)
def test_paper_sizes(name, millions):
    """The KI paper's RoBERTa sizes (KI.md) within 2% (the paper counts an unpadded vocabulary)."""
    cfg = model_config_from_yaml(CONFIGS / f"{name}.yaml")
    assert abs(cfg.num_parameters() / 1e6 - millions) / millions < 0.02


def test_overrides_and_types():
    cfg = load_config(
        None,
        [
            "--model.num_layers",
            "12",
            "--optim.lr=3e-4",
            "--model.num_key_value_heads",
            "null",
            "--data.data_path",
            "0.3",
            "a",
            "0.7",
            "b",
            "--data.tokenizer_model",
            "123",
        ],
    )
    assert cfg.model.num_layers == 12
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.num_key_value_heads is None
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.data.tokenizer_model == "123"  # a string field keeps the text


def test_base_files_merge(tmp_path):
    (tmp_path / "run.yaml").write_text(f"base: {CONFIGS / 'tiny_bert.yaml'}\nmodel:\n  num_layers: 3\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.model.family == "bert" and cfg.model.num_layers == 3 and cfg.model.type_vocab_size == 2
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize(
    "data,key,message",
    [
        ({"model": {"num_layerz": 2}}, "model.num_layerz", "unknown key"),
        ({"modle": {}}, "modle", "unknown key"),
        ({"model": {"num_layers": "two"}}, "model.num_layers", "expected an integer"),
        ({"model": {"num_layers": 2.5}}, "model.num_layers", "expected an integer"),
        ({"model": {"num_layers": True}}, "model.num_layers", "expected an integer"),
        ({"model": {"family": "t5"}}, "model.family", "expected one of"),
        ({"train": {"precision": "fp8"}}, "train.precision", "expected one of"),
        ({"model": {"hidden_size": 65}}, "model.hidden_size", "divisible by model.num_attention_heads"),
        ({"model": {"num_key_value_heads": 3}}, "model.num_key_value_heads", "must divide"),
        ({"model": {"position_offset": 2}}, "model.position_offset", "must be 0 or omitted for family gpt2"),
        ({"model": {"family": "roberta"}}, "model.pad_token_id", "required for family roberta"),
        (
            {"model": {"family": "roberta", "pad_token_id": 4, "position_offset": 2}},
            "model.position_offset",
            r"disagrees with model.pad_token_id=4: RoBERTa positions start at pad_token_id \+ 1 = 5",
        ),
        ({"ki": {"enabled": True}}, "ki.teacher_path", "required"),
        ({"ki": {"temperature": 0}}, "ki.temperature", "must be positive"),
        ({"ki": {"teacher": {"hidden": 3}}}, "ki.teacher.hidden", "unknown key"),
        ({"data": {"split": "a,b"}}, "data.split", "comma-separated"),
        ({"data": {"data_path": [0.5, "a", 0.5]}}, "data.data_path", "odd number"),
        ({"data": {"data_path": ["x", "a"]}}, "data.data_path", "should be a weight"),
        ({"train": {"zero_stage": 3}}, "train.zero_stage", "must be 0, 1 or 2"),
        ({"optim": {"min_lr": 1.0}}, "optim.min_lr", "must be in"),
        ({"parallel": {"tensor_parallel": 0}}, "parallel.tensor_parallel", "must be >= 1"),
        ({"logging": {"log_interval": 0}}, "logging.log_interval", "must be >= 1"),
        ({"model": [1, 2]}, "model", "expected a mapping"),
    ],
)
def test_invalid_values(data, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(data)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize(
    "overrides,world,key,message",
    [
        (
            ["--parallel.tensor_parallel", "3"],
            3,
            "model.num_attention_heads",
            "not divisible by parallel.tensor_parallel=3",
        ),
        (
            ["--model.num_key_value_heads", "2", "--parallel.tensor_parallel", "4"],
            4,
            "model.num_key_value_heads",
            "2 key/value heads are not divisible",
        ),
        (["--parallel.pipeline_parallel", "4"], 4, "parallel.pipeline_parallel", "more than the 2 layers"),
        (
            ["--train.global_batch_size", "6", "--train.micro_batch_size", "2"],
            2,
            "train.global_batch_size",
            "6 is not divisible by train.micro_batch_size x data-parallel size = 2 x 2 = 4",
        ),
        (["--parallel.tensor_parallel", "2"], 3, "parallel.tensor_parallel", "must divide the world size 3"),
        (["--data.seq_length", "4096"], 1, "data.seq_length", "longer than model.max_position_embeddings"),
        (
            [
                "--parallel.sequence_parallel",
                "true",
                "--parallel.tensor_parallel",
                "2",
                "--data.seq_length",
                "63",
            ],
            2,
            "parallel.sequence_parallel",
            "data.seq_length 63 is not divisible by parallel.tensor_parallel 2",
        ),
    ],
)
def test_inconsistent_combinations(overrides, world, key, message):
    cfg = load_config(CONFIGS / "tiny_gpt2.yaml", overrides)
    with pytest.raises(ConfigError, match=message) as info:
        cfg.validate(world)
    assert info.value.key == key


def test_teacher_vocabulary_must_match():
    cfg = config_from_dict(
        {"model": {"vocab_size": 512}, "ki": {"enabled": True, "teacher": {"vocab_size": 500}}}
    )
    with pytest.raises(ConfigError, match="teacher vocabulary 500 differs from the student's 512"):
        cfg.validate(1)


def test_valid_combination_and_accumulation():
    cfg = load_config(
        CONFIGS / "tiny_gpt2.yaml", ["--train.global_batch_size", "16", "--parallel.tensor_parallel", "2"]
    )
    cfg.validate(4)
    assert cfg.gradient_accumulation_steps(4) == 4  # 16 / (2 micro x 2 data-parallel)


def test_cli_errors_and_help(capsys):
    with pytest.raises(ConfigError, match="file not found"):
        parse_args(["--config", "does/not/exist.yaml"])
    with pytest.raises(ConfigError, match="is missing its value"):
        parse_args(["--model.num_layers"])
    with pytest.raises(ConfigError, match="takes one value"):
        parse_args(["--model.num_layers", "1", "2"])
    with pytest.raises(ConfigError, match="dotted key"):
        parse_args(["--layers", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--model.num_layers (int, default 2): Number of transformer blocks." in out


def test_every_field_is_documented():
    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
                pass
        return len(docs)

    from megatron_ki import config as c

    groups = [c.ModelConfig, c.ParallelConfig, c.KIConfig, c.DataConfig, c.OptimConfig, c.TrainConfig]
    groups += [c.CheckpointConfig, c.LoggingConfig, Config]
    assert sum(walk(g) for g in groups) > 60
    assert len(describe()) > 60


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "tiny_bert", "tiny_roberta"])
@pytest.mark.parametrize("tp", [1, 2])
def test_num_parameters_counts_the_built_model(name, tp):
    import torch

    from megatron_ki.models import build_model

    cfg = model_config_from_yaml(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert cfg.num_parameters(tp=1) == built
    assert cfg.num_parameters(tp=tp) >= built


def test_train_for_tokens():
    cfg = load_config(
        None, ["--train.train_tokens", "10000", "--train.global_batch_size", "8", "--data.seq_length", "128"]
    )
    assert cfg.train.train_steps == 10  # ceil(10000 / 1024)
    assert load_config(None, ["--train.train_steps", "7"]).train.train_steps == 7
    with pytest.raises(ConfigError, match="train.train_tokens"):
        load_config(None, ["--train.train_tokens", "0"])


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_teacher_dtype_auto_follows_precision(precision, dtype):
    assert config_from_dict({"train": {"precision": precision}}).ki.teacher_dtype == dtype
    explicit = config_from_dict({"train": {"precision": precision}, "ki": {"teacher_dtype": "float32"}})
    assert explicit.ki.teacher_dtype == "float32"
