"""Lesson 35 as a user calls it: fp16 underflow in a deep stack, one loss scale against a scale per resblock, and
PowerSGD through DDP's communication hook on two Gloo processes."""
import math

import pytest
import torch

from dalle_course.sixteen_bit import (ResStack, block_grads, ddp_run, fit_block_scales, grad_report, scale_grad,
                                      update_scale)

@pytest.fixture(scope='module')
def stack():
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    return ResStack().half_branches(), x, y, block_grads(ResStack(), x, y)


def test_reference_gradients_span_more_than_fp16(stack):
    _, _, _, ref = stack
    top = [math.log2(r.abs().max()) for r in ref]
    assert top[0] - top[-1] > 40  # more binades than fp16 holds, subnormals included


def test_plain_fp16_loses_the_deep_blocks(stack):
    m, x, y, ref = stack
    r = grad_report(block_grads(m, x, y), ref)
    assert r['ok'][0] and not r['ok'][-1]
    assert r['underflow'][-1] == 1.0 and r['underflow'][0] == 0.0  # the deepest block: every gradient is 0


def test_no_global_scale_gets_every_block_right(stack):
    m, x, y, ref = stack
    for k in range(0, 64, 2):
        r = grad_report(block_grads(m, x, y, loss_scale=2.0 ** k), ref)
        assert not all(r['ok']), f'loss scale 2^{k} got every block within 1%'


def test_a_scale_per_resblock_does(stack):
    m, x, y, ref = stack
    fit = fit_block_scales(m, x, y, ref)
    r = grad_report(fit['grads'], ref)  # each block's last update
    assert all(r['ok']) and all(r['finite']) and max(r['rel_error']) < 0.01
    scales = fit['scales']
    assert scales[-1] / scales[0] > 2 ** 20  # the deep blocks need scales no shared one can give
    assert all(sum(h['finite']) < len(scales) for h in fit['history'][:3])  # the start scale overflows the shallow blocks


def test_the_filter_keeps_an_overflow_inside_its_block(stack):
    m, x, y, ref = stack
    scales = [2.0 ** 10] * len(m.blocks); scales[3] = 2.0 ** 60  # block 3 overflows; blocks 0-2 get its gradient next
    r = grad_report(block_grads(m, x, y, block_scales=scales), ref)
    assert not r['finite'][3] and all(r['finite'][:3]) and all(r['finite'][4:])


def test_block_scales_and_loss_scale_are_undone(stack):
    "Scaled or not, a block's gradients come back in fp32 units: a wrong unscale would be off by the scale."
    m, x, y, ref = stack
    r1 = block_grads(m, x, y, block_scales=[2.0 ** 8] * len(m.blocks))
    r2 = block_grads(m, x, y, loss_scale=2.0 ** 4, block_scales=[2.0 ** 4] * len(m.blocks))
    for a in (r1, r2): assert grad_report(a[:2], ref[:2])['rel_error'][0] < 0.01  # block 0 in fp32 units, both ways
    assert all(b.scale is None for b in m.blocks)  # left as found


def test_scale_grad_and_update_scale():
    x = torch.randn(3, requires_grad=True)
    y = scale_grad(x, 4.0); y.backward(torch.tensor([1.0, float('inf'), 2.0]))
    assert torch.equal(y.detach(), x.detach()) and x.grad.tolist() == [4.0, float('inf'), 8.0]
    x.grad = None; scale_grad(x, 0.5, filter_nonfinite=True).backward(torch.tensor([1.0, float('nan'), float('inf')]))
    assert x.grad.tolist() == [0.5, 0.0, 0.0]
    s, g = 8.0, 0
    for f, want in [(True, 8.0), (True, 16.0), (False, 8.0), (True, 8.0), (True, 16.0)]:
        s, g = update_scale(s, g, f, every=2); assert s == want


def test_powersgd_compresses_and_still_learns():
    plain, low = ddp_run(None, steps=40), ddp_run(4, steps=40)
    assert plain['compression'] is None and low['compression']['rate'] > 10
    assert low['compression']['after'] < low['compression']['before'] / 10
    assert plain['losses'][0] == pytest.approx(low['losses'][0])  # the same model and data before any update
    for o in (plain, low): assert sum(o['losses'][-5:]) / 5 < 0.7 * o['losses'][0]
