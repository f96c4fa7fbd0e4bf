"""SGLang engine against a test double of an sglang 0.5.23 server (tests/rollout_fake_sglang.py),
launched with the engine's real `sglang.launch_server` flags.

Payloads, bucketed tensor and distributed (gloo) weight updates inside begin/end sessions,
generation paused around updates and releases (requests left running are aborted), health checks
that never generate while memory is released, seeds that hold only with deterministic inference,
staging on each TP rank's own GPU, restart of a killed server's whole process tree with resync to
the current weights version, retry of unfinished requests.
"""

import importlib.util
import json
import pathlib
import sys
import time
import urllib.request

import psutil
import pytest
import torch
import torch.multiprocessing

from megatron_fipo.config import RolloutConfig, SGLangServerConfig
from megatron_fipo.rollout import sglang_engine as se
from megatron_fipo.rollout import sglang_server as ss
from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams


def rollout(**fields):
    """The run's rollout section, as the engine receives it (SGLang, colocated by default)."""
    return RolloutConfig(engine="sglang", **fields)


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


def launcher(die_on_generate=0, delay=0.05, die_on_update=0, **options):
    """The engine's own launch command with the double in place of `-m sglang.launch_server`."""

    def command(config, spec):
        real = se.default_launch_command(config, spec)
        assert real[1:3] == ["-m", "sglang.launch_server"]
        cmd = [sys.executable, str(FAKE), *real[3:], "--generate-delay", str(delay)]
        for name, value in options.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        if spec.launch_count == 0:  # only the first start of each server crashes
            cmd += [
                "--die-on-generate",
                str(die_on_generate),
                "--die-on-update",
                str(die_on_update),
            ]
        return cmd

    return command


def journal(server, key="path"):
    with urllib.request.urlopen(server.url + "/fake/journal", timeout=10) as response:
        return [entry for entry in json.loads(response.read()) if key in entry]


def fake_state(server):
    with urllib.request.urlopen(server.url + "/fake/state", timeout=10) as response:
        return json.loads(response.read())


def server_weight(server, name):
    return server.post_ok("/get_weights_by_name", {"name": name, "truncate_size": 1000}, 10)


def greedy_tokens(weights, prompt, params):
    return fake.fake_tokens(weights, prompt, {"temperature": 0.0, **params})


def make_requests(count, **sampling):
    return [
        GenerationRequest(
            prompt_token_ids=[i + 1, 2 * i + 5],
            sampling=SamplingParams(**sampling),
            request_id=f"r{i}",
        )
        for i in range(count)
    ]


def tree(server):
    return [server.process.pid] + [p.pid for p in psutil.Process(server.process.pid).children()]


