"""A stand-in SGLang server for CPU tests: SGLang 0.5.23's request schemas, response shapes, routes.

Run as `python tests/rollout_fake_sglang.py --host H --port P [--die-on-generate N]
[--die-on-update N]` (exit on the N-th such request, as a crash mid-request). It validates
every payload against the field names and types of SGLang's request dataclasses
(`srt/managers/io_struct.py`, `api/v1/api_types.py`) -- stricter than SGLang in one way: unknown
keys are refused everywhere, so a misspelt field cannot pass silently. The "model" is a fixed
function of the prompt and the loaded weights; the weights really arrive (unpickled tensors, or
gloo broadcasts on the distributed path) and can be read back with `/get_weights_by_name`.
`GET /fake/journal` returns the paths and payload summaries it accepted (a test-only route).
"""

import argparse
import base64
import io
import json
import os
import pickle
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_fipo.rollout.sglang_server import new_custom_process_group  # noqa: E402

OPT = object()  # marks an optional field

# Field name -> (accepted types, required) per route, from SGLang's request dataclasses.
SAMPLING_FIELDS = {
    "max_new_tokens": int, "stop_token_ids": list, "temperature": (int, float), "top_p": (int, float),
    "top_k": int, "min_p": (int, float), "sampling_seed": int, "ignore_eos": bool, "n": int,
}  # fmt: skip
SCHEMAS = {
    "/generate": {"input_ids": (list, True), "sampling_params": (dict, True),
                  "return_logprob": (bool, False), "rid": (str, False), "stream": (bool, False)},
    "/update_weights_from_tensor": {"serialized_named_tensors": (list, True), "load_format": (str, False),
                                    "flush_cache": (bool, False), "abort_all_requests": (bool, False),
                                    "weight_version": (str, False)},
    "/init_weights_update_group": {"master_address": (str, True), "master_port": (int, True),
                                   "rank_offset": (int, True), "world_size": (int, True),
                                   "group_name": (str, False), "backend": (str, False)},
    "/update_weights_from_distributed": {"names": (list, True), "dtypes": (list, True), "shapes": (list, True),
                                         "group_name": (str, False), "flush_cache": (bool, False),
                                         "abort_all_requests": (bool, False), "weight_version": (str, False),
                                         "load_format": (str, False)},
    "/destroy_weights_update_group": {"group_name": (str, False)},
    "/release_memory_occupation": {"tags": (list, False)},
    "/resume_memory_occupation": {"tags": (list, False)},
    "/flush_cache": {},
    "/get_weights_by_name": {"name": (str, True), "truncate_size": (int, False)},
}  # fmt: skip


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.weights: dict[str, torch.Tensor] = {}
        self.version = "default"
        self.released = False
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.journal: list[dict] = []
        self.num_generates = 0
        self.num_updates = 0


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
    """Like SGLang's SafeUnpickler (torch rebuild functions only), plus the CPU shared-memory
    storage rebuild that real SGLang never sees (it gets CUDA IPC handles)."""

    def find_class(self, module, name):
        if (
            module == "builtins"
            and name in {"list", "tuple", "str", "int"}
            or module.startswith("torch")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def fake_tokens(state, prompt, params):
    """The fake model: token t+1 = (7 * token t + 3 + offset) mod 97, offset from the weights."""
    offset = int(sum(float(t.double().sum()) for t in state.weights.values())) % 97
    tokens, log_probs, token = [], [], prompt[-1]
    stops = set(params.get("stop_token_ids") or [])
    finish = {"type": "length", "length": params.get("max_new_tokens", 128)}
    for _ in range(params.get("max_new_tokens", 128)):
        token = (7 * token + 3 + offset) % 97
        tokens.append(token)
        log_probs.append(-0.01 * (token + 1))
        if token in stops:
            finish = {"type": "stop", "matched": token}
            break
    return tokens, log_probs, finish


def handle(state, path, body):
    """Serve one validated request; returns (status, JSON-able body)."""
    if path == "/generate":
        with state.lock:
            state.num_generates += 1
            if state.num_generates == state.args.die_on_generate:
                os._exit(17)  # dies with this and every other request in flight
        if state.released:
            return 400, {"error": {"message": "generate while memory is released"}}
        time.sleep(state.args.generate_delay)
        tokens, log_probs, finish = fake_tokens(state, body["input_ids"], body["sampling_params"])
        meta = {"id": "r", "finish_reason": finish, "prompt_tokens": len(body["input_ids"]),
                "weight_version": state.version, "completion_tokens": len(tokens), "cached_tokens": 0}  # fmt: skip
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(log_probs, tokens)]
            meta["output_token_logprobs_length"] = len(tokens)
        return 200, {"output_ids": tokens, "meta_info": meta}
    return handle_weights(state, path, body)


