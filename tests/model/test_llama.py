"""Our blocks against transformers' LlamaForCausalLM on the same random weights (fp32)."""

import pytest
import torch

from swarm.model import LlamaModel, ModelConfig

transformers = pytest.importorskip("transformers")

CASES = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "bias": dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True),
    "llama3-rope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "linear-rope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
}


def make_pair(case: str, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        **CASES[case],
    )
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    # HF initialises biases to zero; make them matter.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    config = ModelConfig.from_hf(hf_cfg.to_dict())
    ours = LlamaModel(config).eval()
    state = {k.removeprefix("model."): v for k, v in ref.state_dict().items()}
    mapped = {}
    for k, v in state.items():
        if k.startswith("layers."):
            mapped["span.blocks." + k.removeprefix("layers.")] = v
        elif k in ("embed_tokens.weight", "norm.weight"):
            mapped["client." + k] = v
        elif k == "lm_head.weight":
            mapped["client.lm_head.weight"] = v
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    return ref, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    ref, ours = make_pair(case)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["gqa-untied", "llama3-rope"])
def test_cached_decoding_matches_full_forward(case):
    _, ours = make_pair(case)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = ours(ids)
        caches = ours.new_caches(batch=2, max_len=32)
        parts = [ours(ids[:, :10], 0, caches)]
        for t in range(10, 24):
            parts.append(ours(ids[:, t : t + 1], t, caches))
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-4


def test_replay_from_earlier_position_overwrites_cache():
    _, ours = make_pair("gqa-untied")
    ids = torch.randint(0, 97, (1, 12))
    other = torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        full = ours(ids)
        caches = ours.new_caches(batch=1, max_len=16)
        ours(ids[:, :8], 0, caches)
        ours(other, 8, caches)  # a step the client later replays differently
        replay = ours(ids[:, 8:], 8, caches)
    assert (replay - full[:, 8:]).abs().max().item() < 1e-4


def test_span_runs_blocks_on_its_own():
    _, ours = make_pair("gqa-untied")
    from swarm.model import BlockSpan

    ids = torch.randint(0, 97, (1, 9))
    spans = [BlockSpan(ours.config, 0, 1), BlockSpan(ours.config, 1, 3)]
    spans[0].blocks[0].load_state_dict(ours.span.blocks[0].state_dict())
    for i in range(2):
        spans[1].blocks[i].load_state_dict(ours.span.blocks[i + 1].state_dict())
    with torch.no_grad():
        h = ours.client.embed(ids)
        for s in spans:
            h = s(h)
        assert (ours.client.logits(h) - ours(ids)).abs().max().item() < 1e-5


def test_block_range_outside_model_is_rejected():
    from swarm.model import BlockSpan

    _, ours = make_pair("gqa-untied")
    with pytest.raises(ValueError, match="outside"):
        BlockSpan(ours.config, 2, 5)


def test_unsupported_architecture_is_a_clear_error():
    from swarm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="unsupported architecture"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
