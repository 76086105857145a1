"""AdamW with fp32 and 8-bit (block-wise dynamic) moments against torch.optim.AdamW.

The 8-bit variant must track the fp32 one closely and move the state through download tensors.
"""

import pytest
import torch

from swarm.errors import BadRequest
from swarm.training.optim8bit import AdamConfig, AdamW


def _run(eight_bit: bool, steps: int = 30):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 48))
    opt = AdamW([w], AdamConfig(lr=1e-2, weight_decay=0.01), eight_bit=eight_bit)
    target = torch.randn(64, 48)
    for _ in range(steps):
        w.grad = 2 * (w.detach() - target)
        opt.step()
    return w.detach().clone(), opt


def test_fp32_matches_torch_adamw():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 48))
    ref = torch.nn.Parameter(w.detach().clone())
    ours = AdamW([w], AdamConfig(lr=1e-2, weight_decay=0.01))
    theirs = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.01, eps=1e-8)
    for _ in range(20):
        g = torch.randn(64, 48)
        w.grad, ref.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert (w - ref).abs().max() < 1e-5


def test_eight_bit_tracks_fp32_and_is_smaller():
    w32, opt32 = _run(False)
    w8, opt8 = _run(True)
    assert (w8 - w32).norm() / w32.norm() < 0.02
    assert opt8.state_bytes() < opt32.state_bytes() / 3


@pytest.mark.parametrize("eight_bit", [False, True])
def test_state_round_trip(eight_bit):
    w, opt = _run(eight_bit, steps=3)
    other = AdamW([torch.nn.Parameter(w.clone())], AdamConfig(lr=1e-2), eight_bit=eight_bit)
    other.load_state_tensors(opt.state_tensors(), opt.step_count)
    assert other.step_count == 3
    for a, b in zip(other.state_tensors(), opt.state_tensors(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(BadRequest):
        other.load_state_tensors(opt.state_tensors()[:1], 3)


def test_config_from_wire_rejects_garbage():
    assert AdamConfig.from_wire(AdamConfig(lr=0.5).to_wire()).lr == 0.5
    for bad in (None, [1, 2], ["x", 0.9, 0.99, 1e-8, 0], [1e-3, 1.5, 0.99, 1e-8, 0]):
        with pytest.raises(BadRequest):
            AdamConfig.from_wire(bad)


def test_downloaded_8bit_state_of_wrong_dtype_is_refused():
    w, opt = _run(True, steps=2)
    other = AdamW([torch.nn.Parameter(w.clone())], AdamConfig(lr=1e-2), eight_bit=True)
    tensors = opt.state_tensors()
    tensors[0] = tensors[0].float()  # codes as floats: a peer that lies about its state
    with pytest.raises(BadRequest, match="dtypes"):
        other.load_state_tensors(tensors, 2)
    # 8-bit state offered to an fp32 optimizer (or back) is refused by count, with the hint.
    fp32 = AdamW([torch.nn.Parameter(w.clone())], AdamConfig(lr=1e-2))
    with pytest.raises(BadRequest, match="optim-8bit"):
        fp32.load_state_tensors(opt.state_tensors(), 2)
