"""Config system: shipped recipes, overrides, key/type errors, cross-field rules, round trip."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megatron_fipo.config import (
    AlgorithmConfig,
    ConfigError,
    FipoConfig,
    OptimizerConfig,
    ParallelismConfig,
    check_model_checkpoint,
    load_config,
    save_config,
    to_dict,
    to_yaml,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "tiny-cpu.yaml"
BIG = CONFIGS / "qwen2.5-32b-fipo.yaml"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_the_named_recipes_are_shipped():
    names = {path.name for path in SHIPPED}
    expected = {
        "qwen2.5-32b-fipo.yaml",
        "qwen2.5-32b-dapo.yaml",
        "qwen2.5-7b-fipo.yaml",
        "tiny-cpu.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_every_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert config.validate_layout() >= 1
    saved = tmp_path / "resolved.yaml"
    save_config(config, saved)
    again = load_config(saved)
    assert again == config
    assert to_dict(again) == to_dict(config)


def test_32b_recipe_has_every_number_of_the_spec():
    config = load_config(BIG)
    algo, rollout, data, opt = config.algorithm, config.rollout, config.data, config.optimizer
    assert (algo.mode, algo.clip_ratio_low, algo.clip_ratio_high, algo.clip_ratio_c) == (
        "fipo",
        0.2,
        0.28,
        10.0,
    )
    assert (algo.decay_rate, algo.fipo_clip_ratio, algo.fipo_clip_high_only) == (32, 0.2, True)
    assert algo.safety_thresh == 10.0 and algo.entropy_coeff == 0 and not algo.use_kl_loss
    assert (
        algo.overlong_buffer.enable,
        algo.overlong_buffer.len,
        algo.overlong_buffer.penalty_factor,
    ) == (True, 4096, 1.0)
    assert algo.dynamic_sampling.enable and algo.dynamic_sampling.max_num_gen_batches == 10
    assert (data.train_batch_size, data.ppo_mini_batch_size, algo.ppo_epochs) == (512, 64, 1)
    assert (rollout.n_samples_per_prompt, rollout.temperature, rollout.top_p) == (16, 1.0, 1.0)
    assert (rollout.max_prompt_length, rollout.max_response_length) == (2048, 20480)
    assert (opt.lr, opt.lr_warmup_steps, opt.weight_decay, opt.clip_grad) == (1e-6, 10, 0.1, 1.0)
    assert (config.trainer.nnodes, config.trainer.gpus_per_node) == (16, 8)
    assert (rollout.eval_sampling.n_samples_per_prompt, rollout.eval_sampling.top_p) == (32, 0.7)
    assert config.parallelism.sequence_parallel and config.parallelism.use_distributed_optimizer
    assert config.model.dtype == "bfloat16"
    assert abs(algo.gamma**32 - 0.5) < 1e-12


def test_dapo_baseline_differs_from_fipo_only_in_mode_and_names():
    fipo = to_dict(load_config(BIG))
    dapo = to_dict(load_config(CONFIGS / "qwen2.5-32b-dapo.yaml"))
    assert dapo["algorithm"]["mode"] == "dapo"
    for tree in (fipo, dapo):
        del (
            tree["algorithm"]["mode"],
            tree["trainer"]["output_dir"],
            tree["logging"]["experiment_name"],
        )
    assert fipo == dapo


def test_overrides_nested_list_bool_none_float_and_string():
    config = load_config(
        TINY,
        [
            "algorithm.overlong_buffer.len=8",
            "data.train_files=[a.parquet, b.jsonl]",
            "algorithm.fipo_clip_high_only=false",
            "trainer.save_freq=null",
            "trainer.eval_freq=None",
            "optimizer.lr=3e-5",
            "logging.experiment_name=2024",
            "model.tokenizer_path=",
            "algorithm.mode=dapo",
        ],
    )
    assert config.algorithm.overlong_buffer.len == 8
    assert config.data.train_files == ["a.parquet", "b.jsonl"]
    assert config.algorithm.fipo_clip_high_only is False
    assert config.trainer.save_freq is None and config.trainer.eval_freq is None
    assert config.optimizer.lr == 3e-5 and isinstance(config.optimizer.lr, float)
    assert config.logging.experiment_name == "2024"
    assert config.model.tokenizer_path is None
    assert config.algorithm.mode == "dapo"


def test_override_builds_a_section_that_is_null_in_the_file(tmp_path):
    path = tmp_path / "no-arch.yaml"
    path.write_text(
        BIG.read_text().replace("  architecture:\n", "  architecture: null\n  _drop:\n")
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'model\._drop'"):
        load_config(path)
    arch = ["vocab_size=1000", "hidden_size=64", "intermediate_size=128", "num_hidden_layers=2"]
    arch += ["num_attention_heads=8", "num_key_value_heads=8", "max_position_embeddings=32768"]
    config = load_config(
        TINY, ["model.architecture=null"] + [f"model.architecture.{a}" for a in arch]
    )
    assert config.model.architecture.vocab_size == 1000
    assert config.model.architecture.rope_theta == 1000000.0  # default, not tiny-cpu's 10000
    merged = load_config(TINY, ["model.architecture={hidden_size: 256, num_attention_heads: 8}"])
    assert (
        merged.model.architecture.hidden_size == 256 and merged.model.architecture.vocab_size == 512
    )


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (
            "algorithm.clip_ratio_hihg=0.3",
            r"'algorithm\.clip_ratio_hihg'.*did you mean 'algorithm\.clip_ratio_high'",
        ),
        ("lr=1e-5", r"unknown config key 'lr'.*did you mean 'optimizer\.lr'"),
        ("algoritm.mode=dapo", r"'algoritm'.*did you mean 'algorithm'"),
        ("algorithm.mode.x=1", r"algorithm\.mode is a single value"),
        (
            "algorithm.overlong_buffer.length=8",
            r"'algorithm\.overlong_buffer\.length'.*'algorithm\.overlong_buffer\.len'",
        ),
        ("no_equals_sign", r"must look like key\.sub=value"),
    ],
)
def test_unknown_override_key_is_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, [override])


def test_unknown_key_in_the_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.read_text().replace("  decay_rate: 32\n", "  decay_rat: 32\n"))
    with pytest.raises(
        ConfigError,
        match=r"bad\.yaml.*'algorithm\.decay_rat'.*did you mean 'algorithm\.decay_rate'",
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("algorithm.clip_ratio_c=abc", r"algorithm\.clip_ratio_c must be a float, got 'abc'"),
        (
            "algorithm.overlong_buffer.len=4.5",
            r"algorithm\.overlong_buffer\.len must be an int, got 4\.5",
        ),
        (
            "algorithm.overlong_buffer.len=true",
            r"algorithm\.overlong_buffer\.len must be an int, got True",
        ),
        ("trainer.eval_before_train=1", r"trainer\.eval_before_train must be a bool.*got 1"),
        ("algorithm.mode=ppo", r"algorithm\.mode must be one of 'grpo', 'dapo', 'fipo', got 'ppo'"),
        ("data.train_files=a.parquet", r"data\.train_files must be a list"),
        ("data.train_files=[a.parquet, 3]", r"data\.train_files\[1\] must be a string, got 3"),
        ("trainer.output_dir=null", r"trainer\.output_dir must be a string, got None"),
        ("model.architecture=[1, 2]", r"model\.architecture must be a mapping"),
        ("optimizer.lr=inf", r"optimizer\.lr must be a float, got 'inf'"),
        ("data.train_files=[a, b", r"override data\.train_files: cannot parse"),
    ],
)
def test_type_errors_name_field_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, [override])


def test_missing_required_fields_are_named(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: {architecture: {vocab_size: 10}}\ndata: {train_files: [a]}\n")
    with pytest.raises(ConfigError, match=r"model\.architecture\.hidden_size is required"):
        load_config(path)
    path.write_text("data: {train_files: [a]}\n")
    with pytest.raises(ConfigError, match=r"^.*: model is required"):
        load_config(path)


# Each rule, broken from a config that is valid otherwise; the message must name the field.
RULES = [
    (TINY, ["algorithm.clip_ratio_low=0"], r"algorithm\.clip_ratio_low must be > 0 and < 1, got 0"),
    (TINY, ["algorithm.clip_ratio_high=-0.1"], r"algorithm\.clip_ratio_high must be > 0"),
    (TINY, ["algorithm.clip_ratio_c=1.0"], r"algorithm\.clip_ratio_c must be > 1, got 1\.0"),
    (TINY, ["algorithm.decay_rate=0"], r"algorithm\.decay_rate must be > 0"),
    (TINY, ["algorithm.fipo_clip_ratio=-0.1"], r"algorithm\.fipo_clip_ratio must be >= 0"),
    (
        TINY,
        ["algorithm.fipo_clip_ratio=1.5", "algorithm.fipo_clip_high_only=false"],
        r"algorithm\.fipo_clip_ratio must be < 1",
    ),
    (TINY, ["algorithm.safety_thresh=0"], r"algorithm\.safety_thresh must be > 0"),
    (TINY, ["algorithm.adv_epsilon=0"], r"algorithm\.adv_epsilon must be > 0"),
    (TINY, ["algorithm.use_kl_loss=true"], r"algorithm\.use_kl_loss"),
    (
        TINY,
        ["algorithm.dynamic_sampling.max_num_gen_batches=0"],
        r"algorithm\.dynamic_sampling\.max_num_gen_batches must be >= 1",
    ),
    (
        TINY,
        ["algorithm.overlong_buffer.len=64"],
        r"algorithm\.overlong_buffer\.len \(64\) must be below rollout\.max_response_length",
    ),
    (
        TINY,
        ["data.ppo_mini_batch_size=5"],
        r"data\.train_batch_size \(32\) must be divisible by data\.ppo_mini_batch_size \(5\)",
    ),
    (TINY, ["data.train_files=[]"], r"data\.train_files must list at least one file"),
    (TINY, ["rollout.n_samples_per_prompt=1"], r"rollout\.n_samples_per_prompt must be >= 2"),
    (TINY, ["rollout.top_p=0"], r"rollout\.top_p must be > 0 and <= 1"),
    (TINY, ["rollout.temperature=0"], r"rollout\.temperature must be > 0"),
    (
        TINY,
        ["rollout.eval_sampling.temperature=-1"],
        r"rollout\.eval_sampling\.temperature must be >= 0",
    ),
    (
        TINY,
        ["rollout.colocate=false"],
        r"rollout\.num_gpus must be set exactly when rollout\.colocate=false",
    ),
    (
        TINY,
        ["rollout.engine=sglang"],
        r"rollout\.engine must be 'hf' when trainer\.gpus_per_node is 0",
    ),
    (
        TINY,
        ["model.spec=te"],
        r"model\.spec must be 'local'",
    ),
    (TINY, ["trainer.distributed_backend=nccl"], r"trainer\.distributed_backend must be 'gloo'"),
    (
        TINY,
        ["parallelism.sequence_parallel=true"],
        r"parallelism\.sequence_parallel=true needs tensor_model_parallel_size > 1",
    ),
    (
        TINY,
        [
            "parallelism.tensor_model_parallel_size=2",
            "parallelism.sequence_parallel=true",
            "trainer.cpu_ranks_per_node=2",
        ],
        r"parallelism\.sequence_parallel=true needs model\.spec='te'",
    ),
    (
        TINY,
        ["parallelism.virtual_pipeline_model_parallel_size=2"],
        r"virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1",
    ),
    (
        TINY,
        ["parallelism.max_tokens_per_micro_batch=100"],
        r"parallelism\.max_tokens_per_micro_batch \(100\) must hold one full sequence",
    ),
    (
        TINY,
        ["model.architecture.max_position_embeddings=100"],
        r"model\.architecture\.max_position_embeddings \(100\) must cover",
    ),
    (
        TINY,
        ["model.architecture.num_key_value_heads=3"],
        r"model\.architecture\.num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)",
    ),
    (
        TINY,
        ["model.architecture.hidden_size=130"],
        r"model\.architecture\.hidden_size \(130\) must be divisible",
    ),
    (
        TINY,
        ["model.architecture=null", "model.hf_model_path=null"],
        r"model\.hf_model_path or model\.architecture must be set",
    ),
    (TINY, ["optimizer.min_lr=1.0"], r"optimizer\.min_lr \(1\.0\) must be <= optimizer\.lr"),
    (TINY, ["optimizer.adam_beta2=1.0"], r"optimizer\.adam_beta2 must be >= 0 and < 1"),
    (
        TINY,
        ["reward.function=mymodule.score"],
        r"reward\.function must look like 'package\.module:function'",
    ),
    (
        TINY,
        ["data.eval_files=[]"],
        r"data\.eval_files is empty but trainer\.eval_freq=10 and trainer\.eval_before_train=true",
    ),
    (
        BIG,
        ["model.fp8=e4m3", "model.dtype=float16"],
        r"model\.fp8='e4m3' needs .*model\.dtype='bfloat16'",
    ),
    (BIG, ["model.fp8_param=true"], r"model\.fp8_param=true needs model\.fp8"),
    (
        BIG,
        ["model.recompute_granularity=selective"],
        r"model\.recompute_method='uniform' needs recompute_granularity='full'",
    ),
    (
        BIG,
        ["rollout.max_prompt_length=2050"],
        r"must be divisible by 2 \* parallelism\.context_parallel_size \* tensor_model_parallel_size \(32\)",
    ),
    (
        BIG,
        ["rollout.engine_tensor_parallel_size=3"],
        r"trainer\.gpus_per_node \(8\) must be divisible by rollout\.engine_tensor_parallel_size \(3\)",
    ),
    (
        BIG,
        ["rollout.colocate=false", "rollout.num_gpus=128"],
        r"rollout\.num_gpus \(128\) must leave training GPUs",
    ),
    (
        TINY,
        ["reward.batch_budget_s=4.0"],
        r"reward\.batch_budget_s \(4\.0\) must be >= reward\.timeout_s \(5\.0\)",
    ),
    (TINY, ["reward.batch_budget_s=0"], r"reward\.batch_budget_s must be > 0"),
]


@pytest.mark.parametrize(
    ("base", "overrides", "pattern"),
    RULES,
    ids=lambda v: str(v)[:60] if isinstance(v, list) else "",
)
def test_cross_field_rule_names_the_field(base, overrides, pattern):
    load_config(base)  # the base is valid: the error below comes from the override
    with pytest.raises(ValueError, match=pattern):
        load_config(base, overrides)


LAYOUT_RULES = [
    (
        ["parallelism.tensor_model_parallel_size=8"],
        8,
        r"model\.architecture\.num_attention_heads \(4\) must be divisible by parallelism\.tensor_model_parallel_size \(8\)",
    ),
    (
        ["parallelism.tensor_model_parallel_size=4"],
        4,
        r"model\.architecture\.num_key_value_heads \(2\) must be divisible by parallelism\.tensor_model_parallel_size \(4\)",
    ),
    (
        ["parallelism.pipeline_model_parallel_size=3"],
        3,
        r"model\.architecture\.num_hidden_layers \(4\) must be divisible by parallelism\.pipeline_model_parallel_size",
    ),
    (
        [
            "parallelism.pipeline_model_parallel_size=2",
            "parallelism.virtual_pipeline_model_parallel_size=4",
        ],
        2,
        r"num_hidden_layers \(4\) must be divisible .* \(8\)",
    ),
    (
        ["parallelism.context_parallel_size=2"],
        3,
        r"world size 3 must be divisible by parallelism\.tensor_model_parallel_size \* pipeline_model_parallel_size \* context_parallel_size = 1\*1\*2",
    ),
    (
        [],
        3,
        r"data\.ppo_mini_batch_size \* rollout\.n_samples_per_prompt \(64 sequences\) must be divisible by the data-parallel size 3",
    ),
    (
        ["parallelism.micro_batch_size=24"],
        2,
        r"32 sequences per data-parallel rank .* parallelism\.micro_batch_size \(24\)",
    ),
]


@pytest.mark.parametrize(("overrides", "world_size", "pattern"), LAYOUT_RULES)
def test_validate_layout_names_the_field(overrides, world_size, pattern):
    config = load_config(TINY, overrides)
    with pytest.raises(ConfigError, match=pattern):
        config.validate_layout(world_size)


def test_validate_layout_returns_data_parallel_size():
    config = load_config(TINY)
    assert config.validate_layout(4) == 4
    assert (
        load_config(TINY, ["parallelism.max_tokens_per_micro_batch=1024"]).validate_layout(2) == 2
    )
    big = load_config(BIG)
    assert big.validate_layout() == 4 and big.validate_layout(256) == 8
    split = load_config(BIG, ["rollout.colocate=false", "rollout.num_gpus=64"])
    assert split.training_world_size == 64 and split.validate_layout() == 2
    with pytest.raises(ConfigError, match=r"world size 120 must be divisible"):
        big.validate_layout(120)


def test_sections_validate_when_built_directly():
    with pytest.raises(ValueError, match=r"algorithm\.clip_ratio_c must be > 1"):
        AlgorithmConfig(clip_ratio_c=0.5)
    with pytest.raises(ValueError, match=r"parallelism\.context_parallel_size must be >= 1"):
        ParallelismConfig(context_parallel_size=0)
    assert (
        ParallelismConfig(tensor_model_parallel_size=2, context_parallel_size=2).model_parallel_size
        == 4
    )


def test_to_yaml_round_trip_keeps_overridden_values(tmp_path):
    config = load_config(
        TINY, ["optimizer.lr=2.5e-7", "data.train_files=['007', x.jsonl]", "trainer.seed=7"]
    )
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(config))
    again = load_config(path)
    assert again == config and again.data.train_files == ["007", "x.jsonl"]
    assert isinstance(again, FipoConfig)


def test_config_module_imports_no_torch():
    code = "import sys, megatron_fipo.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_configs_pickle_for_ray_and_replace_revalidates():
    config = load_config(BIG)
    assert pickle.loads(pickle.dumps(config)) == config
    assert dataclasses.replace(config.algorithm, mode="grpo").mode == "grpo"
    with pytest.raises(ValueError, match=r"algorithm\.decay_rate must be > 0"):
        dataclasses.replace(config.algorithm, decay_rate=0.0)


def test_file_that_is_not_a_mapping_or_not_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: config must be a mapping"):
        load_config(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(path)


# ---- duplicate keys, non-finite numbers -----------------------------------------------------


def test_a_section_written_twice_is_refused_naming_key_and_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(TINY.read_text() + "\noptimizer:\n  lr: 5.0e-5\n")
    lines = path.read_text().splitlines()
    first, last = lines.index("optimizer:") + 1, len(lines) - 1
    with pytest.raises(
        ConfigError,
        match=rf"twice\.yaml: duplicate key 'optimizer' at line {last} \(first at line {first}\)",
    ):
        load_config(path)


def test_a_nested_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text(TINY.read_text().replace("  lr: 1.0e-4", "  lr: 1.0e-4\n  lr: 2.0e-4"))
    lines = path.read_text().splitlines()
    second = next(i for i, line in enumerate(lines, 1) if line.startswith("  lr: 2.0e-4"))
    with pytest.raises(ConfigError, match=rf"duplicate key 'optimizer\.lr' at line {second} \("):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override model\.architecture: duplicate key"):
        load_config(TINY, ["model.architecture={hidden_size: 64, hidden_size: 128}"])
    # A YAML merge key is not a duplicate: the local key overrides the merged one, as specified.
    merged = tmp_path / "merge.yaml"
    merged.write_text(
        TINY.read_text().replace("optimizer:\n", "optimizer:\n  <<: {weight_decay: 0.5}\n", 1)
    )
    assert load_config(merged).optimizer.weight_decay == 0.0


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for item in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[item.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            keys += _float_keys(inner[0], f"{prefix}{item.name}.")
        elif float in inner:
            keys.append(f"{prefix}{item.name}")
    return keys


FLOAT_KEYS = _float_keys(FipoConfig)


def test_every_float_field_is_found():
    assert {"optimizer.lr", "algorithm.overlong_buffer.penalty_factor"} <= set(FLOAT_KEYS)
    assert "model.architecture.rope_theta" in FLOAT_KEYS and len(FLOAT_KEYS) >= 20


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused_by_dotted_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} must be a finite number"):
        load_config(TINY, [f"{key}={value}"])


def test_non_finite_floats_in_the_file_and_in_code(tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text(TINY.read_text().replace("  lr: 1.0e-4", "  lr: .inf"))
    with pytest.raises(ConfigError, match=r"inf\.yaml: optimizer\.lr must be a finite number"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"optimizer\.clip_grad must be a finite number, got inf"):
        OptimizerConfig(clip_grad=float("inf"))


# ---- the checkpoint's config.json is what runs ----------------------------------------------


def _checkpoint(tmp_path: Path, **changes) -> Path:
    """An HF model dir whose config.json transformers wrote from tiny-cpu's architecture (as the
    warm start does), with ``changes`` applied to the JSON."""
    from transformers import AutoConfig

    fields = to_dict(load_config(TINY).model.architecture)
    folder = tmp_path / "ckpt"
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_tiny_cpu_architecture_agrees_with_the_checkpoint_written_from_it(tmp_path):
    folder = _checkpoint(tmp_path)
    check_model_checkpoint(load_config(TINY, [f"model.hf_model_path={folder}"]))
    # Absent config.json (dry run without weights, warm start not yet run): nothing to check.
    check_model_checkpoint(load_config(TINY, [f"model.hf_model_path={tmp_path / 'none'}"]))


def test_architecture_that_disagrees_with_the_checkpoint_is_refused(tmp_path):
    folder = _checkpoint(tmp_path, hidden_size=256, num_hidden_layers=2)
    config = load_config(TINY, [f"model.hf_model_path={folder}"])
    with pytest.raises(
        ConfigError,
        match=r"model\.architecture disagrees with .*ckpt/config\.json \(hidden_size 128 != 256; "
        r"num_hidden_layers 4 != 2\): the checkpoint is what runs",
    ):
        check_model_checkpoint(config)
    # Without an inline architecture the checkpoint alone decides.
    check_model_checkpoint(
        load_config(TINY, [f"model.hf_model_path={folder}", "model.architecture=null"])
    )


def test_rope_theta_is_compared_in_both_config_json_spellings(tmp_path):
    legacy = _checkpoint(tmp_path, rope_theta=500000.0)  # top-level, as transformers 4 wrote it
    with pytest.raises(ConfigError, match=r"rope_theta 10000\.0 != 500000\.0"):
        check_model_checkpoint(load_config(TINY, [f"model.hf_model_path={legacy}"]))
    nested = _checkpoint(tmp_path, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    with pytest.raises(ConfigError, match=r"rope_theta 10000\.0 != 1000000\.0"):
        check_model_checkpoint(load_config(TINY, [f"model.hf_model_path={nested}"]))


def test_sequence_longer_than_the_checkpoint_positions_is_refused(tmp_path):
    folder = _checkpoint(tmp_path, max_position_embeddings=100)
    config = load_config(TINY, [f"model.hf_model_path={folder}", "model.architecture=null"])
    with pytest.raises(
        ConfigError,
        match=r"rollout\.max_prompt_length \+ max_response_length \(128\) exceeds the "
        r"max_position_embeddings \(100\) of .*ckpt/config\.json",
    ):
        check_model_checkpoint(config)
    short = [f"model.hf_model_path={folder}", "model.architecture=null"]
    check_model_checkpoint(load_config(TINY, [*short, "rollout.max_response_length=36"]))


def test_unreadable_checkpoint_config_is_named(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model\.hf_model_path: cannot read .*broken/config"):
        check_model_checkpoint(load_config(TINY, [f"model.hf_model_path={folder}"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["rollout.weight_sync=ipc", "rollout.colocate=false", "rollout.num_gpus=8"],
            "'ipc' needs",
        ),
        (["rollout.weight_sync=nccl"], "'nccl' is for separate engine GPUs"),
        (["rollout.weight_sync=tcp"], "rollout.weight_sync"),
        (
            ["rollout.engine=hf", "rollout.colocate=false", "rollout.num_gpus=8"],
            "needs rollout.engine='sglang'",
        ),
    ],
)
def test_weight_sync_route_must_fit_the_placement_and_engine(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BIG, overrides)


def test_weight_sync_route_defaults_by_placement():
    assert load_config(BIG).rollout.weight_sync_mode == "ipc"  # colocated
    separate = load_config(BIG, ["rollout.colocate=false", "rollout.num_gpus=16"])
    assert separate.rollout.weight_sync_mode == "nccl"


@pytest.mark.parametrize("name", ["qwen2.5-32b-fipo.yaml", "qwen2.5-32b-dapo.yaml"])
def test_32b_recipes_overlap_grad_reduce_and_param_gather(name):
    parallelism = load_config(CONFIGS / name).parallelism
    assert parallelism.overlap_grad_reduce and parallelism.overlap_param_gather
