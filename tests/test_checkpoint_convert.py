"""HF <-> Megatron conversion in one process: round trips, fused layouts, bad input, peak memory.

The Megatron-side checks (loading under TP/PP, logits against transformers) are in
test_checkpoint_convert_megatron.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_convert.__main__ import main
from checkpoint_convert.adapters import (
    ConversionError,
    adapter_for,
    interleave_qkv,
    merge_tensor_parallel,
    split_qkv,
)
from checkpoint_convert.convert import hf_to_megatron, megatron_to_hf, staged_output
from checkpoint_convert.random_checkpoint import qwen2_config, write_random_checkpoint

TINY = dict(
    vocab_size=300,  # pads to 384 at TP=1 and 512 at TP=2: exercises re-padding on load
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def save_tiny_model(
    kind: str, out_dir: Path, *, dtype=torch.float32, max_shard_size="40KB"
) -> Path:
    """A random-weight transformers model of family ``kind`` saved with ``save_pretrained``."""
    import transformers

    torch.manual_seed(0)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False)
    elif kind == "qwen2_tied":
        config = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True)
    elif kind == "llama":
        config = transformers.LlamaConfig(**TINY, num_key_value_heads=1, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return out_dir


def load_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_no_output(path: Path) -> None:
    assert not path.exists(), f"{path} was written"
    leftovers = [
        p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.partial")
    ]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {kind: save_tiny_model(kind, root / kind) for kind in ("qwen2", "qwen2_tied", "llama")}
    out["qwen2_bf16_single"] = save_tiny_model(
        "qwen2", root / "bf16", dtype=torch.bfloat16, max_shard_size="1GB"
    )
    return out


# ---------------------------------------------------------------- layouts


def test_qkv_interleave_is_grouped_and_inverts():
    num_heads, groups, head_dim, hidden = 6, 2, 3, 5
    q = torch.arange(num_heads * head_dim * hidden, dtype=torch.float32).reshape(-1, hidden)
    k = -torch.arange(groups * head_dim * hidden, dtype=torch.float32).reshape(-1, hidden) - 1
    v = k - 1000
    fused = interleave_qkv(q, k, v, groups)
    per_group = (num_heads // groups + 2) * head_dim
    # Group 1 starts with its first query head (head 3), then k_1, then v_1.
    block = fused[per_group : 2 * per_group]
    assert torch.equal(block[: 3 * head_dim], q[3 * head_dim : 6 * head_dim])
    assert torch.equal(block[3 * head_dim : 4 * head_dim], k[head_dim:])
    assert torch.equal(block[4 * head_dim :], v[head_dim:])
    for got, want in zip(split_qkv(fused, num_heads, groups, head_dim), (q, k, v)):
        assert torch.equal(got, want)
    bias = interleave_qkv(q[:, 0], k[:, 0], v[:, 0], groups)
    assert torch.equal(bias, fused[:, 0])


def test_merge_tensor_parallel_regroups_gated_fc1():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    shards = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]
    merged = merge_tensor_parallel("decoder.layers.5.mlp.linear_fc1.weight", shards)
    assert torch.equal(merged, torch.cat([gate, up]))
    proj = merge_tensor_parallel("decoder.layers.0.self_attention.linear_proj.weight", [gate, up])
    assert proj.shape == (4, 4)
    norm = merge_tensor_parallel("decoder.layers.0.input_layernorm.weight", [gate[0], gate[0]])
    assert torch.equal(norm, gate[0])


def test_megatron_to_hf_accepts_local_and_te_names(models):
    adapter = adapter_for(json.loads((models["qwen2"] / "config.json").read_text()))
    weight = torch.randn(64)
    for name in (
        "decoder.layers.2.input_layernorm.weight",
        "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight",
    ):
        ((hf_name, tensor),) = adapter.megatron_to_hf(name, weight)
        assert hf_name == "model.layers.2.input_layernorm.weight" and tensor is weight
    embedding = torch.randn(512, 64)  # padded for TP=2
    ((hf_name, tensor),) = adapter.megatron_to_hf("embedding.word_embeddings.weight", embedding)
    assert hf_name == "model.embed_tokens.weight" and torch.equal(tensor, embedding[:300])


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_row_pieces_agree_with_tensor_api(models, kind):
    """The converter's in-place row copies and the rollout's tensor API are one layout."""
    adapter = adapter_for(json.loads((models[kind] / "config.json").read_text()))
    hf = load_hf_tensors(models[kind])
    for spec in adapter.megatron_specs():
        layers = range(adapter.dims.num_layers) if spec.per_layer else [None]
        for layer in layers:
            name = spec.key if layer is None else spec.key.replace("layers.", f"layers.{layer}.")
            fused = adapter.hf_to_megatron(name, hf.__getitem__)
            assert tuple(fused.shape) == spec.shape, name
            by_pieces = torch.zeros(spec.shape)
            for piece in adapter.row_pieces(name):
                source = hf[piece.hf_name][piece.hf_row : piece.hf_row + piece.num_rows]
                by_pieces[piece.megatron_row : piece.megatron_row + piece.num_rows] = source
            assert torch.equal(fused, by_pieces), name
            for hf_name, tensor in adapter.megatron_to_hf(name, fused):
                assert torch.equal(tensor, hf[hf_name]), hf_name


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_tied", "llama", "qwen2_bf16_single"])
def test_round_trip_is_bit_exact(models, tmp_path, kind):
    source = models[kind]
    megatron_dir = hf_to_megatron(source, tmp_path / "megatron", progress=False)
    assert (megatron_dir / "config.json").is_file() and (megatron_dir / "metadata.json").is_file()
    back = megatron_to_hf(megatron_dir, tmp_path / "hf", progress=False, max_shard_bytes=60_000)
    original, restored = load_hf_tensors(source), load_hf_tensors(back)
    if kind == "qwen2_tied":
        original.pop("lm_head.weight", None)
    assert sorted(original) == sorted(restored)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(restored) and len(set(index["weight_map"].values())) > 1
    for side_file in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (back / side_file).read_bytes() == (source / side_file).read_bytes()


def test_round_trip_without_kernel_copy(models, tmp_path, monkeypatch):
    """Where copy_file_range is refused (another file system), bytes go through the bounce
    buffer: the same files come out."""
    from checkpoint_convert import safetensors_io

    monkeypatch.setattr(safetensors_io.MOVER, "kernel_copy", False)
    source = models["qwen2"]
    megatron_dir = hf_to_megatron(source, tmp_path / "megatron", progress=False)
    back = megatron_to_hf(megatron_dir, tmp_path / "hf", progress=False, max_shard_bytes=60_000)
    assert safetensors_io.MOVER.kernel_copy is False
    original, restored = load_hf_tensors(source), load_hf_tensors(back)
    assert sorted(original) == sorted(restored)
    assert all(torch.equal(original[name], restored[name]) for name in original)


def test_written_chunks_are_located_and_padding_is_zero(models, tmp_path):
    """Every chunk we write is a plain record whose data stored_bytes finds: those bytes are
    what torch.load gives, and the vocab padding rows (never written: a hole) read as zeros."""
    import os

    from checkpoint_convert.adapters import EMBEDDING, OUTPUT
    from checkpoint_convert.megatron_io import DistCheckpointReader

    source = models["qwen2"]
    megatron_dir = hf_to_megatron(source, tmp_path / "megatron", progress=False)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    with DistCheckpointReader(megatron_dir) as reader:
        keys = sorted(reader.metadata.state_dict_metadata)
        tensors = [k for k in keys if not k.endswith("_extra_state") and "/shard_" not in k]
        for key in tensors:
            entry = reader.tensor_metadata(key)
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                fd, offset = reader.stored_bytes(key, offsets, sizes)
                expected = reader.read(key, offsets, sizes)
                raw = os.pread(fd, expected.nbytes, offset)
                assert raw == expected.contiguous().view(torch.uint8).numpy().tobytes(), key
            if key in (EMBEDDING, OUTPUT):
                full = reader.read(key, (0, 0), tuple(entry.size))
                assert full.shape[0] > vocab and not full[vocab:].any(), key
        # A block that is not one whole stored chunk is not located (read() serves it).
        assert reader.stored_bytes(EMBEDDING, (0, 0), (8, 64)) is None


def test_export_loads_in_transformers(models, tmp_path):
    import transformers

    megatron_dir = hf_to_megatron(models["qwen2_tied"], tmp_path / "m", progress=False)
    back = megatron_to_hf(megatron_dir, tmp_path / "hf", progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(models["qwen2_tied"])
    restored = transformers.AutoModelForCausalLM.from_pretrained(back)
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(reference(tokens).logits, restored(tokens).logits)


def test_cli_round_trip_and_exit_codes(models, tmp_path, capsys):
    source, megatron_dir = models["llama"], tmp_path / "m"
    assert (
        main(
            [
                "hf-to-megatron",
                "--hf-dir",
                str(source),
                "--output-dir",
                str(megatron_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    # A second run into the same (now non-empty) directory is refused without --force.
    assert (
        main(
            [
                "hf-to-megatron",
                "--hf-dir",
                str(source),
                "--output-dir",
                str(megatron_dir),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "not empty" in capsys.readouterr().err
    args = ["--hf-dir", str(source), "--output-dir", str(megatron_dir), "--no-progress", "--force"]
    assert main(["hf-to-megatron", *args]) == 0
    hf_dir = tmp_path / "hf"
    assert (
        main(
            [
                "megatron-to-hf",
                "--megatron-dir",
                str(megatron_dir),
                "--output-dir",
                str(hf_dir),
                "--dtype",
                "bfloat16",
                "--no-progress",
            ]
        )
        == 0
    )
    restored = load_hf_tensors(hf_dir)
    assert all(t.dtype == torch.bfloat16 for t in restored.values())
    original = load_hf_tensors(source)
    assert torch.equal(restored["model.norm.weight"], original["model.norm.weight"].bfloat16())


# ---------------------------------------------------------------- bad input


def _single_file_copy(source: Path, target: Path, edit) -> Path:
    """``source`` as one model.safetensors after ``edit(tensors, config)`` (in place)."""
    target.mkdir()
    tensors = load_hf_tensors(source)
    config = json.loads((source / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return target


def _sharded_copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _drop_first_shard(d):
    next(iter(sorted(d.glob("model-*.safetensors")))).unlink()


def _truncate_last_shard(d):
    path = sorted(d.glob("model-*.safetensors"))[-1]
    path.write_bytes(path.read_bytes()[:-100])


def _drop_index_entry(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


SHARDED_CASES = {
    "missing_shard": (_drop_first_shard, "missing safetensors shard"),
    "truncated_shard": (_truncate_last_shard, "truncated safetensors shard"),
    "index_missing_tensor": (
        _drop_index_entry,
        "'model.layers.1.mlp.up_proj.weight' .*missing from .*model.safetensors.index.json",
    ),
}


@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_bad_sharded_input(models, tmp_path, case):
    edit, message = SHARDED_CASES[case]
    source = _sharded_copy(models["qwen2"], tmp_path / "src")
    edit(source)
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron(source, tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")


SINGLE_FILE_CASES = {
    "tensor_missing": (
        lambda t, c: t.pop("model.layers.2.self_attn.k_proj.bias"),
        "'model.layers.2.self_attn.k_proj.bias' .* is missing",
    ),
    "unexpected_tensor": (
        lambda t, c: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
        "unexpected tensor 'model.layers.0.mlp.extra.weight'",
    ),
    "misshaped_tensor": (
        lambda t, c: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 95)}),
        r"'model.layers.1.mlp.down_proj.weight' has shape \(64, 95\)",
    ),
    "config_mismatch": (
        lambda t, c: c.update(intermediate_size=128),
        "config does not match the weights",
    ),
    "moe_config": (
        lambda t, c: c.update(model_type="qwen2_moe", num_experts=4),
        "mixture-of-experts",
    ),
    "unsupported_architecture": (
        lambda t, c: c.update(model_type="gpt2"),
        "model_type='gpt2' is not supported",
    ),
    "unsupported_dtype": (
        lambda t, c: t.update({"model.norm.weight": t["model.norm.weight"].double()}),
        "unsupported dtype F64 for tensor 'model.norm.weight'",
    ),
    # Fields that change the math: the weights would convert and then run another function.
    "gelu_activation": (
        lambda t, c: c.update(hidden_act="gelu"),
        r"config\.hidden_act='gelu' is not supported: the Megatron model computes SwiGLU",
    ),
    "yarn_rope_scaling": (
        lambda t, c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        r"config\.rope_scaling=\{'rope_type': 'yarn', 'factor': 4\.0\} is not supported",
    ),
    "linear_rope_parameters": (  # transformers 5 spelling
        lambda t, c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0}),
        r"config\.rope_parameters=\{'rope_type': 'linear', 'factor': 2\.0\} is not supported",
    ),
    "fractional_rope_theta": (
        lambda t, c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e4 + 0.5}),
        r"config\.rope_theta=10000\.5 is not supported",
    ),
    "partial_rotary": (
        lambda t, c: c.update(partial_rotary_factor=0.5),
        r"config\.partial_rotary_factor=0\.5 is not supported",
    ),
    "sliding_layers": (
        lambda t, c: c.update(layer_types=["full_attention"] * 3 + ["sliding_attention"]),
        r"config\.layer_types has \['sliding_attention'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(SINGLE_FILE_CASES))
def test_bad_single_file_input(models, tmp_path, case):
    edit, message = SINGLE_FILE_CASES[case]
    source = _single_file_copy(models["qwen2"], tmp_path / "src", edit)
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron(source, tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")


def test_supported_rope_settings_convert(models, tmp_path):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    llama3 |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for name, edit in {
        "llama3_parameters": lambda t, c: c.update(rope_parameters={**llama3, "rope_theta": 5e5}),
        "llama3_scaling": lambda t, c: c.update(rope_scaling=llama3, rope_theta=500000.0),
        "swish": lambda t, c: c.update(hidden_act="swish"),
    }.items():
        source = _single_file_copy(models["llama"], tmp_path / name, edit)
        hf_to_megatron(source, tmp_path / f"{name}_out", progress=False, sync=False)


def test_cli_refuses_gelu_in_one_line(models, tmp_path, capsys):
    source = _single_file_copy(
        models["qwen2"], tmp_path / "src", lambda t, c: c.update(hidden_act="gelu")
    )
    args = ["hf-to-megatron", "--hf-dir", str(source), "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: config.hidden_act='gelu' is not supported") and err.count("\n") == 1
    )
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize(
    "layout, relation",
    [
        ("parent", r"contains the input .*model/hf \(--force would delete it\)"),
        ("same", r"is the input directory"),
        ("child", r"is inside the input directory .*model/hf"),
    ],
)
def test_force_never_deletes_its_own_input(models, tmp_path, capsys, layout, relation):
    (tmp_path / "model").mkdir()
    source = _sharded_copy(models["qwen2"], tmp_path / "model" / "hf")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    output = {"parent": source.parent, "same": source, "child": source / "megatron"}[layout]
    with pytest.raises(ConversionError, match=rf"output directory {output} {relation}; choose"):
        hf_to_megatron(source, output, force=True, progress=False)
    args = ["--hf-dir", str(source), "--output-dir", str(output), "--no-progress", "--force"]
    assert main(["hf-to-megatron", *args]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    # Export: neither the checkpoint nor its hf_config/ may be under (or be) the output.
    megatron_dir = hf_to_megatron(source, tmp_path / "m", progress=False, sync=False)
    for output in (tmp_path, megatron_dir, megatron_dir / "hf_config", megatron_dir / "x"):
        with pytest.raises(ConversionError, match="output directory"):
            megatron_to_hf(megatron_dir, output, force=True, progress=False)
    assert (megatron_dir / "hf_config" / "config.json").is_file()


def test_export_refuses_config_that_does_not_match(models, tmp_path):
    megatron_dir = hf_to_megatron(models["qwen2"], tmp_path / "m", progress=False)
    config = json.loads((megatron_dir / "config.json").read_text())
    wrong = tmp_path / "wrong_config"
    wrong.mkdir()
    (wrong / "config.json").write_text(
        json.dumps({**config, "hidden_size": 32, "num_attention_heads": 2})
    )
    with pytest.raises(ConversionError, match="has shape .* but the config implies"):
        megatron_to_hf(megatron_dir, tmp_path / "out", hf_config_dir=wrong, progress=False)
    assert_no_output(tmp_path / "out")
    with pytest.raises(ConversionError, match="not a torch_dist checkpoint"):
        megatron_to_hf(models["qwen2"], tmp_path / "out", hf_config_dir=wrong, progress=False)
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated_end", "truncated_half", "missing", "record"])
def test_export_refuses_a_damaged_megatron_checkpoint(models, tmp_path, damage):
    import shutil

    from checkpoint_convert.megatron_io import DistCheckpointReader

    megatron_dir = hf_to_megatron(models["qwen2"], tmp_path / "m", progress=False)
    (data_file,) = megatron_dir.glob("*.distcp")
    size = data_file.stat().st_size
    if damage == "truncated_end":  # the last record is an extra-state object, never read
        os.truncate(data_file, size - 100)
        message = "truncated checkpoint file"
    elif damage == "truncated_half":
        os.truncate(data_file, size // 2)
        message = "truncated checkpoint file"
    elif damage == "missing":
        data_file.unlink()
        message = "missing checkpoint file"
    else:  # overwrite the start of a tensor record: its zip header no longer parses
        with DistCheckpointReader(megatron_dir) as reader:
            info = reader.metadata.storage_data[
                next(
                    index
                    for index in reader.metadata.storage_data
                    if index.fqn.endswith("linear_qkv.layer_norm_weight")
                )
            ]
        with open(data_file, "r+b") as stream:
            stream.seek(info.offset)
            stream.write(b"\xff" * 40)
        message = r"cannot read block .*\(damaged checkpoint file\?\)"
    with pytest.raises(ConversionError, match=message):
        megatron_to_hf(megatron_dir, tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")
    shutil.rmtree(megatron_dir)


def test_staged_output_keeps_the_old_output_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(target, force=True) as staging:
            (staging / "half").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old").read_text() == "old"
    with staged_output(target, force=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------- streaming memory

_RSS_CHILD = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from checkpoint_convert.convert import hf_to_megatron, megatron_to_hf
    from checkpoint_convert.random_checkpoint import qwen2_config, write_random_checkpoint
    src, mdir, hdir, scratch = map(Path, sys.argv[1:5])
    # Warm-up on a tiny model: lazy imports and one-off allocations are not streaming memory.
    tiny = qwen2_config(num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=256,
                        num_heads=4, num_kv_heads=2)
    write_random_checkpoint(scratch / "tiny", tiny)
    hf_to_megatron(scratch / "tiny", scratch / "tiny_m", progress=False, sync=False)
    megatron_to_hf(scratch / "tiny_m", scratch / "tiny_hf", progress=False, sync=False)
    status = Path("/proc/self/status")
    kib = lambda field: int(re.search(field + r":\\s+(\\d+)", status.read_text()).group(1))
    growth = {}
    for step, run in (
        ("import", lambda: hf_to_megatron(src, mdir, progress=False, sync=False)),
        ("export", lambda: megatron_to_hf(mdir, hdir, progress=False, max_shard_bytes=64 << 20, sync=False)),
    ):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        base = kib("VmRSS")
        run()
        growth[step] = (kib("VmHWM") - base) * 1024
    print(json.dumps(growth))
    """
)


