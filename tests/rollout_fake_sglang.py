"""A test double of an SGLang 0.5.23 server for the CPU tests: its routes, request schemas, response
shapes, and the rules by which it refuses or changes requests.

Run with the engine's own `sglang.launch_server` flags (`--host`, `--port`, `--tp-size`,
`--enable-deterministic-inference`, ...; the rest are accepted and ignored) plus the double's
options: `--die-on-generate N` / `--die-on-update N` (exit on the N-th such request, a crash
mid-request), `--generate-delay S` (time each generation takes), `--startup-delay S`,
`--child-linger S`. The double is our own code; each rule names the file of the sglang 0.5.23
wheel (under `sglang/srt/`) whose behaviour it mirrors. Stricter than SGLang in one way: unknown
request keys are refused everywhere, so a misspelt field cannot pass silently.

The "model" is a fixed function of the prompt and the loaded weights (a distribution over 97
tokens peaked at a token that depends on both); the weights really arrive (unpickled tensors, or
gloo broadcasts) and can be read back with `/get_weights_by_name`. Test-only routes:
`GET /fake/journal` (accepted requests, health checks and finished generations) and
`GET /fake/state`.
"""

import argparse
import base64
import io
import json
import math
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97
MEMORY_TAGS = ["kv_cache", "weights", "cuda_graph"]  # constants.py GPU_MEMORY_ALL_TYPES

# Field name -> (accepted types, required) per route, from the request classes in
# managers/io_struct.py (and, for /generate, api/v1/api_types.py GenerateRequest / SamplingParams).
SAMPLING_FIELDS = {
    "max_new_tokens": int, "stop_token_ids": list, "temperature": (int, float), "top_p": (int, float),
    "top_k": int, "min_p": (int, float), "sampling_seed": int, "ignore_eos": bool, "n": int,
}  # fmt: skip
UPDATE_COMMON = {"flush_cache": (bool, False), "abort_all_requests": (bool, False),
                 "weight_version": (str, False), "load_format": (str, False),
                 "selector": (str, False), "torch_empty_cache": (bool, False)}  # fmt: skip
SCHEMAS = {
    "/generate": {"input_ids": (list, True), "sampling_params": (dict, True),
                  "return_logprob": (bool, False), "rid": (str, False), "stream": (bool, False)},
    "/update_weights_from_tensor": {"serialized_named_tensors": (list, True), **UPDATE_COMMON},
    "/update_weights_from_distributed": {"names": (list, True), "dtypes": (list, True),
                                         "shapes": (list, True), "group_name": (str, False),
                                         **UPDATE_COMMON},
    "/init_weights_update_group": {"master_address": (str, True), "master_port": (int, True),
                                   "rank_offset": (int, True), "world_size": (int, True),
                                   "group_name": (str, False), "backend": (str, False)},
    "/destroy_weights_update_group": {"group_name": (str, False)},
    "/begin_weight_update": {"selector": (str, False)},
    "/end_weight_update": {},
    "/release_memory_occupation": {"tags": (list, False)},
    "/resume_memory_occupation": {"tags": (list, False)},
    "/pause_generation": {"mode": (str, False)},
    "/continue_generation": {"torch_empty_cache": (bool, False)},
    "/flush_cache": {},
    "/get_weights_by_name": {"name": (str, True), "truncate_size": (int, False)},
}  # fmt: skip
UPDATE_ROUTES = ("/update_weights_from_tensor", "/update_weights_from_distributed")


class State:
    def __init__(self, args):
        self.args = args
        self.cond = threading.Condition()
        self.ready = False  # tokenizer_manager server_status: Starting until warm-up is done
        self.weights = {}
        self.version = "default"
        self.released = set()  # weight_updater.py offload_tags
        self.session = False  # weight_updater.py _session
        self.paused = False  # tokenizer_manager.py is_pause (set by /pause_generation)
        self.running = {}  # generations in flight; each holds the model-update reader lock
        self.writers = 0  # updates waiting for or holding the writer lock
        self.groups = {}
        self.journal = []
        self.children = []
        self.num_generates = 0
        self.num_updates = 0

    def log(self, entry):
        with self.cond:
            self.journal.append({**entry, "time": time.time()})


