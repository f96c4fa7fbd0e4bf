"""SGLang engine against a schema-checking stand-in server (tests/rollout_fake_sglang.py).

Every endpoint's payload, bucketed tensor and distributed (gloo) weight updates, pause/resume,
restart of a killed server with resync to the current weights version, retry of unfinished requests.
"""

import importlib.util
import json
import pathlib
import sys
import urllib.request

import pytest
import torch
import torch.multiprocessing

from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
from megatron_fipo.rollout.sglang_engine import SGLangEngineConfig, SGLangRolloutEngine
from megatron_fipo.rollout.sglang_server import ServerDied

FAKE = pathlib.Path(__file__).with_name("rollout_fake_sglang.py")
spec = importlib.util.spec_from_file_location("rollout_fake_sglang", FAKE)
fake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake)


@pytest.fixture(scope="module", autouse=True)
def file_system_sharing():
    """CPU tensors cross into an unrelated process through named shared memory (real SGLang gets
    CUDA IPC handles instead); the default fd passing needs a shared multiprocessing authkey."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(previous)


def launcher(die_on_generate=0, delay=0.05, die_on_update=0):
    def command(config, spec):
        cmd = [sys.executable, str(FAKE), "--host", spec.host, "--port", str(spec.port)]
        cmd += ["--tp-size", str(config.tp_size), "--generate-delay", str(delay)]
        if spec.launch_count == 0:  # only the first start of each server crashes
            cmd += [
                "--die-on-generate",
                str(die_on_generate),
                "--die-on-update",
                str(die_on_update),
            ]
        return cmd

    return command


def journal(server):
    with urllib.request.urlopen(server.url + "/fake/journal", timeout=10) as response:
        return json.loads(response.read())


def server_weight(server, name):
    return server.post_ok("/get_weights_by_name", {"name": name, "truncate_size": 1000}, 10)


def expected_tokens(weights, prompt, params):
    state = type("S", (), {"weights": weights})()
    return fake.fake_tokens(state, prompt, params)


def make_requests(count, **sampling):
    return [
        GenerationRequest(
            prompt_token_ids=[i + 1, 2 * i + 5],
            sampling=SamplingParams(**sampling),
            request_id=f"r{i}",
        )
        for i in range(count)
    ]


WEIGHTS = [
    ("model.embed_tokens.weight", torch.arange(12, dtype=torch.float32).reshape(4, 3)),
    ("model.norm.weight", torch.full((3,), 0.5)),
    ("lm_head.weight", torch.ones(4, 3, dtype=torch.bfloat16)),
]


@pytest.fixture(scope="module")
def engine():
    config = SGLangEngineConfig(
        model_path="/unused", num_servers=2, tp_size=2, update_bucket_bytes=60
    )
    with SGLangRolloutEngine(config, launch_command=launcher()) as engine:
        yield engine


def test_generate_payloads_and_samples(engine):
    requests = make_requests(
        4, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=6, stop_token_ids=(38,), seed=3
    )
    samples = engine.generate(requests)
    sent = [e["body"] for s in engine.servers for e in journal(s) if e["path"] == "/generate"]
    assert len(sent) == 4
    # Request i goes to server i mod 2; they go out concurrently, so a server's journal may
    # list its requests in any order.
    for index, server in enumerate(engine.servers):
        got = sorted(e["body"]["input_ids"] for e in journal(server) if e["path"] == "/generate")
        assert got == [r.prompt_token_ids for r in requests[index::2]]
    first = next(body for body in sent if body["input_ids"] == [1, 5])
    assert first == {
        "input_ids": [1, 5],
        "sampling_params": {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_new_tokens": 6,
                            "stop_token_ids": [38], "sampling_seed": 3},
        "return_logprob": True,
    }  # fmt: skip
    for request, sample in zip(requests, samples):
        tokens, log_probs, finish = expected_tokens(
            {}, request.prompt_token_ids, {"max_new_tokens": 6, "stop_token_ids": [38]}
        )
        assert sample.request_id == request.request_id
        assert sample.response_token_ids == tokens
        assert sample.log_probs == pytest.approx(log_probs)
        assert sample.finish_reason == finish["type"]
    assert {s.finish_reason for s in samples} == {"stop", "length"}  # both paths exercised


def test_tensor_update_is_bucketed_and_versioned(engine):
    engine.update_weights(iter(WEIGHTS), version=1)
    for server in engine.servers:
        updates = [e["body"] for e in journal(server) if e["path"] == "/update_weights_from_tensor"]
        # 48 + 12 bytes fit one 60-byte bucket; the bf16 lm_head (24 bytes) goes in a second.
        assert updates == [
            {"flush_cache": False, "num_payloads": 2},
            {"flush_cache": True, "weight_version": "1", "num_payloads": 2},
        ]
        for name, tensor in WEIGHTS:
            assert torch.equal(
                torch.tensor(server_weight(server, name), dtype=tensor.dtype), tensor
            )
    sample = engine.generate(make_requests(1, max_new_tokens=3))[0]
    assert sample.weights_version == 1
    weights = dict(WEIGHTS)
    assert sample.response_token_ids == expected_tokens(weights, [1, 5], {"max_new_tokens": 3})[0]


def test_pause_resume_payloads(engine):
    engine.pause()
    with pytest.raises(RuntimeError, match="paused"):
        engine.generate(make_requests(1))
    engine.resume()
    engine.pause(tags=["kv_cache"])
    engine.resume(tags=["kv_cache"])
    calls = [(e["path"], e["body"]) for e in journal(engine.servers[0])][-6:]
    assert calls == [
        ("/flush_cache", {}), ("/release_memory_occupation", {}), ("/resume_memory_occupation", {}),
        ("/flush_cache", {}), ("/release_memory_occupation", {"tags": ["kv_cache"]}),
        ("/resume_memory_occupation", {"tags": ["kv_cache"]}),
    ]  # fmt: skip
    assert engine.generate(make_requests(1, max_new_tokens=2))[0].finish_reason == "length"
    assert engine.health().healthy


def test_killed_server_is_restarted_and_resynced(engine):
    old = engine.servers[0]
    old.process.kill()
    old.process.wait()
    assert not engine.health().healthy
    samples = engine.generate(make_requests(4, max_new_tokens=3))  # checks weight_version == "1"
    new = engine.servers[0]
    assert new is not old and new.spec.launch_count == 1
    resync = [e["body"] for e in journal(new) if e["path"] == "/update_weights_from_tensor"]
    assert resync[-1]["weight_version"] == "1"
    for name, tensor in WEIGHTS:
        assert torch.equal(torch.tensor(server_weight(new, name), dtype=tensor.dtype), tensor)
    assert all(s.weights_version == 1 for s in samples)


def test_unfinished_requests_are_retried_after_a_crash():
    config = SGLangEngineConfig(model_path="/unused", max_concurrent_requests=6)
    with SGLangRolloutEngine(
        config, launch_command=launcher(die_on_generate=3, delay=0.5)
    ) as engine:
        requests = make_requests(6, max_new_tokens=4)
        samples = engine.generate(requests)
        assert engine.servers[0].spec.launch_count == 1
        retried = [e for e in journal(engine.servers[0]) if e["path"] == "/generate"]
        assert len(retried) >= 4  # the 3rd and later requests at least were lost with the server
        for request, sample in zip(requests, samples):
            assert (
                sample.response_token_ids
                == expected_tokens({}, request.prompt_token_ids, {"max_new_tokens": 4})[0]
            )


def test_crash_during_update_blocks_generation_until_an_update_succeeds():
    config = SGLangEngineConfig(model_path="/unused", update_bucket_bytes=60)
    with SGLangRolloutEngine(config, launch_command=launcher(die_on_update=2)) as engine:
        with pytest.raises(ServerDied):
            engine.update_weights(WEIGHTS, version=1)  # the 2nd bucket kills the server
        with pytest.raises(RuntimeError, match="failed midway"):
            engine.generate(make_requests(1))
        engine.update_weights(WEIGHTS, version=1)  # restarts the dead server first
        assert engine.servers[0].spec.launch_count == 1
        assert engine.generate(make_requests(1, max_new_tokens=2))[0].weights_version == 1


def test_distributed_update_and_resync_over_gloo():
    config = SGLangEngineConfig(
        model_path="/unused", num_servers=2, weight_update_mode="distributed", group_backend="gloo",
        update_bucket_bytes=60,
    )  # fmt: skip
    with SGLangRolloutEngine(config, launch_command=launcher()) as engine:
        inits = [
            e["body"]
            for s in engine.servers
            for e in journal(s)
            if e["path"] == "/init_weights_update_group"
        ]
        assert [b["rank_offset"] for b in inits] == [1, 2] and {b["world_size"] for b in inits} == {
            3
        }
        assert {b["backend"] for b in inits} == {"gloo"}
        engine.update_weights(WEIGHTS, version=7)
        updates = [
            e["body"]
            for e in journal(engine.servers[1])
            if e["path"] == "/update_weights_from_distributed"
        ]
        assert updates[0]["names"] == ["model.embed_tokens.weight", "model.norm.weight"]
        assert updates[0]["dtypes"] == ["float32", "float32"] and updates[0]["shapes"] == [
            [4, 3],
            [3],
        ]
        assert updates[1] | {} == {"names": ["lm_head.weight"], "dtypes": ["bfloat16"], "shapes": [[4, 3]],
                                   "group_name": config.group_name, "flush_cache": True, "weight_version": "7"}  # fmt: skip
        engine.servers[1].process.kill()
        engine.servers[1].process.wait()
        engine.generate(make_requests(2, max_new_tokens=2))
        assert any(e["path"] == "/destroy_weights_update_group" for e in journal(engine.servers[0]))
        for server in engine.servers:
            for name, tensor in WEIGHTS:
                assert torch.equal(
                    torch.tensor(server_weight(server, name), dtype=tensor.dtype), tensor
                )


def test_server_rejects_misspelt_fields_and_engine_reports_it(engine):
    with pytest.raises(RuntimeError, match="unknown field `flush_cahce`"):
        engine.servers[1].post_ok(
            "/update_weights_from_tensor", {"serialized_named_tensors": [], "flush_cahce": True}, 10
        )
    with pytest.raises(RuntimeError, match="bad field `seed`"):
        engine.servers[1].post_ok(
            "/generate", {"input_ids": [1], "sampling_params": {"seed": 1}}, 10
        )