def test_peak_memory_is_bounded_by_a_few_tensors(tmp_path):
    config = qwen2_config(
        num_layers=32,
        hidden_size=512,
        ffn_hidden_size=2048,
        vocab_size=4096,
        num_heads=8,
        num_kv_heads=2,
    )
    total = write_random_checkpoint(
        tmp_path / "src", config, dtype=torch.float32, max_shard_bytes=64 << 20
    )
    largest = 2 * 2048 * 512 * 4  # linear_fc1 [2F, H] fp32; the embedding is as large
    bound = 4 * largest + (48 << 20)  # a few tensors + allocator / DCP bookkeeping slack
    assert total > 4 * bound, "the checkpoint must dwarf the bound for the test to mean anything"
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _RSS_CHILD,
            str(tmp_path / "src"),
            str(tmp_path / "m"),
            str(tmp_path / "hf"),
            str(tmp_path / "warmup"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    growth = json.loads(child.stdout.strip().splitlines()[-1])
    print("peak RSS growth", growth, "bound", bound, "checkpoint bytes", total)
    assert max(growth.values()) < bound, (growth, bound, total)
    restored = load_file(sorted((tmp_path / "hf").glob("*.safetensors"))[-1])
    original = load_hf_tensors(tmp_path / "src")
    assert all(torch.equal(original[name], tensor) for name, tensor in restored.items())
