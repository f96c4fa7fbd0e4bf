"""Embedded HF-transformers rollout engine (the CPU default).

A transformers causal LM of the actor's architecture, driven by our own decode loop with a KV cache
so that every sampled token's log-prob is exact. Log-prob convention (the one SGLang returns and
verl/slime expect): `log_softmax(logits / temperature)` at the sampled token, computed in fp32
*before* top-k / top-p truncation; with temperature 0 (greedy) the log-prob is `log_softmax(logits)`.

Batching uses left padding: prompts are right-aligned, the attention mask zeroes the pads and
position ids count real tokens only, so a prompt's tokens and log-probs do not depend on which
batch it came in (up to float rounding). Each request samples from its own generator, seeded from
its `seed` (or from the engine's seeded stream), so seeded requests are reproducible in any batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from megatron_fipo.rollout.engine import (
    MEMORY_TAGS,
    WEIGHTS_TAG,
    EngineHealth,
    GenerationRequest,
    GenerationSample,
    RolloutEngine,
    SamplingParams,
    validate_requests,
)
from megatron_fipo.rollout.flat_bucket import serialize_named, use_file_system_sharing

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True, slots=True)
class HFEngineConfig:
    """Settings of the embedded engine."""

    model_path: str = ""
    """HF model directory to load; empty means build from the config passed to the engine."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    device: str = "cpu"
    max_batch_size: int = 64
    """Requests decoded together; larger request lists are split into chunks of this size."""
    attn_implementation: str = "eager"
    """transformers attention kernel; eager is exact with left padding on every backend."""
    seed: int = 0
    """Seeds the stream that gives requests without their own seed a seed."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")


def build_hf_model(
    config: HFEngineConfig, hf_config: PretrainedConfig | dict | None = None
) -> PreTrainedModel:
    """Load `config.model_path`, or build a randomly initialised model from `hf_config`."""
    dtype = _DTYPES[config.dtype]
    if config.model_path:
        model = AutoModelForCausalLM.from_pretrained(
            config.model_path, dtype=dtype, attn_implementation=config.attn_implementation
        )
    elif hf_config is not None:
        if isinstance(hf_config, dict):
            hf_config = AutoConfig.for_model(**hf_config)
        hf_config._attn_implementation = config.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        raise ValueError("HFEngineConfig.model_path is empty and no hf_config was given")
    return model.to(config.device).eval()


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[int, float]:
    """Sample one token from `logits` [V] (fp32); returns (token id, log-prob of it).

    The log-prob is taken under the temperature-scaled distribution before truncation.
    """
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, dim=-1)[token])
    log_probs = torch.log_softmax(logits / params.temperature, dim=-1)
    kept = log_probs.clone()
    if params.top_k > 0 and params.top_k < kept.numel():
        kth_value = torch.topk(kept, params.top_k).values[-1]
        kept[kept < kth_value] = float("-inf")
    if params.top_p < 1.0:
        sorted_values, order = torch.sort(kept, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_values, dim=-1), dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first is always kept).
        drop_sorted = (cumulative - torch.softmax(sorted_values, dim=-1)) >= params.top_p
        kept[order[drop_sorted]] = float("-inf")
    probs = torch.softmax(kept, dim=-1).cpu()
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(log_probs[token])


def _cache_kwargs(output) -> dict:
    """The KV cache of ``output`` as the forward keyword of this transformers version
    (``cache`` from 5.2x, ``past_key_values`` before; the output field has the same name)."""
    if getattr(output, "cache", None) is not None:
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


class HFRolloutEngine(RolloutEngine):
    """Batched KV-cache generation with a transformers model; weights set by `update_weights`."""

    def __init__(
        self,
        config: HFEngineConfig | None = None,
        *,
        hf_config: PretrainedConfig | dict | None = None,
        model: PreTrainedModel | None = None,
    ) -> None:
        self.config = config or HFEngineConfig()
        self.model = model.eval() if model is not None else build_hf_model(self.config, hf_config)
        self.device = next(self.model.parameters()).device
        self._version = -1
        self._released: set[str] = set()
        self._seed_stream = torch.Generator().manual_seed(self.config.seed)
        # Tied embeddings appear under both names in state_dict; both may be sent.
        if self.device.type == "cpu":
            # Weights in named shared memory: the training rank beside the engine writes new
            # weights straight into them (weights_payload), with no copy in between.
            use_file_system_sharing()
            self.model.share_memory()
        self._tensors_by_name = dict(self.model.state_dict(keep_vars=True))

    @property
    def weights_version(self) -> int:
        return self._version

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationSample]:
        if self._released:
            raise RuntimeError(
                f"HFRolloutEngine.generate called while {sorted(self._released)} memory is "
                "released; call resume() first"
            )
        validate_requests(requests)
        samples: list[GenerationSample] = []
        size = self.config.max_batch_size
        for start in range(0, len(requests), size):
            samples.extend(self._generate_batch(list(requests[start : start + size])))
        return samples

    def _request_generator(self, request: GenerationRequest) -> torch.Generator:
        seed = request.sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_stream))
        return torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationSample]:
        """Decode one batch of B requests to completion with a shared KV cache."""
        input_ids, attention_mask = left_pad([r.prompt_token_ids for r in requests], self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generators = [self._request_generator(r) for r in requests]
        tokens: list[list[int]] = [[] for _ in requests]
        log_probs: list[list[float]] = [[] for _ in requests]
        finish: list[str | None] = [None for _ in requests]
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        while True:
            step_logits = output.logits[:, -1, :].float()
            next_ids = torch.zeros(len(requests), 1, dtype=torch.long, device=self.device)
            for row, request in enumerate(requests):
                if finish[row] is not None:
                    continue  # finished rows keep a slot (fed token 0) but are not sampled
                token, logp = sample_token(step_logits[row], request.sampling, generators[row])
                tokens[row].append(token)
                log_probs[row].append(logp)
                next_ids[row, 0] = token
                if token in request.sampling.stop_token_ids:
                    finish[row] = "stop"
                elif len(tokens[row]) >= request.sampling.max_new_tokens:
                    finish[row] = "length"
            if all(reason is not None for reason in finish):
                break
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(len(requests), 1)], 1
            )
            position_ids = position_ids[:, -1:] + 1
            output = self.model(
                input_ids=next_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **_cache_kwargs(output),
            )
        return [
            GenerationSample(
                request_id=request.request_id,
                prompt_token_ids=list(request.prompt_token_ids),
                response_token_ids=tokens[row],
                log_probs=log_probs[row],
                finish_reason=finish[row],
                weights_version=self._version,
            )
            for row, request in enumerate(requests)
        ]

    @torch.no_grad()
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Copy each HF-named tensor into the parameter (or buffer) of that name.

        Raises ValueError naming an unknown or mis-shaped tensor; tensors before it are loaded.
        """
        for name, tensor in named_tensors:
            target = self._tensors_by_name.get(name)
            if target is None:
                raise ValueError(f"update_weights: unknown tensor name {name!r}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.data.copy_(tensor)
        self._version = int(version)

    def pause(self, tags: list[str] | None = None) -> None:
        """Release memory (all, or ``tags``): the weights move to host memory on an accelerator
        (they stay valid); the engine keeps no KV cache between calls, so the other tags only
        mark the engine released. No generation until everything is resumed."""
        wanted = set(MEMORY_TAGS if not tags else tags)
        unknown = wanted - set(MEMORY_TAGS)
        if unknown:
            raise ValueError(f"unknown memory tags {sorted(unknown)}; known: {list(MEMORY_TAGS)}")
        if WEIGHTS_TAG in wanted - self._released and self.device.type != "cpu":
            self.model.to("cpu")
            # Blocks shared by CUDA IPC are held for their consumers until those let go and
            # this process collects them (the training rank unmaps after each update).
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()
        self._released |= wanted

    def resume(self, tags: list[str] | None = None) -> None:
        wanted = set(self._released if not tags else tags)
        if not wanted <= self._released:
            raise ValueError(
                f"cannot resume memory tags {sorted(wanted - self._released)}: not released "
                f"(released: {sorted(self._released)})"
            )
        if WEIGHTS_TAG in wanted and self.device.type != "cpu":
            self.model.to(self.device)
        self._released -= wanted

    def weights_payload(self) -> str:
        """A payload referring to every weight tensor (shared memory on CPU, CUDA IPC on GPU),
        for the training rank beside this engine to write new weights into in place
        (``megatron_fipo.cluster.engine_links.EngineWeightsLink``). Made afresh for each update:
        on an accelerator the weights move when released and resumed."""
        named = [(name, t.data) for name, t in self.model.state_dict(keep_vars=True).items()]
        return serialize_named(named)

    def end_external_update(self, version: int, succeeded: bool) -> None:
        if succeeded:
            self._version = int(version)

    @property
    def released(self) -> frozenset[str]:
        return frozenset(self._released)

    def health(self) -> EngineHealth:
        return EngineHealth(
            healthy=True, paused=bool(self._released), weights_version=self._version
        )


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts: returns input ids and attention mask, both [B, max P] (pads are 0)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)
