"""The fused probe (idmap.perf.fused): N nets trained as one model through torch.func are N separate
nets: the same outputs, gradients, BN running statistics and weights after SGD steps."""

import copy

import pytest
import torch
import torch.nn.functional as F

from idmap.perf.fused import FusedNets
from idmap.models.resnet import build_resnet

N, BATCH = 3, 8


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("block, bn_batch", [("full_preact", 4), ("original", None)])
def test_n_fused_nets_train_exactly_as_n_separate_nets(block, bn_batch):
    torch.manual_seed(0)
    nets = [build_resnet(8, block=block, widths=[4, 8, 16], bn_batch=bn_batch).train() for _ in range(N)]
    fused = FusedNets(nets)
    separate = [copy.deepcopy(m) for m in nets]
    fused_opt, opts = sgd(fused.params.values()), [sgd(m.parameters()) for m in separate]
    for step in range(2):
        # Each net its own data: fresh random inputs every step.
        x, y = torch.randn(N, BATCH, 3, 16, 16), torch.randint(0, 10, (N, BATCH))
        out = fused(x)
        fused_opt.zero_grad()
        fused.loss(out, y).backward()
        for i, (net, opt) in enumerate(zip(separate, opts)):
            ref = net(x[i])
            opt.zero_grad()
            F.cross_entropy(ref, y[i]).backward()
            torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-5)
            for name, p in net.named_parameters():
                torch.testing.assert_close(fused.params[name].grad[i], p.grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, name=name: f"step {step} grad {name}: {m}")
            opt.step()
        fused_opt.step()
    for i, net in enumerate(separate):
        mine = fused.state_dict(i)
        for name, ref in net.state_dict().items():  # weights, running means/vars, batches tracked
            torch.testing.assert_close(mine[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # The running statistics did move (the check above is not of untouched buffers).
    first_bn = next(k for k in fused.buffers if k.endswith("running_mean"))
    assert not torch.equal(fused.buffers[first_bn][0], torch.zeros_like(fused.buffers[first_bn][0]))


def test_fused_nets_in_eval_mode_use_each_nets_running_statistics():
    torch.manual_seed(1)
    nets = [build_resnet(8, widths=[4, 8, 16]).train() for _ in range(2)]
    for net in nets:  # different running statistics per net
        net(torch.randn(8, 3, 16, 16) * (1 + torch.rand(1)))
    fused = FusedNets(nets).train(False)
    x = torch.randn(2, 4, 3, 16, 16)
    with torch.no_grad():
        out = fused(x)
        for i, net in enumerate(nets):
            torch.testing.assert_close(out[i], net.eval()(x[i]), rtol=1e-4, atol=1e-5)
