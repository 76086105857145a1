"""Fine-tuning scenarios with real peer processes: gradients equal local autograd, loss falls,
adapters generate as transformers + peft do, two adapters at once, bad adapters, SIGKILL.

The tests share one swarm (module scope) and run in file order: the last one kills a peer.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from petals_like.model import DistributedModelForCausalLM
from petals_like.tuning import RemoteTuning
from swarm.errors import BadRequest, CacheFull
from swarm.model import lora
from tests.conftest import REPO, Swarm
from tests.conftest import connect as shared_connect

pytestmark = pytest.mark.slow

IDS = torch.tensor([[5, 17, 42, 8, 60, 11, 99, 23, 3, 77], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
PROMPT = [5, 17, 42, 8, 60, 11]
NEW = 12
ALL = ["q", "k", "v", "o", "gate", "up", "down"]
CAPS = ["--max-adapters", "6", "--max-adapter-rank", "16", "--adapter-cache-mb", "0.25"]


@pytest.fixture(scope="module")
def swarm(swarm_factory) -> Swarm:
    s = swarm_factory({"a": "0:3", "b": "3:6", "c": "3:6"}, flags=("--quant", "none", *CAPS))
    s.close_dht()  # the tests read nothing from the DHT
    return s


@pytest.fixture(scope="module")
def local_model(tiny_model_dir):
    from swarm.model.loading import load_model

    return load_model(str(tiny_model_dir), progress=False)


def connect(swarm: Swarm, model_dir, **kw) -> DistributedModelForCausalLM:
    # fp32 on the wire: gradients and logits are compared with local autograd
    return shared_connect(swarm, model_dir, compression="none", **kw)


def randomize_lora(tuning: RemoteTuning, seed: int, std: float = 0.3) -> None:
    """LoRA B starts at zero (the adapter does nothing): give every tensor some weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuning.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def local_logits(local_model, tuning: RemoteTuning, ids: torch.Tensor) -> torch.Tensor:
    """The same model and adapter in this process: the reference."""
    n = local_model.config.num_layers
    params: lora.BlockTensors = {}
    for b, name, p in tuning.named_block_params(0, n):
        params.setdefault(b, {})[name] = p
    blocks = [(i, local_model.span.blocks[i]) for i in range(n)]
    x = tuning.prepend(local_model.client.embed(ids))
    with lora.applied(blocks, tuning.spec, params):
        hidden = local_model.span(x)
    return local_model.client.logits(hidden[:, tuning.pre_seq_len :])


def local_loss(local_model, tuning: RemoteTuning, ids: torch.Tensor) -> torch.Tensor:
    logits = local_logits(local_model, tuning, ids)
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "method,options",
    [("lora", {"rank": 4, "alpha": 8.0, "targets": ALL}), ("deep_ptune", {"pre_seq_len": 3})],
)
def test_scenario_gradients_through_three_peers_equal_local_autograd(
    swarm, tiny_model_dir, local_model, method, options
):
    with connect(swarm, tiny_model_dir, tuning=method, **options) as model:
        randomize_lora(model.tuning, seed=1, std=0.1)
        reference = copy.deepcopy(model.tuning)
        loss, _ = model(IDS, labels=IDS)
        loss.backward()
        want = local_loss(local_model, reference, IDS)
        want.backward()
        assert abs(loss.item() - want.item()) < 1e-5
        worst = 0.0
        for (name, p), (_, q) in zip(
            model.tuning.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert p.grad is not None, name
            err = float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12))
            worst = max(worst, err)
        print(f"{method}: loss {loss.item():.5f}, worst relative L2 gradient error {worst:.2e}")
        # fp32 on the wire and the same ops: only the order of float sums differs.
        assert worst < 1e-4


@pytest.mark.timeout(300)
def test_scenario_lora_loss_decreases_on_the_tiny_model(swarm, tiny_model_dir):
    torch.manual_seed(0)
    with connect(swarm, tiny_model_dir, tuning="lora", rank=4, targets=["q", "v", "down"]) as m:
        opt = torch.optim.Adam(m.parameters(), lr=3e-2)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss, _ = m(IDS, labels=IDS)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    print("lora losses:", " ".join(f"{x:.3f}" for x in losses))
    assert losses[-1] < 0.8 * losses[0]


