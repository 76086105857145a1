"""Tests of petals_like.peft_format: our folders load in peft, peft's load here, logits agree."""

from __future__ import annotations

import json

import pytest
import torch

from petals_like.peft_format import load_adapter, save_adapter
from petals_like.tuning import RemoteTuning, TuningConfig
from swarm.errors import BadRequest
from swarm.model import lora
from swarm.model.loading import load_config, load_model


def local_logits(model, tuning: RemoteTuning, ids: torch.Tensor) -> torch.Tensor:
    n = model.config.num_layers
    params: lora.BlockTensors = {}
    for b, name, p in tuning.named_block_params(0, n):
        params.setdefault(b, {})[name] = p
    with torch.no_grad(), lora.applied(list(enumerate(model.span.blocks)), tuning.spec, params):
        hidden = model.span(tuning.prepend(model.client.embed(ids)))
        return model.client.logits(hidden[:, tuning.pre_seq_len :])


@pytest.mark.timeout(120)
def test_our_lora_folder_is_peft_and_peft_folders_are_ours(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    config = load_config(str(tiny_model_dir))
    ours = RemoteTuning(config, TuningConfig("lora", rank=3, alpha=5.0, targets=["q", "up"]))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    save_adapter(ours, tmp_path / "ours", "tiny")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["target_modules"] == ["q_proj", "up_proj"]
    ids = torch.tensor([[3, 9, 27, 81, 115, 4]])
    local = load_model(str(tiny_model_dir), progress=False)
    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    assert torch.allclose(local_logits(local, ours, ids), want, atol=1e-4)

    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    made = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=7, target_modules=["k_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
        want = made(input_ids=ids).logits
    made.save_pretrained(str(tmp_path / "peft"))
    loaded = load_adapter(tmp_path / "peft", config)
    assert loaded.spec.rank == 2 and loaded.spec.scale == 3.5
    assert torch.allclose(local_logits(local, loaded, ids), want, atol=1e-4)


def test_prompts_round_trip(tiny_model_dir, tmp_path):
    config = load_config(str(tiny_model_dir))
    t = RemoteTuning(config, TuningConfig("deep_ptune", pre_seq_len=4))
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    save_adapter(t, tmp_path, "tiny")
    back = load_adapter(tmp_path, config)
    assert back.tuning.method == "deep_ptune"
    assert torch.equal(back.prompts, t.prompts)
    assert torch.equal(back.deep_prompts(), t.deep_prompts())


def test_bad_folders_are_clear_errors(tiny_model_dir, tmp_path):
    config = load_config(str(tiny_model_dir))
    with pytest.raises(BadRequest, match="holds no"):
        load_adapter(tmp_path, config)
    t = RemoteTuning(config, TuningConfig("lora", rank=2))
    save_adapter(t, tmp_path, "tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))
    with pytest.raises(BadRequest, match="shape"):
        load_adapter(tmp_path, config)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(BadRequest, match="use_dora"):
        load_adapter(tmp_path, config)
