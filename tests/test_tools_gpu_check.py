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
    by_part = {line["part"]: line for line in lines[1:]}
    # Packed rows compute fewer tokens than padded rows of the same long-tailed batch.
    packed = by_part["packed_vs_padded"]
    assert packed["packed"]["computed_tokens"] < packed["padded"]["computed_tokens"]
    assert by_part["side_by_side"]["ratio_tokens_per_s"] > 0
    assert code == 0 and len(parts) == 11
