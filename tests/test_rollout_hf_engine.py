"""HF engine: KV-cache decode equals a no-cache reference, exact log-probs, batch invariance."""

import pytest
import torch

from megatron_fipo.rollout.engine import GenerationRequest, GenerationSample, SamplingParams
from megatron_fipo.rollout.hf_engine import HFEngineConfig, HFRolloutEngine, sample_token

TINY_QWEN2 = dict(
    model_type="qwen2",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

PROMPTS = [[5, 17, 33, 2], [9], [40, 41, 42, 43, 44, 45, 46], [3, 90]]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return HFRolloutEngine(HFEngineConfig(), hf_config=TINY_QWEN2)


def reference_greedy(model, prompt, num_tokens):
    """No-cache greedy decode: full forward of the growing sequence each step."""
    sequence = list(prompt)
    for _ in range(num_tokens):
        logits = model(input_ids=torch.tensor([sequence])).logits[0, -1]
        sequence.append(int(torch.argmax(logits)))
    return sequence[len(prompt) :]


def full_forward_log_probs(model, sample: GenerationSample, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the response tokens from one forward of prompt + response."""
    sequence = sample.prompt_token_ids + sample.response_token_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    num_prompt = len(sample.prompt_token_ids)
    scale = temperature if temperature > 0 else 1.0
    log_probs = torch.log_softmax(logits[num_prompt - 1 : -1] / scale, dim=-1)
    return log_probs.gather(-1, torch.tensor(sample.response_token_ids)[:, None])[:, 0]


def requests_for(prompts, **sampling):
    return [
        GenerationRequest(
            prompt_token_ids=p, sampling=SamplingParams(**sampling), request_id=str(i)
        )
        for i, p in enumerate(prompts)
    ]


@torch.no_grad()
def test_greedy_matches_no_cache_reference(engine):
    samples = engine.generate(requests_for(PROMPTS, temperature=0.0, max_new_tokens=6))
    for prompt, sample in zip(PROMPTS, samples):
        assert sample.response_token_ids == reference_greedy(engine.model, prompt, 6)
        assert sample.finish_reason == "length"
        expected = full_forward_log_probs(engine.model, sample, 0.0)
        torch.testing.assert_close(torch.tensor(sample.log_probs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.8, 20)])
def test_sampled_log_probs_equal_full_forward(engine, temperature, top_p, top_k):
    requests = requests_for(
        PROMPTS, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=8, seed=11
    )
    for sample in engine.generate(requests):
        expected = full_forward_log_probs(engine.model, sample, temperature)
        torch.testing.assert_close(torch.tensor(sample.log_probs), expected, atol=1e-5, rtol=0)


def test_batch_and_padding_invariance_and_seeds(engine):
    batched = engine.generate(requests_for(PROMPTS, temperature=1.0, max_new_tokens=8, seed=5))
    alone = [
        engine.generate(requests_for([p], temperature=1.0, max_new_tokens=8, seed=5))[0]
        for p in PROMPTS
    ]
    for one, other in zip(batched, alone):
        assert one.response_token_ids == other.response_token_ids
        torch.testing.assert_close(
            torch.tensor(one.log_probs), torch.tensor(other.log_probs), atol=1e-5, rtol=0
        )
    again = engine.generate(requests_for(PROMPTS, temperature=1.0, max_new_tokens=8, seed=5))
    assert [s.response_token_ids for s in again] == [s.response_token_ids for s in batched]
    other_seed = engine.generate(requests_for(PROMPTS, temperature=1.0, max_new_tokens=8, seed=6))
    assert [s.response_token_ids for s in other_seed] != [s.response_token_ids for s in batched]


def test_stop_tokens_and_lengths(engine):
    greedy = engine.generate(requests_for(PROMPTS[:1], temperature=0.0, max_new_tokens=6))[0]
    stop = greedy.response_token_ids[2]
    first_stop = greedy.response_token_ids.index(stop)
    stopped = engine.generate(
        requests_for(PROMPTS[:1], temperature=0.0, max_new_tokens=6, stop_token_ids=(stop,))
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.response_token_ids == greedy.response_token_ids[: first_stop + 1]
    mixed = [
        GenerationRequest(
            prompt_token_ids=PROMPTS[0], sampling=SamplingParams(temperature=0.0, max_new_tokens=n)
        )
        for n in (1, 3)
    ]
    assert [len(s.response_token_ids) for s in engine.generate(mixed)] == [1, 3]


def test_top_k_one_is_greedy_and_top_p_truncates():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        token, logp = sample_token(logits, SamplingParams(temperature=1.0, top_k=1), generator)
        assert token == 1
        assert logp == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    tokens = {sample_token(logits, SamplingParams(top_p=0.6), generator)[0] for _ in range(50)}
    assert tokens == {1, 3}


def test_update_weights_copies_and_names_errors():
    torch.manual_seed(1)
    engine = HFRolloutEngine(hf_config=TINY_QWEN2)
    torch.manual_seed(2)
    source = HFRolloutEngine(hf_config=TINY_QWEN2)
    engine.update_weights(source.model.state_dict().items(), version=3)
    assert engine.weights_version == 3
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="unknown tensor name 'model.nope'"):
        engine.update_weights([("model.nope", torch.zeros(1))], version=4)
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(3,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))], version=4)
    engine.pause()
    with pytest.raises(RuntimeError, match="memory is released"):
        engine.generate(requests_for(PROMPTS[:1]))
    engine.resume(["weights"])  # the colocated order: weights first, a sync, then the rest
    assert engine.released == {"kv_cache", "cuda_graph"} and engine.health().paused
    with pytest.raises(RuntimeError, match=r"\['cuda_graph', 'kv_cache'\] memory is released"):
        engine.generate(requests_for(PROMPTS[:1]))
    with pytest.raises(ValueError, match="not released"):
        engine.resume(["weights"])
    engine.resume()
    assert engine.health().healthy and not engine.health().paused


def test_bad_sampling_params_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="duplicate request_id"):
        HFRolloutEngine(hf_config=TINY_QWEN2).generate(requests_for([[1], [2]]) * 2)
