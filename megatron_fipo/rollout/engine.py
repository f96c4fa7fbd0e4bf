"""The rollout engine protocol: what the trainer asks of any inference engine.

An engine takes prompts as token ids and returns, per request, the sampled response token ids,
the log-prob of each sampled token under the engine's sampling distribution (temperature applied,
before top-p / top-k truncation; see `hf_engine.py`), and why generation stopped. Engines receive
new weights as HF-named full tensors (`update_weights`) after every optimizer phase and can be
paused (memory released) while a colocated trainer runs.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

MEMORY_TAGS: tuple[str, ...] = ("kv_cache", "weights", "cuda_graph")
"""What an engine can release (SGLang's memory types; the HF engine holds weights only)."""
WEIGHTS_TAG = "weights"

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to sample one response."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), log-probs then use temperature 1."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 keeps every token."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps every token."""
    max_new_tokens: int = 128
    """Upper bound on generated tokens; reaching it gives finish reason "length"."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after emitting one of these (the stop token is part of the response)."""
    seed: int | None = None
    """Per-request seed; the same seed and prompt give the same response in any batch."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(kw_only=True, slots=True)
class GenerationRequest:
    """One prompt to complete."""

    prompt_token_ids: list[int]
    """Prompt token ids, length P >= 1."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    """Caller's id, echoed in the sample; used to retry unfinished requests."""

    def __post_init__(self) -> None:
        if len(self.prompt_token_ids) == 0:
            raise ValueError(f"prompt_token_ids of request {self.request_id!r} is empty")
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]


@dataclass(kw_only=True, slots=True)
class GenerationSample:
    """One completed response."""

    request_id: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    """Sampled tokens, length R (includes the stop token when finish_reason is "stop")."""
    log_probs: list[float]
    """Length R: log-prob of each sampled token under the sampling distribution."""
    finish_reason: FinishReason
    weights_version: int = -1
    """The weights version that produced the sample."""

    def __post_init__(self) -> None:
        if len(self.log_probs) != len(self.response_token_ids):
            raise ValueError(
                f"sample {self.request_id!r}: {len(self.log_probs)} log_probs for "
                f"{len(self.response_token_ids)} response tokens"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}"
            )


@dataclass(kw_only=True, slots=True)
class EngineHealth:
    """What `health()` reports."""

    healthy: bool
    paused: bool
    weights_version: int
    detail: str = ""


class RolloutEngine(abc.ABC):
    """An inference engine the trainer generates with and pushes weights to."""

    @property
    @abc.abstractmethod
    def weights_version(self) -> int:
        """Version of the last weights received (-1 before the first update)."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationSample]:
        """Complete every request; samples come back in request order."""

    @abc.abstractmethod
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load HF-named full tensors (any subset of the model) and record `version`."""

    @abc.abstractmethod
    def pause(self, tags: list[str] | None = None) -> None:
        """Release device memory so a colocated trainer can use it: all of it, or the
        ``MEMORY_TAGS`` named. No generation until everything is resumed."""

    @abc.abstractmethod
    def resume(self, tags: list[str] | None = None) -> None:
        """Retake released memory (all of it, or ``tags``). Released weights are not guaranteed
        to survive: resume "weights", send weights, then resume the rest."""

    @abc.abstractmethod
    def health(self) -> EngineHealth:
        """Whether the engine can serve requests now."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, engines without resources skip it
        """Stop owned processes; the default engine owns none."""

    def begin_external_update(self) -> list:
        """Open a weight update that other processes fill (training ranks, by reference); the
        server specs they post to. An engine fed through ``update_weights`` has none."""
        return []

    def end_external_update(self, version: int, succeeded: bool) -> None:  # noqa: B027
        """Close the update opened by :meth:`begin_external_update`."""


class WeightsNeeded(RuntimeError):
    """A restarted server holds no current weights and its engine cannot resync it itself (the
    weights come from the training ranks): sync the weights, then generate again."""


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of named tensors into lists of at most `bucket_bytes` bytes each.

    A tensor larger than the limit forms a bucket of its own. Only one bucket is held at a time,
    so a lazy input stream keeps peak extra memory at about one bucket.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        num_bytes = tensor.numel() * tensor.element_size()
        if bucket and size + num_bytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += num_bytes
    if bucket:
        yield bucket


def validate_requests(requests: Sequence[GenerationRequest]) -> None:
    """Raise ValueError on duplicate non-empty request ids (retries match samples by id)."""
    seen: set[str] = set()
    for request in requests:
        if not isinstance(request, GenerationRequest):
            raise ValueError(f"expected GenerationRequest, got {type(request).__name__}")
        if request.request_id and request.request_id in seen:
            raise ValueError(f"duplicate request_id {request.request_id!r}")
        seen.add(request.request_id)