def handle_weights(state, path, body):
    """The weight, memory and cache routes."""
    if path == "/update_weights_from_tensor":
        state.num_updates += 1
        if state.num_updates == state.args.die_on_update:
            os._exit(18)
        if len(body["serialized_named_tensors"]) != state.args.tp_size:
            return 400, {"success": False, "message": "need one payload per TP rank"}
        for payload in body["serialized_named_tensors"]:
            named = TensorUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
        for name, tensor in named:
            state.weights[name] = tensor.clone()
        state.version = body.get("weight_version") or state.version
        return 200, {"success": True, "message": "Succeeded to update model weights."}
    if path == "/init_weights_update_group":
        rank = body["rank_offset"]  # TP size 1 in the fake
        state.groups[body.get("group_name", "weight_update_group")] = new_custom_process_group(
            body["master_address"], body["master_port"], body["world_size"], rank,
            body.get("group_name", "weight_update_group"), body.get("backend", "nccl"),
        )  # fmt: skip
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}
    if path == "/update_weights_from_distributed":
        group = state.groups[body.get("group_name", "weight_update_group")]
        received = [
            torch.empty(s, dtype=getattr(torch, d)) for d, s in zip(body["dtypes"], body["shapes"])
        ]
        for handle_ in [dist.broadcast(t, src=0, group=group, async_op=True) for t in received]:
            handle_.wait()
        state.weights.update(zip(body["names"], received))
        state.version = body.get("weight_version") or state.version
        return 200, {"success": True, "message": "Succeeded to update parameter online."}
    if path == "/destroy_weights_update_group":
        group = state.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        dist.destroy_process_group(group)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
    if path in ("/release_memory_occupation", "/resume_memory_occupation"):
        state.released = path.startswith("/release")
        return 200, None
    if path == "/flush_cache":
        return 200, "Cache flushed.\n"
    if path == "/get_weights_by_name":
        tensor = state.weights.get(body["name"])
        return (
            (400, {"error": "no such weight"})
            if tensor is None
            else (200, tensor[: body.get("truncate_size", 100)].tolist())
        )
    return 404, {"error": f"no route {path}"}


def summarize(path, body):
    if path == "/update_weights_from_tensor":
        return {k: v for k, v in body.items() if k != "serialized_named_tensors"} | {
            "num_payloads": len(body["serialized_named_tensors"])
        }
    return body


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body):
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path == "/health":
                return self.reply(200, None)
            if self.path == "/fake/journal":
                return self.reply(200, state.journal)
            return self.reply(404, {"error": self.path})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw) if raw else {}
            if self.path not in SCHEMAS:
                return self.reply(404, {"error": f"no route {self.path}"})
            error = schema_error(self.path, body)
            if error:
                return self.reply(400, {"error": {"message": error}})
            with state.lock:
                state.journal.append({"path": self.path, "body": summarize(self.path, body)})
            self.reply(*handle(state, self.path, body))

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--die-on-generate", type=int, default=0)
    parser.add_argument("--die-on-update", type=int, default=0)
    parser.add_argument("--generate-delay", type=float, default=0.05)
    args, _ = parser.parse_known_args()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(State(args)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