def schema_error(path, body):
    schema = SCHEMAS[path]
    if not isinstance(body, dict):
        return f"{path}: body must be a JSON object"
    for key, value in body.items():
        if key not in schema:
            return f"{path}: unknown field `{key}`"
        if value is not None and not isinstance(value, schema[key][0]):
            return f"{path}: field `{key}` has type {type(value).__name__}"
    missing = [key for key, (_, required) in schema.items() if required and key not in body]
    if missing:
        return f"{path}: missing field(s) {missing}"
    if path == "/generate":
        for key, value in body["sampling_params"].items():
            if key not in SAMPLING_FIELDS or not isinstance(value, SAMPLING_FIELDS[key]):
                return f"sampling_params: bad field `{key}`={value!r}"
        if not all(isinstance(t, int) for t in body["input_ids"]):
            return "input_ids must be a flat list of ints"
    return None


class TensorUnpickler(pickle.Unpickler):
    """Like SGLang's SafeUnpickler (utils/common.py; torch rebuild functions only), plus the CPU
    shared-memory storage rebuild that real SGLang never sees (it gets CUDA IPC handles)."""

    def find_class(self, module, name):
        allowed = module == "builtins" and name in {"list", "tuple", "str", "int"}
        if allowed or module.startswith("torch"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def weights_offset(weights):
    return int(sum(float(t.double().sum()) for t in weights.values())) % VOCAB


def log_softmax(logits):
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits]


def fake_tokens(weights, prompt, params, rng=None):
    """The fake model: token t+1 is drawn from logits peaked at (7 * t + 3 + offset) mod 97, the
    offset a function of the weights. Temperature 0 is greedy (log-probs at temperature 1);
    otherwise top-k / top-p truncate the temperature-scaled distribution and `rng` draws from it.
    Log-probs are of the temperature-scaled distribution before truncation."""
    offset, token = weights_offset(weights), prompt[-1]
    temperature = params.get("temperature", 1.0)
    top_k, top_p = params.get("top_k", -1), params.get("top_p", 1.0)
    stops = set(params.get("stop_token_ids") or [])
    tokens, log_probs = [], []
    finish = {"type": "length", "length": params.get("max_new_tokens", 128)}
    for _ in range(params.get("max_new_tokens", 128)):
        peak = (7 * token + 3 + offset) % VOCAB
        logits = [-0.25 * ((v - peak) % VOCAB) for v in range(VOCAB)]
        if temperature == 0:
            token, lps = peak, log_softmax(logits)
        else:
            lps = log_softmax([x / temperature for x in logits])
            order = sorted(range(VOCAB), key=lambda v: -lps[v])[: top_k if top_k > 0 else VOCAB]
            kept, mass = [], 0.0
            for v in order:
                if mass >= top_p:
                    break
                kept.append(v)
                mass += math.exp(lps[v])
            token = rng.choices(kept, weights=[math.exp(lps[v]) for v in kept])[0]
        tokens.append(token)
        log_probs.append(lps[token])
        if token in stops:
            finish = {"type": "stop", "matched": token}
            break
    return tokens, log_probs, finish


def request_rng(state, params):
    # sampling/sampling_batch_info.py: per-request seeds (None -> 42) reach the sampler only when
    # the server runs with --enable-deterministic-inference; otherwise `sampling_seed` is ignored.
    if state.args.enable_deterministic_inference:
        seed = params.get("sampling_seed")
        return random.Random(42 if seed is None else seed)
    return random.Random(os.urandom(16))