def running(pids):
    """Pids still running (a zombie has released everything)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


WEIGHTS = [
    ("model.embed_tokens.weight", torch.arange(12, dtype=torch.float32).reshape(4, 3)),
    ("model.norm.weight", torch.full((3,), 0.5)),
    ("lm_head.weight", torch.ones(4, 3, dtype=torch.bfloat16)),
]
SESSION = ["/pause_generation", "/begin_weight_update"]
CLOSE = ["/end_weight_update", "/continue_generation"]


@pytest.fixture(scope="module")
def engine():
    config = se.SGLangEngineConfig(
        model_path="/unused",
        num_servers=2,
        base_gpu_id=4,
        rollout=rollout(engine_tensor_parallel_size=2, weight_sync_bucket_bytes=60),
    )
    with se.SGLangRolloutEngine(config, launch_command=launcher()) as engine:
        yield engine


def test_generate_payloads_and_samples(engine):
    requests = make_requests(
        4, temperature=0.0, top_p=0.9, top_k=5, max_new_tokens=6, stop_token_ids=(38,), seed=3
    )
    with pytest.warns(RuntimeWarning, match="ignores per-request seeds"):
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
        "sampling_params": {"temperature": 0.0, "top_p": 0.9, "top_k": 5, "max_new_tokens": 6,
                            "stop_token_ids": [38], "sampling_seed": 3},
        "return_logprob": True,
    }  # fmt: skip
    for request, sample in zip(requests, samples):
        tokens, log_probs, finish = greedy_tokens(
            {}, request.prompt_token_ids, {"max_new_tokens": 6, "stop_token_ids": [38]}
        )
        assert sample.request_id == request.request_id
        assert sample.response_token_ids == tokens
        assert sample.log_probs == pytest.approx(log_probs)
        assert sample.finish_reason == finish["type"]
    assert {s.finish_reason for s in samples} == {"stop", "length"}  # both paths exercised


def test_tensor_update_runs_in_a_session_bucketed_and_versioned(engine):
    engine.update_weights(iter(WEIGHTS), version=1)
    for server in engine.servers:
        calls = [e["path"] for e in journal(server) if e["path"] != "/generate"]
        assert calls == SESSION + ["/update_weights_from_tensor"] * 2 + CLOSE
        updates = [e["body"] for e in journal(server) if e["path"] == "/update_weights_from_tensor"]
        # 48 + 12 bytes fit one 60-byte bucket; the bf16 lm_head (24 bytes) goes in a second.
        # One payload per TP rank; each rank reads only its own (tp_worker.deserialize_own_rank).
        assert updates == [
            {"flush_cache": False, "num_payloads": 2},
            {"flush_cache": True, "weight_version": "1", "num_payloads": 2},
        ]
        for name, tensor in WEIGHTS:
            assert torch.equal(
                torch.tensor(server_weight(server, name), dtype=tensor.dtype), tensor
            )
    sample = engine.generate(make_requests(1, temperature=0.0, max_new_tokens=3))[0]
    assert sample.weights_version == 1
    weights = dict(WEIGHTS)
    assert sample.response_token_ids == greedy_tokens(weights, [1, 5], {"max_new_tokens": 3})[0]


def test_the_double_refuses_updates_outside_a_session(engine):
    server = engine.servers[0]
    payload = {"serialized_named_tensors": [ss.serialize_named_tensors(WEIGHTS[:1])] * 2}
    with pytest.raises(RuntimeError, match=r"\(400\).*between begin_weight_update"):
        server.post_ok("/update_weights_from_tensor", payload, 10)


def test_failed_bucket_still_ends_the_session(engine):
    def failing_stream():
        yield from WEIGHTS  # buckets [embed, norm] and [lm_head, ...]: the first one is posted
        yield "model.layers.0.weight", torch.zeros(12)  # closes the second bucket
        raise OSError("gather from the trainer failed")

    with pytest.raises(OSError, match="gather from the trainer failed"):
        engine.update_weights(failing_stream(), version=2)
    for server in engine.servers:
        assert fake_state(server) == {
            "session": False, "paused": False, "released": [], "running": 0
        }  # fmt: skip
        assert [e["path"] for e in journal(server)][-3:] == ["/update_weights_from_tensor", *CLOSE]
    with pytest.raises(RuntimeError, match="failed midway"):
        engine.generate(make_requests(1))
    engine.update_weights(WEIGHTS, version=1)
    assert engine.generate(make_requests(1, max_new_tokens=2))[0].weights_version == 1


def test_staging_is_on_each_ranks_own_gpu(engine, monkeypatch):
    assert se.staging_devices(3, 2, cuda_available=True) == [
        torch.device("cuda", 3),
        torch.device("cuda", 4),
    ]
    assert se.staging_devices(3, 2, cuda_available=False) == [None, None]
    calls = []

    def recorded(base_gpu_id, tp_size, cuda_available):
        calls.append((base_gpu_id, tp_size))
        return [None] * tp_size  # no GPU here: what the function itself returns without CUDA

    monkeypatch.setattr(se, "staging_devices", recorded)
    engine.update_weights(WEIGHTS, version=1)
    assert calls == [(4, 2), (6, 2)]  # server i's first GPU: base_gpu_id + i * tp_size


def test_sglang_engine_config_from_the_run_config(monkeypatch):
    from megatron_fipo.cluster.workers import _sglang_engine_config
    from megatron_fipo.config import load_config

    overrides = ["rollout.deterministic_inference=true", "rollout.engine_tensor_parallel_size=2"]
    config = load_config(pathlib.Path(__file__).parents[1] / "configs/tiny-cpu.yaml", overrides)
    monkeypatch.setenv("FIPO_GPU_IDS", "6,7")
    built = _sglang_engine_config(config, "/models/policy")
    assert (built.base_gpu_id, built.tp_size, built.deterministic_inference) == (6, 2, True)
    assert "--enable-deterministic-inference" in se.default_launch_command(
        built, ss.ServerSpec(index=0, host="h", port=1, base_gpu_id=6, launch_count=0)
    )


def test_default_launch_needs_the_pinned_sglang(monkeypatch):
    engine = se.SGLangRolloutEngine(se.SGLangEngineConfig(model_path="/m"))

    def missing(name):
        raise ss.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ss.importlib.metadata, "version", missing)
    with pytest.raises(RuntimeError, match=r"needs sglang==0\.5\.23 in this interpreter"):
        engine.start()
    monkeypatch.setattr(ss.importlib.metadata, "version", lambda name: "0.5.22")
    with pytest.raises(RuntimeError, match=r"sglang 0\.5\.22 is installed"):
        engine.start()
    assert engine.servers == []


def test_pause_resume_payloads_and_health(engine):
    engine.pause()
    health = engine.health()  # no generation check while memory is released
    assert health.healthy and health.paused, health.detail
    with pytest.raises(RuntimeError, match="paused"):
        engine.generate(make_requests(1))
    with pytest.raises(RuntimeError, match="resume"):
        engine.update_weights(WEIGHTS, version=1)
    engine.resume()
    engine.pause(tags=["kv_cache"])
    with pytest.raises(ValueError, match=r"cannot resume memory tags \['weights'\]"):
        engine.resume(tags=["weights"])
    engine.resume(tags=["kv_cache"])
    calls = [(e["path"], e["body"]) for e in journal(engine.servers[0])][-10:]
    everything = {"tags": ["kv_cache", "weights", "cuda_graph"]}
    assert calls == [
        ("/pause_generation", {"mode": "abort"}), ("/flush_cache", {}),
        ("/release_memory_occupation", everything), ("/resume_memory_occupation", everything),
        ("/continue_generation", {}),
        ("/pause_generation", {"mode": "abort"}), ("/flush_cache", {}),
        ("/release_memory_occupation", {"tags": ["kv_cache"]}),
        ("/resume_memory_occupation", {"tags": ["kv_cache"]}), ("/continue_generation", {}),
    ]  # fmt: skip
    # The generation check ran only while memory was held.
    checks = journal(engine.servers[0], key="event")
    assert all(not e["released"] for e in checks if e["event"] == "health_generation")
    before = len([e for e in checks if e["event"] == "health_generation"])
    assert engine.health().healthy
    after = [e for e in journal(engine.servers[0], "event") if e["event"] == "health_generation"]
    assert len(after) == before + 1
    assert engine.generate(make_requests(1, max_new_tokens=2))[0].finish_reason == "length"


def test_health_is_503_while_the_server_starts():
    config = se.SGLangEngineConfig(model_path="/unused")
    spec_ = ss.ServerSpec(index=0, host="127.0.0.1", port=ss.free_port(), base_gpu_id=0, launch_count=0)  # fmt: skip
    server = ss.SGLangServer(spec_, launcher(startup_delay=1.0)(config, spec_), env=se.SERVER_ENV)
    try:
        deadline = time.monotonic() + 60
        while (state := server.liveness()) == "unreachable" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state == "starting"
        server.wait_healthy(60)
        assert server.liveness() == "up"
    finally:
        server.kill()


def test_seeds_hold_only_with_deterministic_inference(engine):
    requests = make_requests(4, temperature=1.0, max_new_tokens=8, seed=11)
    config = se.SGLangEngineConfig(
        model_path="/unused", num_servers=2, rollout=rollout(deterministic_inference=True)
    )
    with se.SGLangRolloutEngine(config, launch_command=launcher()) as deterministic:
        first = {s.request_id: s.response_token_ids for s in deterministic.generate(requests)}
        # Rotated by one, every request goes to the other server: a later call on another
        # process, as after a resume, samples the same tokens.
        again = deterministic.generate(requests[1:] + requests[:1])
        assert {s.request_id: s.response_token_ids for s in again} == first
    # Without --enable-deterministic-inference SGLang ignores sampling_seed: the same seeded
    # requests sample differently (0.22 is the largest token probability: a repeat of all 32
    # draws is below 0.22 ** 32).
    first, second = ([s.response_token_ids for s in engine.generate(requests)] for _ in range(2))
    assert first != second


def test_server_rejects_misspelt_fields_and_engine_reports_it(engine):
    server = engine.servers[1]
    with pytest.raises(RuntimeError, match="unknown field `flush_cahce`"):
        server.post_ok(
            "/update_weights_from_tensor", {"serialized_named_tensors": [], "flush_cahce": 1}, 10
        )
    with pytest.raises(RuntimeError, match="bad field `seed`"):
        server.post_ok("/generate", {"input_ids": [1], "sampling_params": {"seed": 1}}, 10)


def test_killed_server_is_restarted_as_a_whole_tree_and_resynced(engine):
    old = engine.servers[0]
    old_tree = tree(old)
    assert len(old_tree) == 4  # launcher, a scheduler per TP rank, the detokenizer
    old.process.kill()  # the launcher alone crashes; its children outlive it for a while
    old.process.wait()
    assert not engine.health().healthy
    samples = engine.generate(make_requests(4, max_new_tokens=3))  # checks weight_version == "1"
    new = engine.servers[0]
    assert new is not old and new.spec.launch_count == 1
    assert running(old_tree) == []  # nothing of the old tree still holds its GPUs
    resync = [e["path"] for e in journal(new) if e["path"] != "/generate"]
    assert resync == SESSION + ["/update_weights_from_tensor"] * 2 + CLOSE
    for name, tensor in WEIGHTS:
        assert torch.equal(torch.tensor(server_weight(new, name), dtype=tensor.dtype), tensor)
    assert all(s.weights_version == 1 for s in samples)
    trees = [pid for server in engine.servers for pid in tree(server)]
    engine.shutdown()
    assert running(trees) == []


def test_requests_left_running_are_aborted_before_release_and_update():
    config = se.SGLangEngineConfig(model_path="/unused")
    with se.SGLangRolloutEngine(config, launch_command=launcher(delay=60.0)) as engine:
        server = engine.servers[0]
        payload = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4}}
        for attempt in ("release", "update"):
            for _ in range(2):
                with pytest.raises(ss.ServerDied, match="timed out"):
                    server.request("POST", "/generate", payload, timeout_s=0.3)
            assert fake_state(server)["running"] == 2  # the client gave up; the requests did not
            start = time.monotonic()
            if attempt == "release":
                engine.pause()  # SGLang refuses a flush or release while requests are running
                engine.resume()
            else:
                engine.update_weights(WEIGHTS, version=1)
            assert time.monotonic() - start < 30  # it did not wait for the 60 s requests
        finishes = [e["finish"] for e in journal(server, key="event") if "finish" in e]
        assert finishes == ["abort"] * 4
        assert fake_state(server) == {
            "session": False, "paused": False, "released": [], "running": 0
        }  # fmt: skip


def test_unfinished_requests_are_retried_after_a_crash():
    config = se.SGLangEngineConfig(
        model_path="/unused", rollout=rollout(sglang=SGLangServerConfig(max_concurrent_requests=6))
    )
    with se.SGLangRolloutEngine(
        config, launch_command=launcher(die_on_generate=3, delay=0.5)
    ) as engine:
        requests = make_requests(6, temperature=0.0, max_new_tokens=4)
        samples = engine.generate(requests)
        assert engine.servers[0].spec.launch_count == 1
        retried = [e for e in journal(engine.servers[0]) if e["path"] == "/generate"]
        assert len(retried) >= 4  # the 3rd and later requests at least were lost with the server
        for request, sample in zip(requests, samples):
            expected = greedy_tokens({}, request.prompt_token_ids, {"max_new_tokens": 4})[0]
            assert sample.response_token_ids == expected


def test_crash_during_update_blocks_generation_until_an_update_succeeds():
    config = se.SGLangEngineConfig(
        model_path="/unused", rollout=rollout(weight_sync_bucket_bytes=60)
    )
    with se.SGLangRolloutEngine(config, launch_command=launcher(die_on_update=2)) as engine:
        with pytest.raises(ss.ServerDied):
            engine.update_weights(WEIGHTS, version=1)  # the 2nd bucket kills the server
        with pytest.raises(RuntimeError, match="failed midway"):
            engine.generate(make_requests(1))
        engine.update_weights(WEIGHTS, version=1)  # restarts the dead server first
        assert engine.servers[0].spec.launch_count == 1
        assert engine.generate(make_requests(1, max_new_tokens=2))[0].weights_version == 1


@pytest.mark.timeout(180)  # without the session, the driver's broadcast waits for gloo's timeout
def test_distributed_update_and_resync_over_gloo():
    config = se.SGLangEngineConfig(
        model_path="/unused", num_servers=2, weight_update_mode="distributed", group_backend="gloo",
        rollout=rollout(weight_sync_bucket_bytes=60),
    )  # fmt: skip
    with se.SGLangRolloutEngine(config, launch_command=launcher()) as engine:
        inits = [e["body"] for s in engine.servers for e in journal(s)]
        assert [b["rank_offset"] for b in inits] == [1, 2]
        assert {(b["world_size"], b["backend"]) for b in inits} == {(3, "gloo")}
        engine.update_weights(WEIGHTS, version=7)
        calls = [e for e in journal(engine.servers[1])][1:]
        assert [e["path"] for e in calls] == (
            SESSION + ["/update_weights_from_distributed"] * 2 + CLOSE
        )
        updates = [e["body"] for e in calls if e["path"] == "/update_weights_from_distributed"]
        assert updates[0] | {"flush_cache": False} == {
            "names": ["model.embed_tokens.weight", "model.norm.weight"],
            "dtypes": ["float32", "float32"], "shapes": [[4, 3], [3]],
            "group_name": config.group_name, "flush_cache": False,
        }  # fmt: skip
        assert updates[1] == {"names": ["lm_head.weight"], "dtypes": ["bfloat16"], "shapes": [[4, 3]],
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
        # A bucket refused outside a session: the driver stops broadcasting at once instead of
        # waiting for the group's 10-minute timeout, and refuses to use the group again.
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="refused a weight bucket"):
            engine._push_distributed(engine.servers, WEIGHTS, 8)
        assert time.monotonic() - start < 60
        with pytest.raises(RuntimeError, match="restart the engine"):
            engine.update_weights(WEIGHTS, version=8)
