"""Our SGLang client and GPU pins against the source and metadata of the pinned sglang wheel.

The wheel (about 40 MB) is downloaded once (`pip download --no-deps`) into `.cache/` and read as a
zip: its files are parsed with `ast`, sglang is never imported. Checked: every route our client
calls exists with the method it uses; every field of the test double's request schemas (which
refuses any other field the client sends) is a field of the real request class; the `/generate`
and sampling fields the client builds; the launch flags, the environment switch and the memory
tags; and that requirements/gpu-constraints.txt and setup.cfg agree with the wheel's
Requires-Dist. Without network access to PyPI the wheel tests skip, saying so.
"""

import ast
import configparser
import importlib.util
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from megatron_fipo.cluster import engine_links as links
from megatron_fipo.config import RolloutConfig
from megatron_fipo.rollout import sglang_engine as se
from megatron_fipo.rollout import sglang_launch as sl
from megatron_fipo.rollout import sglang_server as ss
from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams

REPO = pathlib.Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "gpu-constraints.txt"
CACHE = REPO / ".cache" / f"sglang-{se.SGLANG_VERSION}"
FAKE = REPO / "tests" / "rollout_fake_sglang.py"
# The platform the GPU set is for (Linux x86_64, CPython 3.11): evaluates Requires-Dist markers.
GPU_PLATFORM = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                "python_version": "3.11", "python_full_version": "3.11.7", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "extra": ""}  # fmt: skip


def constraint_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"line {number}: not a pin: {line}"
        assert requirement.name not in pins, f"line {number}: {requirement.name} pinned twice"
        pins[canonical(requirement.name)] = Version(specs[0].version)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_requirements() -> dict[str, list[Requirement]]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")

    def parse(value: str) -> list[Requirement]:
        lines = [line.split("#", 1)[0].strip() for line in value.splitlines()]
        return [Requirement(line) for line in lines if line]

    sections = {"install_requires": parse(parser["options"]["install_requires"])}
    for extra, value in parser["options.extras_require"].items():
        sections[extra] = parse(value)
    return sections


def test_gpu_constraints_pin_the_set():
    pins = constraint_pins()
    needed = {"torch", "transformers", "sglang", "megatron-core", "transformer-engine",
              "transformer-engine-torch", "transformer-engine-cu13"}  # fmt: skip
    assert needed <= set(pins), f"not pinned: {sorted(needed - set(pins))}"
    assert pins["sglang"] == Version(se.SGLANG_VERSION)  # the protocol the client speaks
    te = {pins[name] for name in pins if name.startswith("transformer-engine")}
    assert len(te) == 1, f"TransformerEngine packages pinned to different versions: {te}"


def test_setup_cfg_agrees_with_the_gpu_set_and_the_cpu_torch():
    pins = constraint_pins()
    for section, requirements in setup_requirements().items():
        for requirement in requirements:
            pin = pins.get(canonical(requirement.name))
            if pin is not None:
                assert requirement.specifier.contains(pin, prereleases=True), (
                    f"setup.cfg {section}: {requirement} excludes the GPU pin {pin}"
                )
    # The CPU set-up installs its local torch first; install_requires must keep it.
    cpu_torch = re.search(r'install "torch==([^"]+)"', (REPO / "scripts/setup_venv.sh").read_text())
    torch = next(r for r in setup_requirements()["install_requires"] if r.name == "torch")
    assert torch.specifier.contains(cpu_torch.group(1)), f"{torch} excludes the CPU torch"