def generate(state, body):
    with state.cond:
        state.num_generates += 1
        if state.num_generates == state.args.die_on_generate:
            os._exit(17)  # dies with this and every other request in flight
        # managers/tokenizer_manager.py generate_request: wait while generation is paused, then
        # hold the model-update reader lock (utils/aio_rwlock.py: queued writers go first).
        state.cond.wait_for(lambda: not state.paused and state.writers == 0)
        if state.released:  # unmapped weights / KV cache: a real server faults, the double refuses
            return 400, {"error": {"message": f"generate with memory released: {state.released}"}}
        flight = {"aborted": False}
        state.running[id(flight)] = flight
    try:
        params = body["sampling_params"]
        tokens, log_probs, finish = fake_tokens(
            state.weights, body["input_ids"], params, request_rng(state, params)
        )
        start, delay = time.monotonic(), state.args.generate_delay
        while (elapsed := time.monotonic() - start) < delay:  # decoding, token by token
            if flight["aborted"]:  # /pause_generation (mode abort) or abort_all_requests
                emitted = int(len(tokens) * elapsed / delay)
                tokens, log_probs = tokens[:emitted], log_probs[:emitted]
                finish = {"type": "abort", "message": "Abort in waiting queue"}
                break
            time.sleep(min(0.01, delay - elapsed))
    finally:
        with state.cond:
            del state.running[id(flight)]
            state.cond.notify_all()
    state.log({"event": "generate_finished", "finish": finish["type"]})
    meta = {"id": "r", "finish_reason": finish, "prompt_tokens": len(body["input_ids"]),
            "weight_version": state.version, "completion_tokens": len(tokens), "cached_tokens": 0}  # fmt: skip
    if body.get("return_logprob"):
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(log_probs, tokens)]
    return 200, {"output_ids": tokens, "meta_info": meta}


def exclusive(state, update):
    """managers/tokenizer_control_mixin.py: weight updates and session calls take the model-update
    writer lock (waiting for every generation in flight) unless generation is paused."""
    with state.cond:
        paused = state.paused
        if not paused:
            state.writers += 1
            state.cond.wait_for(lambda: not state.running)
    try:
        return update()
    finally:
        if not paused:
            with state.cond:
                state.writers -= 1
                state.cond.notify_all()


def update_weights(state, path, body):
    state.num_updates += 1
    if state.num_updates == state.args.die_on_update:
        os._exit(18)
    if not state.session:  # managers/scheduler_components/weight_updater.py
        return 400, {"success": False, "message": f"{path[1:]} must run between "
                     "begin_weight_update() and end_weight_update()"}  # fmt: skip
    if "weights" in state.released:
        # weight_updater.py release_memory_occupation unmaps the weights (torch_memory_saver
        # pause); a real server writing into them faults, the double refuses.
        return 400, {"success": False, "message": "weights memory is released"}
    if body.get("abort_all_requests"):
        abort_all(state)
    if path == "/update_weights_from_tensor":
        named = receive_tensors(state, body["serialized_named_tensors"])
        if isinstance(named, str):
            return 400, {"success": False, "message": named}
    else:
        named = receive_broadcast(state, body)
    state.weights.update(named)
    state.version = body.get("weight_version") or state.version
    return 200, {"success": True, "message": "Succeeded to update model weights."}


def receive_tensors(state, payloads):
    import torch.multiprocessing  # noqa: F401  (the tensor rebuilds the pickles name)

    # managers/tp_worker.py deserialize_own_rank: TP rank r unpickles payloads[r], only its own.
    if len(payloads) != state.args.tp_size:
        return f"{len(payloads)} serialized payloads for {state.args.tp_size} TP ranks"
    ranks = [
        TensorUnpickler(io.BytesIO(base64.b64decode(p, validate=True))).load() for p in payloads
    ]
    if len({tuple(name for name, _ in named) for named in ranks}) != 1:
        return "TP ranks received different tensors"
    # Each TP rank gets the full tensors and takes its own shard of them (model loaders'
    # weight_loader): ranks given different values would hold shards of different models.
    for named in ranks[1:]:
        if not all(torch.equal(a, b) for (_, a), (_, b) in zip(ranks[0], named)):
            return "TP ranks received different values for the same tensors"
    return [(name, tensor.clone()) for name, tensor in ranks[0]]


