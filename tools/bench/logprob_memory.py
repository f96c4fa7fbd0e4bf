"""Peak extra memory of chunked vs naive log-probs (forward + backward) on CPU.

    python -m tools.bench.logprob_memory [--tokens 16384] [--vocab 152064] [--hidden 64]

Each method runs in a fresh subprocess that allocates the inputs, records its resident set
size (RSS), runs log-probs + entropy forward and backward, and reports the RSS high-water
mark (``ru_maxrss``, which sees every torch CPU allocation) minus the baseline. "naive"
materialises the fp32 ``[T, V]`` logits and runs ``log_softmax`` on them (what a plain
implementation does); "chunked" is :func:`megatron_fipo.megatron.logprobs.chunked_log_probs`,
whose extra memory is O(chunk x V).

The naive method needs several ``[T, V]`` fp32 buffers (about 50 GB at T = 16384), more than
a small machine has, so it runs at ``--naive-tokens`` (default min(T, 2048)) and its peak is
scaled linearly to ``T`` (it is linear in T); both numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _child(method: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    import torch

    from megatron_fipo.megatron.logprobs import chunked_log_probs, log_probs_from_logits

    torch.manual_seed(0)
    hidden_states = torch.randn(tokens, hidden, requires_grad=True)
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,))
    # Touch the gradient buffers' worth of memory up front so both methods start equal.
    baseline = _rss_mib()
    start = time.perf_counter()
    if method == "naive":
        log_probs, entropy = log_probs_from_logits(hidden_states @ weight.t(), targets)
    else:
        log_probs, entropy = chunked_log_probs(hidden_states, weight, targets, chunk_size=chunk)
    (log_probs.sum() + entropy.sum()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"method": method, "extra_peak_mib": peak - baseline, "seconds": seconds}


def _run(method: str, args, tokens: int) -> dict:
    command = [
        sys.executable, "-m", "tools.bench.logprob_memory", "--child", method,
        "--tokens", str(tokens), "--vocab", str(args.vocab),
        "--hidden", str(args.hidden), "--chunk", str(args.chunk),
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--naive-tokens", type=int, default=None, help="T for the naive run")
    parser.add_argument("--child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.vocab, args.hidden, args.chunk)))
        return 0
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"T={args.tokens} V={args.vocab} H={args.hidden} chunk={args.chunk}: "
          f"one fp32 [T, V] logits tensor = {logits_mib:.0f} MiB")  # fmt: skip
    naive_tokens = args.naive_tokens or min(args.tokens, 2048)
    chunked = _run("chunked", args, args.tokens)
    naive = _run("naive", args, naive_tokens)
    naive_at_t = naive["extra_peak_mib"] * args.tokens / naive_tokens
    print(f"  chunked  T={args.tokens:6d} extra peak {chunked['extra_peak_mib']:9.1f} MiB"
          f"   fwd+bwd {chunked['seconds']:.2f}s")  # fmt: skip
    print(f"  naive    T={naive_tokens:6d} extra peak {naive['extra_peak_mib']:9.1f} MiB"
          f"   fwd+bwd {naive['seconds']:.2f}s")  # fmt: skip
    if naive_tokens != args.tokens:
        print(f"  naive    T={args.tokens:6d} extra peak {naive_at_t:9.1f} MiB (scaled linearly)")
    ratio = naive_at_t / max(chunked["extra_peak_mib"], 1e-9)
    print(f"  naive / chunked peak ratio at T={args.tokens}: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
