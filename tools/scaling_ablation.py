"""How the cost of FIPO's long-response pieces grows with response length and CP size.

Rows measured (each at every length of its sweep):

- ``scan/single``: :func:`~megatron_fipo.algorithms.future_kl.discounted_future_sum` on
  ``x[B, T]`` in this process.
- ``scan/cp``: :func:`~megatron_fipo.megatron.cp_scan.cp_future_sum` over ``CP`` gloo processes
  (zigzag layout; time and memory are the maximum over ranks).
- ``logprobs/chunked`` vs ``logprobs/naive``: forward + backward of the log-probs of ``T``
  target tokens from hidden states ``[T, H]`` and an output layer ``[V, H]``:
  :func:`~megatron_fipo.megatron.logprobs.chunked_log_probs` against materialised logits +
  :func:`~megatron_fipo.megatron.logprobs.log_probs_from_logits`.
- ``actor/train_step``: one :meth:`MegatronActor.train_step` (FIPO loss, Adam) of a narrow Qwen2
  model on one sequence of length ``T``, in a world of ``CP`` gloo processes.

Time is the best of ``repeats`` runs after one warm-up. Peak memory is the most memory allocated
*during* the call beyond what existed before it: on CUDA from the allocator's peak counter, on
CPU by :class:`PeakMemory`, which follows every tensor storage the call creates until it is
freed (kernel-internal scratch is not seen). The growth exponent is the least-squares slope
of log(cost) over log(length) on the largest lengths of each row (short lengths are dominated
by fixed overheads): about 1 means linear.

Writes ``scaling.csv``, ``scaling_fit.csv`` and ``scaling.png`` into ``--output-dir``.
``--quick`` finishes in about a minute on 2 CPU cores; without it the default sweep goes to 32k
tokens (scan and log-probs) on whatever device ``--device`` names. Rows predicted to exceed
``--max-mem-gb`` are skipped with the estimate as reason; CP worlds always use gloo on CPU
(several ranks cannot share one GPU under NCCL).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GAMMA = 2.0 ** (-1.0 / 32)
BENCHES = ("scan", "cp_scan", "logprobs", "actor")
CSV_COLUMNS = ("bench", "variant", "length", "cp_size", "time_ms", "peak_mem_mb", "status", "note")


@dataclass(kw_only=True, slots=True)
class AblationConfig:
    """What to sweep and at which sizes."""

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    """Response lengths T of the scan and log-prob rows."""
    actor_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    """Sequence lengths of the actor train-step rows (attention makes these cost more)."""
    cp_sizes: tuple[int, ...] = (1, 2, 4)
    """CP sizes of the CP-scan and actor rows (1: a world of one process)."""
    benches: tuple[str, ...] = BENCHES
    batch_size: int = 16
    """Rows B of the scan input."""
    hidden_size: int = 1024
    """H of the log-prob rows."""
    vocab_size: int = 32768
    """V of the log-prob rows (Qwen2.5: 152064)."""
    logprob_chunk_size: int = 1024
    actor_hidden_size: int = 128
    actor_layers: int = 2
    actor_vocab_size: int = 2048
    repeats: int = 3
    min_time_s: float = 0.2
    """Single-process rows repeat short calls until this much time has passed (max 50)."""
    device: str = "cpu"
    threads: int = 0
    """torch threads per process (0: torch's default here, cores / CP in each CP rank)."""
    max_mem_gb: float = 8.0
    """Rows whose estimated memory exceeds this are skipped."""
    output_dir: str = "outputs/scaling"

    def __post_init__(self) -> None:
        unknown = set(self.benches) - set(BENCHES)
        if unknown:
            raise ValueError(f"benches: unknown {sorted(unknown)}; choose from {BENCHES}")
        for name in ("lengths", "actor_lengths", "cp_sizes"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values}")
        for name in ("batch_size", "hidden_size", "vocab_size", "repeats", "logprob_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


QUICK = dict(
    lengths=(1024, 2048, 4096, 8192, 16384),
    actor_lengths=(256, 512, 1024),
    cp_sizes=(1, 2),
    batch_size=64,
    hidden_size=64,
    vocab_size=1024,
    logprob_chunk_size=512,
    actor_hidden_size=64,
    actor_vocab_size=512,
    repeats=2,
    # One thread: on a small shared machine, a second intra-op thread that gets descheduled
    # stalls every op (measured: 56 ms for a 0.1 ms scan), hiding how cost grows with length.
    threads=1,
)


@dataclass(kw_only=True, slots=True)
class Measurement:
    """One CSV row."""

    bench: str
    variant: str
    length: int
    cp_size: int
    time_ms: float = float("nan")
    peak_mem_mb: float = float("nan")
    status: str = "ok"
    """ok, skipped or oom."""
    note: str = ""


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (CPU or any device).

    Each new storage an op returns is counted until its last reference dies (a weak reference
    callback); storages an op merely returns from its inputs (in-place ops, views) are not new.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._release(k, n))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time_s(
    fn: Callable[[], object], repeats: int, device: torch.device, min_total_s: float = 0.2
) -> float:
    """Minimum wall time of at least ``repeats`` calls after one warm-up call; short calls
    are repeated until ``min_total_s`` has passed (at most 50 times), so that a busy machine
    (shared cores) still yields a clean minimum."""
    fn()
    _sync(device)
    best, total, count = math.inf, 0.0, 0
    while count < repeats or (total < min_total_s and count < 50):
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        best, total, count = min(best, elapsed), total + elapsed, count + 1
    return best


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Extra bytes allocated at the peak of one call (see module doc)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakMemory() as tracker:
        fn()
    return tracker.peak


def measure(
    row: Measurement,
    fn: Callable[[], object],
    repeats: int,
    device: torch.device,
    min_total_s: float = 0.2,
) -> Measurement:
    """Fills time and memory of ``row``; an out-of-memory error marks it "oom".

    Distributed callers pass ``min_total_s=0``: every rank must make the same number of calls
    (they contain collectives), so the repeat count cannot depend on a rank's own timing.
    """
    try:
        row.time_ms = best_time_s(fn, repeats, device, min_total_s) * 1e3
        row.peak_mem_mb = peak_bytes(fn, device) / 2**20
    except torch.OutOfMemoryError as error:
        row.status, row.note = "oom", str(error).splitlines()[0][:120]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _skip(row: Measurement, reason: str) -> Measurement:
    row.status, row.note = "skipped", reason
    return row


def _over_budget(estimate_bytes: float, config: AblationConfig) -> str:
    """A skip reason when the estimate exceeds the memory budget, else ""."""
    if estimate_bytes > config.max_mem_gb * 2**30:
        return f"estimated {estimate_bytes / 2**30:.1f} GiB > --max-mem-gb {config.max_mem_gb}"
    return ""


def bench_scan(config: AblationConfig, device: torch.device) -> list[Measurement]:
    """``scan/single`` rows: the future-KL scan of ``x[B, T]`` in this process."""
    from megatron_fipo.algorithms.future_kl import discounted_future_sum

    rows = []
    for length in config.lengths:
        row = Measurement(bench="scan", variant="single", length=length, cp_size=1)
        reason = _over_budget(4.0 * 4 * config.batch_size * length, config)
        if reason:
            rows.append(_skip(row, reason))
            continue
        x = torch.randn(config.batch_size, length, device=device)
        call = functools.partial(discounted_future_sum, x, GAMMA)
        rows.append(measure(row, call, config.repeats, device, config.min_time_s))
    return rows


def logprob_inputs(length: int, config: AblationConfig, device: torch.device) -> tuple:
    """hidden ``[T, H]`` and weight ``[V, H]`` (both leaves with grad), targets ``[T]``."""
    generator = torch.Generator().manual_seed(length)
    hidden = torch.randn(length, config.hidden_size, generator=generator).to(device)
    weight = (0.02 * torch.randn(config.vocab_size, config.hidden_size, generator=generator)).to(
        device
    )
    targets = torch.randint(config.vocab_size, (length,), generator=generator).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def bench_logprobs(config: AblationConfig, device: torch.device) -> list[Measurement]:
    """``logprobs/chunked`` and ``logprobs/naive`` rows: forward + backward of log-probs."""
    from megatron_fipo.megatron.logprobs import chunked_log_probs, log_probs_from_logits

    def chunked(hidden, weight, targets):
        hidden.grad = weight.grad = None
        log_probs, _ = chunked_log_probs(
            hidden, weight, targets, chunk_size=config.logprob_chunk_size
        )
        log_probs.sum().backward()

    def naive(hidden, weight, targets):
        hidden.grad = weight.grad = None
        log_probs, _ = log_probs_from_logits(hidden @ weight.t(), targets)
        log_probs.sum().backward()

    rows = []
    for length in config.lengths:
        inputs = logprob_inputs(length, config, device)
        params = 4.0 * 2 * config.vocab_size * config.hidden_size  # weight + its grad
        for variant, fn, logits_rows in (
            ("chunked", chunked, min(length, config.logprob_chunk_size)),
            ("naive", naive, length),
        ):
            row = Measurement(bench="logprobs", variant=variant, length=length, cp_size=1)
            # logits, probabilities, log-softmax and the logits' gradient: 4 fp32 [rows, V].
            reason = _over_budget(params + 16.0 * logits_rows * config.vocab_size, config)
            if reason:
                rows.append(_skip(row, reason))
                continue
            call = functools.partial(fn, *inputs)
            rows.append(measure(row, call, config.repeats, device, config.min_time_s))
    return rows


def _max_over_ranks(row: Measurement) -> Measurement:
    """Time and memory of a distributed row: the slowest / largest rank."""
    import torch.distributed as dist

    values = torch.tensor([row.time_ms, row.peak_mem_mb], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    row.time_ms, row.peak_mem_mb = values.tolist()
    return row


def cp_scan_rows(config: AblationConfig, rank: int, cp_size: int) -> list[Measurement]:
    """``scan/cp`` rows on this rank of a gloo world of ``cp_size`` processes."""
    from megatron_fipo.megatron.context_parallel import build_layout, split_to_local
    from megatron_fipo.megatron.cp_scan import ChunkIndex, cp_future_sum

    device = torch.device("cpu")
    rows = []
    for length in config.lengths:
        row = Measurement(bench="scan", variant="cp", length=length, cp_size=cp_size)
        reason = _over_budget(4.0 * 4 * config.batch_size * length / cp_size, config)
        if reason:
            rows.append(_skip(row, reason))
            continue
        x = torch.randn(config.batch_size, length, generator=torch.Generator().manual_seed(length))
        layout = build_layout([length] * config.batch_size, cp_size, rank, packed=False)
        local = split_to_local(x, layout)
        index = ChunkIndex.from_layout(layout)
        call = functools.partial(cp_future_sum, local, GAMMA, layout, None, index)
        # Milliseconds per call, dominated by gloo latency: a fixed 10+ repeats (the same on
        # every rank) gives a stable minimum.
        measure(row, call, max(config.repeats, 10), device, min_total_s=0.0)
        rows.append(_max_over_ranks(row))
    return rows


def narrow_hf_config(config: AblationConfig) -> dict:
    """A narrow Qwen2 config (GQA, SwiGLU) whose positions cover the longest actor length."""
    hidden = config.actor_hidden_size
    return dict(
        model_type="qwen2",
        vocab_size=config.actor_vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=config.actor_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=max(config.actor_lengths),
        tie_word_embeddings=False,
    )


def actor_batch(actor, length: int, config: AblationConfig):
    """One sequence: a 16-token prompt and a ``length - 16`` token response, with old
    log-probs near the current ones (ratios away from 1, so clipping and FIPO act)."""
    from megatron_fipo.megatron.actor import ActorBatch

    prompt = min(16, length // 2)
    generator = torch.Generator().manual_seed(length)
    batch = ActorBatch(
        input_ids=[torch.randint(config.actor_vocab_size, (length,), generator=generator)],
        prompt_lengths=torch.tensor([prompt]),
        response_lengths=torch.tensor([length - prompt]),
        advantages=torch.tensor([1.0]),
    )
    noise = 0.05 * torch.randn(1, length - prompt, generator=generator)
    batch.old_log_probs = actor.compute_log_probs(batch) + noise
    return batch


def actor_rows(config: AblationConfig, cp_size: int) -> list[Measurement]:
    """``actor/train_step`` rows in this world (every rank calls it).

    An exception from the actor (e.g. a layout the actor does not support on this machine)
    turns this and the remaining lengths into "error" rows instead of ending the sweep; such
    errors hit every rank alike, so no rank is left waiting in a collective.
    """
    from megatron_fipo.algorithms.losses import PolicyLossConfig
    from megatron_fipo.config import OptimizerConfig
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.check_parallel import layout, model_section
    from megatron_fipo.megatron.distributed import destroy

    rows = [
        Measurement(bench="actor", variant="train_step", length=length, cp_size=cp_size)
        for length in config.actor_lengths
    ]
    device = torch.device("cpu")
    try:
        hf = narrow_hf_config(config)
        actor = MegatronActor(
            hf,
            model_section(hf, logprob_chunk_size=config.logprob_chunk_size),
            layout(cp=cp_size),
            OptimizerConfig(lr=1e-5, lr_warmup_steps=0),
            PolicyLossConfig(mode="fipo"),
            seed=1234,
        )
        for row in rows:
            # Local-spec attention keeps fp32 scores, probabilities and their gradients
            # [heads, T / CP, T] per layer for the backward.
            scores = 4.0 * 4 * 4 * row.length**2 / cp_size * config.actor_layers
            reason = _over_budget(scores, config)
            if reason:
                _skip(row, reason)
                continue
            batch = actor_batch(actor, row.length, config)
            call = functools.partial(actor.train_step, batch)
            measure(row, call, config.repeats, device, min_total_s=0.0)
            _max_over_ranks(row)
    except Exception as error:  # noqa: BLE001 - reported in the table, the sweep goes on
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        for row in rows:
            if row.status == "ok" and math.isnan(row.time_ms):
                row.status, row.note = "error", message[:160]
    finally:
        destroy()
    return rows


def _world_rank(rank: int, world_size: int, port: int, config: AblationConfig, results) -> None:
    """Body of one spawned process: the CP-scan and actor rows of a world of ``world_size``."""
    import torch.distributed as dist

    from megatron_fipo.megatron.distributed import init_process_group_from_env, set_local_world_env

    set_local_world_env(rank, world_size, port)
    # The ranks share the machine's cores; more threads each would only oversubscribe them.
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // world_size))
    # A bounded wait: a rank that never joins a collective ends the world instead of hanging.
    init_process_group_from_env("gloo", timeout_minutes=5)
    try:
        rows = []
        if "cp_scan" in config.benches and world_size > 1:
            rows += cp_scan_rows(config, rank, world_size)
        if "actor" in config.benches:
            rows += actor_rows(config, world_size)
        if rank == 0:
            results.put([asdict(row) for row in rows])
        # No rank may tear down its gloo pairs while a peer still sends (that aborts it).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(config: AblationConfig, world_size: int) -> list[Measurement]:
    """Runs :func:`_world_rank` in ``world_size`` fresh gloo processes; rank 0's rows."""
    import torch.multiprocessing as mp

    from megatron_fipo.megatron.distributed import free_port

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        _world_rank,
        args=(world_size, free_port(), config, results),
        nprocs=world_size,
        start_method="spawn",
    )
    return [Measurement(**row) for row in results.get()]


def log_log_slope(lengths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) over log(length)."""
    xs = [math.log(v) for v in lengths]
    ys = [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("log_log_slope needs at least two different lengths")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def fit_exponents(rows: Sequence[Measurement], num_points: int = 4) -> list[dict]:
    """Growth exponent of time and memory per (bench, variant, cp_size), over the largest
    ``num_points`` lengths measured (at least 3 points; NaN for memory with a zero)."""
    groups: dict[tuple, list[Measurement]] = {}
    for row in rows:
        if row.status == "ok":
            groups.setdefault((row.bench, row.variant, row.cp_size), []).append(row)
    fits = []
    for (bench, variant, cp_size), members in sorted(groups.items()):
        members = sorted(members, key=lambda r: r.length)[-num_points:]
        if len({r.length for r in members}) < 3:
            continue
        lengths = [r.length for r in members]
        memory = [r.peak_mem_mb for r in members]
        fits.append(
            dict(
                bench=bench,
                variant=variant,
                cp_size=cp_size,
                min_length=lengths[0],
                max_length=lengths[-1],
                time_exponent=log_log_slope(lengths, [r.time_ms for r in members]),
                memory_exponent=log_log_slope(lengths, memory)
                if all(m > 0 for m in memory)
                else float("nan"),
            )
        )
    return fits


def format_table(rows: Sequence[Measurement], fits: Sequence[dict]) -> str:
    lines = [
        f"{'bench':<9} {'variant':<11} {'cp':>3} {'length':>7} {'time ms':>10} {'peak MiB':>10}  note",
    ]
    for r in rows:
        shown = (
            f"{r.time_ms:>10.2f} {r.peak_mem_mb:>10.1f}" if r.status == "ok" else f"{r.status:>21}"
        )
        lines.append(f"{r.bench:<9} {r.variant:<11} {r.cp_size:>3} {r.length:>7} {shown}  {r.note}")
    lines += ["", "growth exponent d log(cost) / d log(length) (1 = linear):"]
    for f in fits:
        lines.append(
            f"  {f['bench']}/{f['variant']} cp={f['cp_size']} ({f['min_length']}..{f['max_length']}):"
            f" time {f['time_exponent']:.2f}, memory {f['memory_exponent']:.2f}"
        )
    return "\n".join(lines)


def write_csv(path: Path, records: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)


def plot(rows: Sequence[Measurement], fits: Sequence[dict], path: Path, title: str) -> None:
    """Log-log time and memory against length, one line per (bench, variant, cp); legends
    carry the fitted growth exponents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    groups: dict[tuple, list[Measurement]] = {}
    for row in rows:
        if row.status == "ok":
            groups.setdefault((row.bench, row.variant, row.cp_size), []).append(row)
    slopes = {(f["bench"], f["variant"], f["cp_size"]): f for f in fits}
    for axis, attribute, label, exponent in zip(
        axes,
        ("time_ms", "peak_mem_mb"),
        ("time (ms)", "peak extra memory (MiB)"),
        ("time_exponent", "memory_exponent"),
    ):
        for key, members in sorted(groups.items()):
            members = sorted(members, key=lambda r: r.length)
            values = [getattr(r, attribute) for r in members]
            name = f"{key[0]}/{key[1]} cp={key[2]}"
            if key in slopes and math.isfinite(slopes[key][exponent]):
                name += f" (slope {slopes[key][exponent]:.2f})"
            if all(v > 0 for v in values):
                axis.plot([r.length for r in members], values, marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("length (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_ablation(config: AblationConfig) -> tuple[list[Measurement], list[dict]]:
    """Every requested row, then the fits; writes CSVs and the plot into ``output_dir``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    rows: list[Measurement] = []
    if "scan" in config.benches:
        rows += bench_scan(config, device)
    if "logprobs" in config.benches:
        rows += bench_logprobs(config, device)
    if "cp_scan" in config.benches or "actor" in config.benches:
        for cp_size in config.cp_sizes:
            if cp_size == 1 and "actor" not in config.benches:
                continue  # the single-rank scan is the scan/single row
            rows += run_world(config, cp_size)
    fits = fit_exponents(rows)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "scaling.csv", [asdict(r) for r in rows], CSV_COLUMNS)
    fit_columns = [f for f in fits[0]] if fits else ["bench"]
    write_csv(out / "scaling_fit.csv", fits, fit_columns)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = f"FIPO scaling ablation ({device_name}, torch threads={torch.get_num_threads()})"
    plot(rows, fits, out / "scaling.png", title)
    return rows, fits


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_config(argv: Sequence[str] | None = None) -> AblationConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep, ~1 min on 2 cores")
    parser.add_argument("--lengths", type=_ints, help="comma separated, e.g. 1024,2048")
    parser.add_argument("--actor-lengths", type=_ints)
    parser.add_argument("--cp-sizes", type=_ints)
    parser.add_argument("--benches", type=lambda s: tuple(s.split(",")), help=",".join(BENCHES))
    int_options = ("batch_size", "hidden_size", "vocab_size", "logprob_chunk_size", "repeats")
    int_options += ("threads", "actor_hidden_size", "actor_layers", "actor_vocab_size")
    for name in int_options:
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--device")
    parser.add_argument("--max-mem-gb", type=float)
    parser.add_argument("--min-time-s", type=float)
    parser.add_argument("--output-dir")
    args = vars(parser.parse_args(argv))
    values = dict(QUICK) if args.pop("quick") else {}
    names = {f.name for f in fields(AblationConfig)}
    values.update({k: v for k, v in args.items() if v is not None and k in names})
    return AblationConfig(**values)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    started = time.perf_counter()
    rows, fits = run_ablation(config)
    print(format_table(rows, fits))
    print(
        f"\nwrote {config.output_dir}/scaling.csv, scaling_fit.csv, scaling.png "
        f"in {time.perf_counter() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