def receive_broadcast(state, body):
    import torch
    import torch.distributed as dist

    group = state.groups[body.get("group_name", "weight_update_group")]
    received = [torch.empty(s, dtype=getattr(torch, d)) for d, s in zip(body["dtypes"], body["shapes"])]  # fmt: skip
    for handle in [dist.broadcast(t, src=0, group=group, async_op=True) for t in received]:
        handle.wait()
    return list(zip(body["names"], received))


def abort_all(state):
    with state.cond:
        for flight in state.running.values():
            flight["aborted"] = True


def handle_session(state, path, body):
    if path == "/begin_weight_update":  # weight_updater.py begin_weight_update
        if state.session:
            return 400, {"success": False, "message": "a weight-update session is already open"}
        state.session = True
    elif not state.session:  # weight_updater.py end_weight_update
        return 400, {"success": False, "message": "no weight-update session is open"}
    else:
        state.session = False
    return 200, {"success": True, "message": "Success"}


def handle_generation_control(state, path, body):
    if path == "/pause_generation":  # managers/tokenizer_manager.py pause_generation
        if body.get("mode", "abort") != "abort":
            return 400, {"error": {"message": "the double models only mode=abort"}}
        with state.cond:
            state.paused = True
        abort_all(state)
        with state.cond:
            state.cond.wait_for(lambda: not state.running)
        return 200, {"message": "Generation paused successfully.", "status": "ok"}
    with state.cond:  # /continue_generation
        state.paused = False
        state.cond.notify_all()
    return 200, {"message": "Generation continued successfully.", "status": "ok"}


def handle_memory(state, path, body):
    tags = body.get("tags") or MEMORY_TAGS  # weight_updater.py: None or [] means every tag
    with state.cond:
        busy = len(state.running)
        if path == "/flush_cache":  # managers/scheduler.py flush_cache: refused unless idle
            if busy:
                return 400, "Cache not flushed because there are pending requests.\n"
            return 200, "Cache flushed.\n"
        if path == "/release_memory_occupation":
            # weight_updater.py asserts the server is idle (the real scheduler dies on it).
            if busy:
                return 400, {"error": {"message": "release_memory_occupation while not idle"}}
            state.released |= set(tags)
            return 200, None
        missing = [tag for tag in tags if tag not in state.released]
        if missing:  # weight_updater.py resume_memory_occupation: offload_tags.remove(tag)
            return 400, {"error": {"message": f"resume of tags never released: {missing}"}}
        state.released -= set(tags)
        return 200, None


def handle_group(state, path, body):
    name = body.get("group_name", "weight_update_group")
    if path == "/init_weights_update_group":
        if state.args.tp_size != 1:
            return 400, {"success": False, "message": "the double joins one rank per server"}
        sys.path.insert(0, REPO)
        from megatron_fipo.rollout.sglang_server import new_custom_process_group

        state.groups[name] = new_custom_process_group(
            body["master_address"], body["master_port"], body["world_size"],
            body["rank_offset"], name, body.get("backend", "nccl"),
        )  # fmt: skip
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}
    group = state.groups.pop(name, None)
    if group is None:
        return 400, {"success": False, "message": "The group to be destroyed does not exist."}
    import torch.distributed as dist

    dist.destroy_process_group(group)
    return 200, {"success": True, "message": "Succeeded to destroy custom process group."}


