"""Converted checkpoints against the real Megatron model, in one shared world of 2 gloo ranks.

- the dist checkpoint holds exactly the keys (and global shapes) that the actor's GPTModel
  ``sharded_state_dict()`` asks for, at TP=1, TP=2 and PP=2;
- ``verify``: transformers logits == Megatron logits (fp32, max abs diff < 1e-4) at TP=1, TP=2,
  PP=2 for Qwen2 (GQA + bias, untied), Qwen2 (tied) and Llama;
- a checkpoint the actor saves at TP=2 (its own chunking, vocab padded for TP=2) exports to
  the original HF tensors bit for bit;
- the rollout path: the actor's TP/PP parameter shards, merged with ``merge_tensor_parallel``
  and mapped with ``Adapter.megatron_to_hf``, are the original HF tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from megatron_harness import WorkerWorld
from test_checkpoint_convert import load_hf_tensors, save_tiny_model

from checkpoint_convert.adapters import EMBEDDING, OUTPUT, adapter_for, merge_tensor_parallel
from checkpoint_convert.convert import hf_to_megatron, megatron_to_hf
from checkpoint_convert.megatron_io import DistCheckpointReader
from checkpoint_convert.verify import VerifyConfig, verify_in_process

KINDS = ("qwen2", "qwen2_tied", "llama")
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


@pytest.fixture(scope="module")
def world():
    with WorkerWorld(2) as world:
        yield world


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for kind in KINDS:
        hf_dir = save_tiny_model(kind, root / f"{kind}_hf")
        out[kind] = (hf_dir, hf_to_megatron(hf_dir, root / f"{kind}_megatron", progress=False))
    return out


def _build(hf_dir: Path, tp: int, pp: int):
    from megatron_fipo.megatron import distributed as dist_lib
    from megatron_fipo.megatron import model as model_lib

    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    from megatron_fipo.config import ModelConfig
    from megatron_fipo.megatron.check_parallel import layout

    parallel = layout(tp=tp, pp=pp)
    dist_lib.init_distributed(parallel)
    model = ModelConfig(hf_model_path=str(hf_dir), dtype="float32", spec="local")
    config = model_lib.transformer_config_from_hf(hf_config, model, parallel)
    return hf_config, model_lib.build_model_chunks(hf_config, config)


def _case_expected_keys(rank, world_size, hf_dir, tp, pp):
    """{key: global shape (None for objects)} the model asks for, over all ranks."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factories

    from megatron_fipo.megatron import distributed as dist_lib
    from megatron_fipo.megatron.checkpoint import model_sharded_state_dict

    _, chunks = _build(hf_dir, tp, pp)
    state = model_sharded_state_dict(chunks)
    apply_factories(state)
    keys = {}
    for item in nested_values(state):
        if isinstance(item, ShardedObject):
            keys[item.unique_key] = None
        else:
            keys[item.key] = tuple(item.global_shape)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, keys)
    dist_lib.destroy()
    return {k: v for part in gathered for k, v in part.items()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_keys_match_the_model(world, converted, layout):
    tp, pp = LAYOUTS[layout]
    for kind in ("qwen2", "qwen2_tied"):
        hf_dir, megatron_dir = converted[kind]
        expected = world.run(_case_expected_keys, hf_dir, tp, pp)[0]
        stored = DistCheckpointReader(megatron_dir).metadata.state_dict_metadata
        assert sorted(stored) == sorted(expected), kind
        for key, shape in expected.items():
            if shape is None:
                continue
            stored_shape = tuple(stored[key].size)
            if key in (EMBEDDING, OUTPUT):  # padded for TP=1; the model pads for its own TP
                assert stored_shape[0] == 384 and shape[0] == (384 if tp == 1 else 512), key
                assert stored_shape[1:] == shape[1:], key
            else:
                assert stored_shape == shape, (kind, key)


def _case_verify(rank, world_size, hf_dir, megatron_dir, tp, pp):
    config = VerifyConfig(
        hf_dir=hf_dir, megatron_dir=megatron_dir, tensor_parallel=tp, pipeline_parallel=pp
    )
    return verify_in_process(config)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_logits_match_transformers(world, converted, kind):
    hf_dir, megatron_dir = converted[kind]
    for layout, (tp, pp) in LAYOUTS.items():
        results = world.run(_case_verify, hf_dir, megatron_dir, tp, pp)
        assert results[0] == results[1]
        assert results[0].max_abs_diff < 1e-4, (layout, results[0])
        assert abs(results[0].mean_kl) < 1e-6, (layout, results[0])


def _case_verify_detects_wrong_weights(rank, world_size, hf_dir, megatron_dir):
    return verify_in_process(
        VerifyConfig(hf_dir=hf_dir, megatron_dir=megatron_dir, tensor_parallel=2)
    )


def test_verify_detects_a_mismatch(world, converted):
    # The Llama checkpoint against the Qwen2 reference: same sizes, different weights.
    result = world.run(
        _case_verify_detects_wrong_weights, converted["qwen2"][0], converted["llama"][1]
    )[0]
    assert result.max_abs_diff > 1e-2


def _case_actor_resave(rank, world_size, hf_dir, megatron_dir, out_dir):
    import multiprocessing

    from megatron_fipo.megatron import distributed as dist_lib
    from megatron_fipo.megatron.checkpoint import load_model_checkpoint, save_model_checkpoint

    hf_config, chunks = _build(hf_dir, 2, 1)
    load_model_checkpoint(chunks, str(megatron_dir))
    # megatron-core's torch_dist save starts a multiprocessing Manager, which a daemonic
    # process may not do; the harness workers are daemonic, so lift the flag for this save.
    config = multiprocessing.current_process()._config
    daemon = config.get("daemon")
    config["daemon"] = False
    try:
        save_model_checkpoint(chunks, str(out_dir), hf_config=hf_config)
    finally:
        config["daemon"] = daemon
    dist_lib.destroy()


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_tied"])
def test_export_of_an_actor_checkpoint_saved_at_tp2(world, converted, tmp_path, kind):
    hf_dir, megatron_dir = converted[kind]
    world.run(_case_actor_resave, hf_dir, megatron_dir, tmp_path / "actor")
    with DistCheckpointReader(tmp_path / "actor") as reader:
        embedding = reader.tensor_metadata(EMBEDDING)
        assert tuple(embedding.size) == (512, 64) and len(embedding.chunks) == 2  # TP=2 layout
        # TP-split blocks span two stored chunks (read and joined); megatron-core's record of
        # a replicated norm is one whole chunk, copied file to file.
        assert reader.stored_bytes(EMBEDDING, (0, 0), (512, 64)) is None
        norm = "decoder.final_layernorm.weight"
        assert reader.stored_bytes(norm, (0,), (64,)) is not None
    back = megatron_to_hf(tmp_path / "actor", tmp_path / "hf", progress=False)
    original, restored = load_hf_tensors(hf_dir), load_hf_tensors(back)
    original.pop("lm_head.weight", None) if kind == "qwen2_tied" else None
    assert sorted(original) == sorted(restored)
    assert all(torch.equal(original[name], restored[name]) for name in original)


def _case_rollout_shards(rank, world_size, hf_dir, megatron_dir, tp, pp):
    """HF-named full tensors from this rank's parameter shards (the weight-sync path)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_fipo.megatron import distributed as dist_lib
    from megatron_fipo.megatron.checkpoint import iter_param_shards, load_model_checkpoint

    hf_config, chunks = _build(hf_dir, tp, pp)
    load_model_checkpoint(chunks, str(megatron_dir))
    adapter, out = adapter_for(hf_config), {}
    for shard in iter_param_shards(chunks):
        parts = [shard.tensor]
        if shard.tensor_parallel:
            parts = [torch.empty_like(shard.tensor) for _ in range(shard.tp_size)]
            dist.all_gather(
                parts, shard.tensor.contiguous(), group=ps.get_tensor_model_parallel_group()
            )
        full = merge_tensor_parallel(shard.name, parts)
        out.update(adapter.megatron_to_hf(shard.name, full))
    dist_lib.destroy()
    return out


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_rollout_resharding_rebuilds_hf_tensors(world, converted, layout):
    hf_dir, megatron_dir = converted["qwen2"]
    per_rank = world.run(_case_rollout_shards, hf_dir, megatron_dir, *LAYOUTS[layout])
    original = load_hf_tensors(hf_dir)
    rebuilt = {name: t for part in per_rank for name, t in part.items()}
    assert sorted(rebuilt) == sorted(original)
    assert all(torch.equal(original[name], rebuilt[name]) for name in original)


def test_cli_verify_exit_codes(converted, capsys):
    from checkpoint_convert.__main__ import main

    hf_dir, megatron_dir = converted["qwen2"]
    assert (
        main(["verify", "--hf-dir", str(hf_dir), "--megatron-dir", str(megatron_dir), "--pp", "2"])
        == 0
    )
    assert "max_abs_logit_diff=" in capsys.readouterr().out
    wrong = converted["llama"][1]
    assert main(["verify", "--hf-dir", str(hf_dir), "--megatron-dir", str(wrong)]) == 1
    assert "above tolerance" in capsys.readouterr().err


def test_cli_verify_reports_bad_input_in_one_line(converted, tmp_path, capsys):
    """A directory that is not a dist checkpoint, a layout the model cannot split and a
    checkpoint that fails to load end in one line and exit status 2, not a traceback."""
    from checkpoint_convert.__main__ import main

    hf_dir, megatron_dir = converted["qwen2"]
    heads = json.loads((Path(hf_dir) / "config.json").read_text())["num_attention_heads"]
    other = tmp_path / "empty"
    other.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in Path(megatron_dir).iterdir():  # the metadata but none of the tensors' files
        if item.name == ".metadata" or item.suffix == ".json":
            (broken / item.name).write_bytes(item.read_bytes())
    cases = [
        (["--megatron-dir", str(other)], "is not a Megatron torch_dist checkpoint"),
        (["--megatron-dir", str(megatron_dir), "--tp", str(heads + 1)], "is not divisible by"),
        (["--megatron-dir", str(broken)], "verify failed: rank 0:"),
    ]
    for args, message in cases:
        assert main(["verify", "--hf-dir", str(hf_dir), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), err
