"""The prepared GPU check runs every part on CPU with ``--smoke`` (tiny sizes), so a broken
part is found here, not in a device lease."""

from __future__ import annotations

import json

from megatron_harness import WorkerWorld


def _smoke(rank, world_size):
    import contextlib
    import io

    from tools.bench import gpu_check

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gpu_check.main(
            [
                "--smoke",
                "--num-layers=2",
                "--seq-len=64",
                "--num-sequences=2",
                "--logprob-tokens=512",
                "--naive-tokens=256",
                "--long-seq-len=256",
                "--long-recompute=full",
                "--rollout-tokens=4",
                "--profile-micro-batch-sizes",
                "1",
                "--packed-lengths",
                "20",
                "200",
                "--packed-sequences=6",
                "--packed-steps=1",
                "--ipc-repeats=2",
            ]
        )
    return code, out.getvalue(), sorted(gpu_check.PARTS)


def test_every_part_runs_in_smoke_mode():
    with WorkerWorld(1) as world:  # a process of its own: the check initialises Megatron
        code, output, parts = world.run(_smoke)[0]
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines[0]["device"] == "cpu (smoke)"
    assert all("error" not in line for line in lines), lines
    seen = {line["part"] for line in lines[1:]}
    # part names in the output: the actor part reports actor_step and sync_rollout
    assert {"cp_scan", "attention", "model_attention", "logprob_memory", "profile"} <= seen
    assert {"actor_step", "sync_rollout", "actor_long", "future_kl_cuda"} <= seen
    assert {"side_by_side", "packed_vs_padded", "packed_attention"} <= seen
    assert {"colocation", "ipc_sync"} <= seen
    by_part = {line["part"]: line for line in lines[1:]}
    # Packed rows compute fewer tokens than padded rows of the same long-tailed batch.
    packed = by_part["packed_vs_padded"]
    assert packed["packed"]["computed_tokens"] < packed["padded"]["computed_tokens"]
    assert by_part["side_by_side"]["ratio_tokens_per_s"] > 0
    _check_colocation(by_part["colocation"])
    _check_ipc_sync(by_part["ipc_sync"])
    assert code == 0 and len(parts) == 13


def _check_colocation(result):
    # CPU: no device memory to read, but every boundary of every phase is recorded.
    assert list(result["free_gib"]) == ["start", "step1", "step2", "final"]
    assert "engine_unmapped" in result["free_gib"]["final"]
    assert all(v is None for phase in result["free_gib"].values() for v in phase.values())
    assert result["generated_tokens"] == [2 * 4] * 3  # 2 sequences x 4 tokens, per generation
    # fp32: after every sync the engine's sampled-token log-probs are the actor's up to the
    # rounding tolerance, while each train step moved its batch's far more than that (an
    # engine left with the previous weights is ~10x off the tolerance here).
    tolerances = result["logprob_tolerance"]
    assert all(
        diff <= tol for diff, tol in zip(result["logprob_diff_max"], tolerances, strict=True)
    )
    assert min(result["train_logprob_shift_mean"]) > 10 * max(tolerances)
    assert len(result["sync_s"]) == 3 and result["sync_gb"] > 0


def _check_ipc_sync(result):
    # The engine process saw its own initialisation first, then exactly the actor's weights.
    assert result["mismatched_before"] > 0
    assert result["mismatched_after"] == 0 and result["unwritten"] == []
    assert result["bit_for_bit"] is True
    assert result["push_gb_per_s"] > 0 and result["ratio_vs_copy"] > 0