# ----- the pinned wheel -----


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    found = sorted(CACHE.glob(f"sglang-{se.SGLANG_VERSION}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-d", str(CACHE), f"sglang=={se.SGLANG_VERSION}"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        found = sorted(CACHE.glob(f"sglang-{se.SGLANG_VERSION}-*.whl"))
        if done.returncode != 0 or not found:
            pytest.skip(
                f"could not download sglang=={se.SGLANG_VERSION} from PyPI (no network?): "
                f"{done.stderr.strip().splitlines()[-1:]}"
            )
    assert found[0].stat().st_size < 200 * 1024**2, "the sglang wheel should be tens of MB"
    return zipfile.ZipFile(found[0])


def source(wheel: zipfile.ZipFile, path: str) -> ast.Module:
    return ast.parse(wheel.read(f"sglang/{path}").decode())


def classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def fields(tree: ast.Module, name: str) -> dict[str, ast.expr]:
    """Annotated fields of class `name` and of its bases defined in the same module."""
    found = classes(tree)
    cls = found[name]
    result: dict[str, ast.expr] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in found:
            result |= fields(tree, base.id)
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            result[node.target.id] = node.annotation
    return result


def literal_values(annotation: ast.expr) -> set[str] | None:
    """The values of a `Literal[...]` annotation, None for any other type."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Literal":
        return {
            ast.literal_eval(e) for e in ast.walk(annotation.slice) if isinstance(e, ast.Constant)
        }
    return None


def routes(wheel: zipfile.ZipFile) -> dict[str, tuple[set[str], str | None]]:
    """HTTP route -> (methods, request class of its body) from entrypoints/http_server.py."""
    found: dict[str, tuple[set[str], str | None]] = {}
    for node in source(wheel, "srt/entrypoints/http_server.py").body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body_class = None
        for arg in node.args.args:
            text = ast.unparse(arg.annotation) if arg.annotation else ""
            match = re.fullmatch(r"Annotated\[(\w+), Body\(\)\]|(\w+ReqInput)", text)
            if match:
                body_class = match.group(1) or match.group(2)
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)):
                continue
            kind, args = decorator.func.attr, decorator.args
            if kind not in ("get", "post", "api_route") or not args:
                continue
            if not isinstance(args[0], ast.Constant):
                continue
            methods = {kind.upper()}
            for keyword in decorator.keywords:
                if keyword.arg == "methods":
                    methods = set(ast.literal_eval(keyword.value))
            found[args[0].value] = (methods, body_class)
    return found


def client_calls() -> set[tuple[str, str]]:
    """(method, route) of every HTTP call in our client, read from its source."""
    calls, literals = set(), set()
    # The engine, its launch settings, its servers, and the training ranks' links (they post
    # weight buckets).
    for module in (se, sl, ss, links):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"/[a-z_]+", node.value):
                    literals.add(node.value)
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func).rsplit(".", 1)[-1]
            constants = [a.value for a in node.args if isinstance(a, ast.Constant)]
            paths = [c for c in constants if isinstance(c, str) and c.startswith("/")]
            if name == "request" and len(constants) >= 2 and constants[0] in ("GET", "POST"):
                calls.add((constants[0], constants[1]))
            posts = name in ("post_ok", "call_each") or (
                name == "submit" and ast.unparse(node.args[0]).endswith("post_ok")
            )
            if posts and paths:
                calls.add(("POST", paths[0]))
    # Routes built elsewhere (e.g. a path variable) would escape the check: there are none.
    assert literals == {path for _, path in calls}, literals ^ {path for _, path in calls}
    return calls


def test_every_route_the_client_calls_exists(wheel):
    served = routes(wheel)
    calls = client_calls()
    expected = {"/generate", "/begin_weight_update", "/update_weights_from_tensor",
                "/update_weights_from_distributed", "/end_weight_update", "/pause_generation",
                "/release_memory_occupation", "/health", "/health_generate"}  # fmt: skip
    assert expected <= {path for _, path in calls}, calls  # the scan finds the calls
    for method, path in sorted(calls):
        assert path in served, f"sglang {se.SGLANG_VERSION} has no route {path}"
        assert method in served[path][0], f"{path} does not accept {method}: {served[path][0]}"


def test_request_fields_exist_in_the_release(wheel):
    fake = load_fake()
    io_struct = source(wheel, "srt/managers/io_struct.py")
    api = source(wheel, "api/v1/api_types.py")
    served = routes(wheel)
    for path, schema in fake.SCHEMAS.items():
        if path == "/generate":
            real = set(fields(api, "GenerateRequest"))
        elif path == "/flush_cache":
            real = set()  # the body is ignored (a `timeout` query parameter only)
        else:
            real = set(fields(io_struct, served[path][1]))
        assert set(schema) <= real, f"{path}: {sorted(set(schema) - real)} not in sglang"
    assert set(fake.SAMPLING_FIELDS) <= set(fields(api, "SamplingParams"))
    # What the client builds, directly (the double refuses anything else in the engine tests).
    sampling = SamplingParams(top_k=4, stop_token_ids=(2,), seed=5, temperature=0.5, top_p=0.9)
    payload = ss.generate_payload(GenerationRequest(prompt_token_ids=[1], sampling=sampling))
    assert set(payload) <= set(fields(api, "GenerateRequest"))
    assert set(payload["sampling_params"]) <= set(fields(api, "SamplingParams"))
    mode = fields(io_struct, served["/pause_generation"][1])["mode"]
    assert se.PAUSE_MODE in literal_values(mode)


def test_launch_flags_environment_and_memory_tags_exist(wheel):
    names = set()
    for entry in wheel.namelist():
        if re.fullmatch(r"sglang/srt/arg_groups/fields/\w+\.py", entry):
            tree = ast.parse(wheel.read(entry).decode())
            for node in ast.walk(tree):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
    config = se.SGLangEngineConfig(
        model_path="/m", rollout=RolloutConfig(engine="sglang", deterministic_inference=True)
    )
    spec = ss.ServerSpec(index=0, host="h", port=1, base_gpu_id=0, launch_count=0)
    flags = [a for a in se.default_launch_command(config, spec) if a.startswith("--")]
    assert "--enable-deterministic-inference" in flags
    for flag in flags:  # arg_groups/arg_utils.py: the flag of field f is --f with - for _
        assert flag[2:].replace("-", "_") in names, f"sglang has no server argument {flag}"
    environ = classes(source(wheel, "srt/environ.py"))
    declared = {t.id for c in environ.values() for n in c.body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}  # fmt: skip
    assert set(se.SERVER_ENV) <= declared
    http_server = wheel.read("sglang/srt/entrypoints/http_server.py").decode()
    assert all(f"envs.{name}.get()" in http_server for name in se.SERVER_ENV)
    constants = {}
    for node in source(wheel, "srt/constants.py").body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            constants[node.targets[0].id] = node.value.value
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            constants[node.targets[0].id] = [constants[e.id] for e in node.value.elts]
    assert list(se.MEMORY_TAGS) == constants["GPU_MEMORY_ALL_TYPES"]


def test_response_fields_the_client_reads_exist(wheel):
    manager = wheel.read("sglang/srt/managers/tokenizer_manager.py").decode()
    for key in ("output_token_logprobs", "weight_version", "finish_reason", "output_ids"):
        assert f'"{key}"' in manager, key


def test_gpu_pins_match_the_wheels_requirements(wheel):
    metadata_name = f"sglang-{se.SGLANG_VERSION}.dist-info/METADATA"
    lines = wheel.read(metadata_name).decode().splitlines()
    pins = constraint_pins()
    checked = []
    for line in lines:
        if not line.startswith("Requires-Dist: "):
            continue
        requirement = Requirement(line.removeprefix("Requires-Dist: "))
        marker = requirement.marker
        if marker is not None and not Marker(str(marker)).evaluate(GPU_PLATFORM):
            continue  # another platform, or an optional extra
        pin = pins.get(canonical(requirement.name))
        if pin is not None:
            assert requirement.specifier.contains(pin, prereleases=True), (
                f"sglang {se.SGLANG_VERSION} requires {requirement}; "
                f"requirements/gpu-constraints.txt pins {pin}"
            )
            checked.append(canonical(requirement.name))
    assert {"torch", "transformers"} <= set(checked), checked


def load_fake():
    spec = importlib.util.spec_from_file_location("rollout_fake_sglang", FAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