def hf_greedy(tiny_model_dir, adapter_dir, prompt, new) -> list[int]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():  # greedy by hand: generate() would stop at (or avoid) EOS
        for _ in range(new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def adapters(swarm, tiny_model_dir, tmp_path_factory):
    """Two LoRA folders: one saved by us, one made and saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    with connect(swarm, tiny_model_dir, tuning="lora", rank=4, alpha=8.0, targets=ALL) as m:
        randomize_lora(m.tuning, seed=2)
        m.save_adapter(str(root / "ours"))
    torch.manual_seed(3)
    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"])
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(str(root / "peft"))
    return {"ours": root / "ours", "peft": root / "peft"}


@pytest.mark.timeout(300)
def test_scenario_saved_adapter_generates_as_transformers_and_peft(swarm, tiny_model_dir, adapters):
    keys = json.loads((adapters["ours"] / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA" and keys["r"] == 4
    from safetensors.torch import load_file

    names = load_file(str(adapters["ours"] / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    plain = None
    for kind in ("ours", "peft"):
        want = hf_greedy(tiny_model_dir, adapters[kind], PROMPT, NEW)
        with connect(swarm, tiny_model_dir, adapter=str(adapters[kind])) as model:
            got = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)[0, len(PROMPT) :]
        assert got.tolist() == want, kind
        if plain is None:
            with connect(swarm, tiny_model_dir) as model:
                plain = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)
        assert got.tolist() != plain[0, len(PROMPT) :].tolist(), "the adapter changed nothing"


@pytest.mark.timeout(300)
def test_scenario_soft_and_deep_prompts_generate_as_locally(
    swarm, tiny_model_dir, local_model, tmp_path
):
    for method in ("ptune", "deep_ptune"):
        with connect(swarm, tiny_model_dir, tuning=method, pre_seq_len=3) as model:
            randomize_lora(model.tuning, seed=4, std=0.5)
            model.save_adapter(str(tmp_path / method))
        with connect(swarm, tiny_model_dir, adapter=str(tmp_path / method)) as model:
            got = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)[0, len(PROMPT) :]
            tuning = model.tuning
        ids = torch.tensor([PROMPT])
        with torch.no_grad():  # the same adapter here, greedy by hand
            for _ in range(NEW):
                nxt = local_logits(local_model, tuning, ids)[:, -1].argmax(-1)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
        assert got.tolist() == ids[0, len(PROMPT) :].tolist(), method


@pytest.mark.timeout(300)
def test_scenario_two_clients_with_different_adapters_each_get_their_own(
    swarm, tiny_model_dir, adapters
):
    kinds = ["ours", "peft"]
    models = [connect(swarm, tiny_model_dir, adapter=str(adapters[k])) for k in kinds]
    try:
        alone = [m.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False) for m in models]
        assert alone[0].tolist() != alone[1].tolist()
        results: list = [None, None]
        barrier = threading.Barrier(2)

        def run(i: int) -> None:
            barrier.wait(30)
            try:
                results[i] = models[i].generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)
            except Exception as e:  # reported by the assertion below
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(200)
    finally:
        for m in models:
            m.close()
    for i in range(2):
        assert not isinstance(results[i], Exception), results[i]
        assert results[i].tolist() == alone[i].tolist()


@pytest.mark.timeout(300)
def test_scenario_bad_adapters_are_refused_and_the_peer_serves_on(swarm, tiny_model_dir):
    from swarm.model.config import ModelConfig
    from swarm.model.loading import load_config

    config: ModelConfig = load_config(str(tiny_model_dir))
    with connect(swarm, tiny_model_dir) as model:
        client, peer = model.router.client, swarm.peers["a"].peer_id
        x = torch.randn(1, 4, config.hidden_size)

        def payload(spec, shapes=None, dtype=torch.float32, blocks=(0, 1, 2)):
            shapes = shapes or lora.block_shapes(config, spec)
            t = {b: {n: torch.randn(s).to(dtype) for n, s in shapes.items()} for b in blocks}
            return lora.AdapterPayload(spec, t)

        def forward(p):
            return model.loop.run(client.forward(peer, x, 0, 3, adapter=p), 30)

        spec = lora.AdapterSpec(rank=2, alpha=2.0, targets=("q_proj",))
        bad = {"q_proj.lora_A": (2, 63), "q_proj.lora_B": (64, 2)}
        with pytest.raises(BadRequest, match="expected float32"):
            forward(payload(spec, bad))
        with pytest.raises(BadRequest, match="float32 with codec"):
            forward(payload(spec, dtype=torch.float16))
        with pytest.raises(BadRequest, match="exceeds this peer's cap"):
            forward(payload(lora.AdapterSpec(rank=17, targets=("q_proj",))))
        with pytest.raises(BadRequest, match="blocks 0:3 exactly"):
            forward(payload(spec, blocks=(0, 1)))
        big = lora.AdapterSpec(rank=16, targets=tuple(lora.TARGETS), pre_seq_len=200)
        with pytest.raises(BadRequest, match="more than this peer"):
            forward(payload(big, blocks=tuple(range(3))))
        forged = payload(spec)
        forged.hash = "0" * 64
        with pytest.raises(BadRequest, match="do not match its hash"):
            forward(forged)
        # Adapters pinned by open sessions: the seventh is one too many (--max-adapters 6).
        streams = []
        try:
            for i in range(6):
                p = payload(lora.AdapterSpec(rank=1, alpha=float(i + 1), targets=("v_proj",)))
                streams.append(model.loop.run(client.open_inference(peer, 0, 3, 8, adapter=p), 30))
            with pytest.raises(CacheFull, match="adapter cache full"):
                p = payload(lora.AdapterSpec(rank=1, alpha=9.0, targets=("v_proj",)))
                model.loop.run(client.open_inference(peer, 0, 3, 8, adapter=p), 30)
        finally:
            for s in streams:
                model.loop.run(s.close(), 30)
        # The peer serves on, with and without adapters.
        assert forward(payload(spec)).shape == x.shape
        out = model.generate(PROMPT, max_new_tokens=4, stop_on_eos=False)
        assert out.shape == (1, len(PROMPT) + 4)


@pytest.mark.timeout(300)
def test_scenario_swarm_finetune_cli_trains_and_saves_a_peft_folder(
    swarm, tiny_model_dir, tmp_path
):
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    save = tmp_path / "adapter"
    cmd = [
        sys.executable,
        "-m",
        "petals_like.finetune_cli",
        "--model",
        str(tiny_model_dir),
        "--initial-peers",
        *swarm.boot,
        str(data),  # a file right after the multiaddrs is given back to --data
        "--method",
        "lora",
        "--steps",
        "6",
        "--rank",
        "4",
        "--lr",
        "0.02",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--compression",
        "none",
        "--save",
        str(save),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[-2:]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 6
    assert all(len(line.split()) == 8 and line.split()[6] == "retries" for line in steps)
    summary = lines[-1]
    assert "lost=0" in summary
    first = float(summary.split("first_loss=")[1].split()[0])
    last = float(summary.split("last_loss=")[1].split()[0])
    assert last < first
    # What it saved loads onto the base model with peft.
    assert (save / "adapter_config.json").exists()
    assert len(hf_greedy(tiny_model_dir, save, PROMPT, 4)) == 4


@pytest.mark.timeout(300)
def test_scenario_sigkill_mid_finetune_loses_no_step(swarm, tiny_model_dir, tmp_path):
    from petals_like.finetune import FinetuneConfig, TokenWindows, finetune

    torch.manual_seed(0)
    ids = [(7 * i * i + 3 * i) % 128 for i in range(600)]
    windows = TokenWindows(ids, 16, 0.1, seed=0)
    config = FinetuneConfig(steps=8, lr=0.02, batch_size=2, seq_len=16)
    killed: list[str] = []
    with connect(swarm, tiny_model_dir, tuning="lora", rank=4) as model:

        def on_step(s) -> None:
            if s.step == 3:
                # The replica of 3:6 the last step used, as a crash (process only).
                hop = next(h for h, _ in model._blocks.last_trace.hops if h.start == 3)
                victim = swarm.by_peer_id(str(hop.peer_id))
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(str(hop.peer_id))

        result = finetune(model, config, windows, on_step)
    print(
        f"sigkill mid-fine-tune: steps {len(result.history)} retries {result.retries} "
        f"lost {result.lost}; losses {[round(s.loss, 3) for s in result.history]}"
    )
    assert killed
    assert result.lost == 0 and len(result.history) == 8
    assert result.retries >= 1