def handle(state, path, body):
    """Serve one validated POST; returns (status, JSON-able body)."""
    if path == "/generate":
        return generate(state, body)
    if path in UPDATE_ROUTES:
        return exclusive(state, lambda: update_weights(state, path, body))
    if path in ("/begin_weight_update", "/end_weight_update"):
        return exclusive(state, lambda: handle_session(state, path, body))
    if path in ("/pause_generation", "/continue_generation"):
        return handle_generation_control(state, path, body)
    if path in ("/flush_cache", "/release_memory_occupation", "/resume_memory_occupation"):
        return handle_memory(state, path, body)
    if path in ("/init_weights_update_group", "/destroy_weights_update_group"):
        return handle_group(state, path, body)
    tensor = state.weights.get(body["name"])  # /get_weights_by_name
    if tensor is None:
        return 400, {"error": "no such weight"}
    return 200, tensor[: body.get("truncate_size", 100)].tolist()


def health(state, path):
    """entrypoints/http_server.py health_generate: 503 while starting; `/health` is a plain status
    check only with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false (environ.py, default true),
    otherwise both routes run a one-token generation."""
    if not state.ready:
        return 503
    generation_off = os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower()
    if path == "/health" and generation_off in ("false", "0", "no", "n"):
        return 200
    with state.cond:
        blocked = bool(state.released) or state.paused
        state.journal.append({"event": "health_generation", "released": sorted(state.released)})
    # A generation cannot finish while memory is released or generation is paused: the real
    # server answers 503 after its 20 s health timeout; the double answers at once.
    return 503 if blocked else 200


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body):
            raw = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            except OSError:
                pass  # the client gave up (its timeout); the request ran anyway

        def do_GET(self):
            if self.path in ("/health", "/health_generate"):
                return self.reply(health(state, self.path), None)
            if self.path == "/fake/journal":
                with state.cond:
                    return self.reply(200, list(state.journal))
            if self.path == "/fake/state":
                fields = {"session": state.session, "paused": state.paused,
                          "released": sorted(state.released), "running": len(state.running)}  # fmt: skip
                return self.reply(200, fields)
            return self.reply(404, {"error": self.path})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw) if raw else {}
            if self.path not in SCHEMAS:
                return self.reply(404, {"error": f"no route {self.path}"})
            error = schema_error(self.path, body)
            if error:
                return self.reply(400, {"error": {"message": error}})
            state.log({"path": self.path, "body": summarize(self.path, body)})
            self.reply(*handle(state, self.path, body))

    return Handler


def summarize(path, body):
    if path == "/update_weights_from_tensor":
        return {k: v for k, v in body.items() if k != "serialized_named_tensors"} | {
            "num_payloads": len(body["serialized_named_tensors"])
        }
    return body


def start_up(state):
    """Like `sglang.launch_server`: one scheduler per TP rank and a detokenizer run as children
    (managers/scheduler.py, managers/detokenizer_manager.py), then the server warms up. torch is
    imported on first use only, which keeps the CPU tests' many starts cheap."""
    roles = [f"scheduler_TP{rank}" for rank in range(state.args.tp_size)] + ["detokenizer"]
    for role in roles:
        command = [sys.executable, __file__, "--child", role, "--parent", str(os.getpid())]
        state.children.append(
            subprocess.Popen(command + ["--linger", str(state.args.child_linger)])
        )
    time.sleep(state.args.startup_delay)
    state.ready = True


def child_main(args):
    """A launcher child. Real ones get SIGKILL when the launcher dies (utils/common.py
    kill_itself_when_parent_died), but keep their GPU memory until their exit completes and no one
    waits for that; this child models the window by outliving the launcher by `--linger` s."""
    while os.getppid() == args.parent:
        time.sleep(0.05)
    time.sleep(args.linger)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    parser.add_argument("--die-on-generate", type=int, default=0)
    parser.add_argument("--die-on-update", type=int, default=0)
    parser.add_argument("--generate-delay", type=float, default=0.05)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--child-linger", type=float, default=30.0)
    parser.add_argument("--child", default="")
    parser.add_argument("--parent", type=int, default=0)
    parser.add_argument("--linger", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    if args.child:
        return child_main(args)
    state = State(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    threading.Thread(target=start_up, args=(state,), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
