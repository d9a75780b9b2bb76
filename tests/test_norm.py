"""Ghost batch norm in one pass (issue 20, finding 5): the same numbers as one BN call per chunk."""

import copy

import pytest
import torch
import torch.nn as nn

from idmap.models.resnet import build_resnet
from idmap.models.norm import ChunkedGhostBatchNorm2d, GhostBatchNorm2d, to_chunked


def _pair(bn_batch=8, channels=3):
    """Float64, so that the comparison is tight: the two differ only in summation order."""
    torch.manual_seed(0)
    one = GhostBatchNorm2d(channels, bn_batch).double()
    nn.init.normal_(one.weight)
    nn.init.normal_(one.bias)
    return one, to_chunked(copy.deepcopy(one))


def _step(bn, x):
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y, x.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("n", [32, 20, 8, 5], ids=["4 chunks", "not a multiple", "one chunk", "under one chunk"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_one_pass_ghost_bn_equals_one_bn_per_chunk(n, layout):
    one, chunked = _pair()
    assert type(chunked) is ChunkedGhostBatchNorm2d and type(one) is GhostBatchNorm2d
    for step in range(3):  # running statistics over several steps, from differently scaled batches
        x = (3 + step + 4 * torch.randn(n, 3, 5, 5, dtype=torch.float64)).contiguous(memory_format=layout)
        for a, b in zip(_step(one, x), _step(chunked, x)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for name, buffer in chunked.named_buffers():
        torch.testing.assert_close(getattr(one, name), buffer, rtol=1e-12, atol=1e-12, msg=name)
    assert one.num_batches_tracked == 3 * -(-n // 8)
    one.eval(), chunked.eval()
    x = torch.randn(n, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(one(x), chunked(x), rtol=1e-12, atol=1e-12)


def test_one_pass_ghost_bn_keeps_the_memory_format_and_autocast_dtype():
    one = GhostBatchNorm2d(3, 8)
    x = torch.randn(16, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    assert one(x).is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert one(x.bfloat16()).dtype == torch.bfloat16


def test_to_chunked_swaps_every_ghost_bn_of_a_built_net_keeping_its_tensors():
    model = build_resnet(8, widths=(4, 8, 16), bn_batch=4)
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    ref = copy.deepcopy(model)
    assert to_chunked(model) is model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is ChunkedGhostBatchNorm2d for m in bns)
    assert [id(p) for p in model.parameters()] == params and [id(b) for b in model.buffers()] == buffers
    _assert_same_step(ref, model, grad_tol=1e-4, buffer_tol=1e-5)


def _assert_same_step(a: nn.Module, b: nn.Module, grad_tol: float, buffer_tol: float) -> None:
    """One training step of each on the same batch: the same gradients and BN buffers."""
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 10, (12,))
    for m in (a, b):
        nn.functional.cross_entropy(m(x), y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=grad_tol, atol=grad_tol / 10, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb, rtol=buffer_tol, atol=buffer_tol / 10, msg=name)


class _Calls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_ghost_bn_normalises_a_batch_of_chunks_in_one_pass_without_a_cat():
    """The paper's protocol (128 images, bn_batch=64) once took two BN calls and a cat per BN layer."""
    bn = GhostBatchNorm2d(3, 64)
    with _Calls() as calls:
        bn(torch.randn(128, 3, 4, 4))
    assert "cat" not in calls.names and "batch_norm" not in calls.names, calls.names
    assert calls.names.count("var_mean") == 1, calls.names


def test_eager_activation_checkpointing_updates_one_pass_ghost_bn_statistics_once():
    torch.manual_seed(0)
    plain = build_resnet(8, widths=(4, 8, 16), bn_batch=4)
    recomputed = build_resnet(8, widths=(4, 8, 16), bn_batch=4, checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    _assert_same_step(plain, recomputed, grad_tol=1e-5, buffer_tol=0)
