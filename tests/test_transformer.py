"""Transformer blocks: SDPA equals the hand-written formula, cached decoding equals the full forward (causal, DALL·E
row/column/conv pattern, cross-attention), no future leak, row + column positions, parameter counts, bad input."""
import math

import pytest
import torch
from torch.testing import assert_close

from dalle_course.core import InputError
from dalle_course.masks import CausalSpec, additive_mask, causal_mask, dalle_layer_kinds, dalle_layer_specs, image_mask
from dalle_course.transformer import (Block, ImagePositions, KVCache, MultiHeadAttention, TextPositions,
                                      Transformer)

L, H_IMG, W_IMG, D = 3, 3, 4, 16
T = L + H_IMG * W_IMG


@pytest.fixture(autouse=True, scope='module')
def _threads():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)


def by_hand(mha, x, mask, context=None):
    "softmax(QK^T/sqrt(d) + additive mask) V with the module's projections."
    B, n, Dm = x.shape; c = x if context is None else context
    def heads(t): return t.view(B, t.shape[1], mha.h, mha.d).transpose(1, 2)
    q, k, v = heads(mha.q(x)), heads(mha.k(c)), heads(mha.v(c))
    s = q @ k.transpose(-2, -1) / math.sqrt(mha.d)
    if mask is not None: s = s + additive_mask(mask)
    return mha.out((s.softmax(-1) @ v).transpose(1, 2).reshape(B, n, Dm))


@pytest.mark.parametrize('kind', ['causal', 'row', 'column', 'conv'])
def test_sdpa_equals_formula(kind):
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, 4)
    m = image_mask(kind, L, H_IMG, W_IMG, kernel=3)
    x = torch.randn(2, T, D)
    assert_close(mha(x, m), by_hand(mha, x, m))


def test_cross_attention_formula_and_no_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, 2, cross=True, ctx_dim=8)
    x, c = torch.randn(2, 5, D), torch.randn(2, 7, 8)
    assert_close(mha(x, context=c), by_hand(mha, x, None, context=c))
    with pytest.raises(InputError): mha(x)


def decode(model, x, chunks, context=None, max_len=None):
    cache, outs, s = model.new_cache(max_len), [], 0
    for c in chunks:
        outs.append(model(x[:, s:s + c], context=context, cache=cache, start=s)); s += c
    assert s == x.shape[1] and len(cache[0]['self']) == s
    return torch.cat(outs, 1)


PATTERNS = {
    'causal': lambda: [causal_mask(T)] * 3,
    'dalle': lambda: [image_mask(k, L, H_IMG, W_IMG, kernel=3) for k in dalle_layer_kinds(4)],
    'causal_spec': lambda: [CausalSpec(T)] * 3,  # fused SDPA path
    'dalle_spec': lambda: dalle_layer_specs(4, L, H_IMG, W_IMG, kernel=3),
}


@pytest.mark.parametrize('pattern', list(PATTERNS))
@pytest.mark.parametrize('cross', [False, True])
@pytest.mark.parametrize('max_len', [None, 40])  # concatenating cache and preallocated cache
def test_cached_equals_full(pattern, cross, max_len):
    torch.manual_seed(1)
    masks = PATTERNS[pattern]()
    model = Transformer(D, len(masks), 4, masks, cross=cross, ctx_dim=12 if cross else None).eval()
    x, ctx = torch.randn(2, T, D), (torch.randn(2, 5, 12) if cross else None)
    with torch.no_grad():
        full = model(x, context=ctx)
        for chunks in ([1] * T, [L] + [1] * (T - L), [2, 5, 1, 4, 3]):
            assert_close(decode(model, x, chunks, ctx, max_len), full, atol=1e-5, rtol=0)


def test_cache_really_used_and_cross_kv_computed_once():
    "The step must depend on the cache: an emptied-then-refilled wrong cache gives different outputs."
    torch.manual_seed(2)
    model = Transformer(D, 2, 2, [causal_mask(T)] * 2, cross=True).eval()
    x, ctx = torch.randn(1, T, D), torch.randn(1, 4, D)
    with torch.no_grad():
        cache = model.new_cache(); model(x[:, :5], context=ctx, cache=cache, start=0)
        kx = cache[0]['cross'].k
        y = model(x[:, 5:6], context=ctx, cache=cache, start=5)
        assert cache[0]['cross'].k is kx  # context keys reused, not recomputed
        other = model.new_cache(); model(torch.randn(1, 5, D), context=ctx, cache=other, start=0)
        y_other = model(x[:, 5:6], context=ctx, cache=other, start=5)
    assert not torch.allclose(y, y_other)
    assert_close(y, model(x[:, :6], context=ctx)[:, 5:6], atol=1e-5, rtol=0)


def test_preallocated_cache_in_place_and_overflow():
    c = KVCache(max_len=4)
    k = torch.randn(1, 2, 3, 5)
    kk, vv = c.append(k, k + 1)
    buf = c.k
    kk, vv = c.append(k[:, :, :1], k[:, :, :1])
    assert c.k is buf and len(c) == 4 and kk.shape == (1, 2, 4, 5)
    assert_close(kk[:, :, :3], k); assert_close(vv[:, :, 3], k[:, :, 0])
    with pytest.raises(InputError): c.append(k[:, :, :1], k[:, :, :1])


def test_static_write_fills_one_slot_in_place_and_clear_keeps_the_buffers():
    c = KVCache(max_len=6)
    with pytest.raises(InputError, match='preallocated'): c.write(torch.tensor([0]), torch.zeros(1, 2, 1, 5), torch.zeros(1, 2, 1, 5))
    k = torch.randn(1, 2, 3, 5)
    c.append(k, -k)
    assert torch.equal(c.k[:, :, 3:], torch.zeros(1, 2, 3, 5))           # unwritten slots hold zeros, never garbage
    buf, new = c.k, torch.randn(1, 2, 1, 5)
    c.write(torch.tensor([4]), new, 2 * new)                               # slot 4, not slot 3: the position is data
    assert c.k is buf and torch.equal(c.k[:, :, 4:5], new) and torch.equal(c.v[:, :, 4:5], 2 * new)
    assert torch.equal(c.k[:, :, :3], k) and torch.equal(c.k[:, :, 3], torch.zeros(1, 2, 5)) and len(c) == 3
    c.clear(); kk, _ = c.append(k[:, :, :1], k[:, :, :1])
    assert len(c) == 1 and c.k is buf and kk.shape == (1, 2, 1, 5)        # same shape: the buffers are reused
    c.clear(); c.append(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5))
    assert c.k.shape == (3, 2, 6, 5) and c.k is not buf                    # more rows: allocated anew
    with pytest.raises(InputError, match='clear'): c.append(torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 5))  # history kept
    assert len(c) == 1 and c.k.shape == (3, 2, 6, 5)


@pytest.mark.parametrize('kind', ['row', 'column', 'conv'])
def test_no_future_leak(kind):
    torch.manual_seed(3)
    kinds = [kind, kind] if kind != 'conv' else ['row', 'conv']
    model = Transformer(D, 2, 2, [image_mask(k, L, H_IMG, W_IMG, kernel=3) for k in kinds]).eval()
    x = torch.randn(1, T, D)
    with torch.no_grad():
        y = model(x)
        for j in range(T):
            x2 = x.clone(); x2[:, j] = torch.randn(D)
            y2 = model(x2)
            assert torch.equal(y2[:, :j], y[:, :j]), j
            assert not torch.allclose(y2[:, j], y[:, j])  # the changed token itself does change


def test_full_attention_without_masks_sees_everything():
    torch.manual_seed(4)
    model = Transformer(D, 1, 2).eval()
    x = torch.randn(1, 6, D)
    with torch.no_grad():
        x2 = x.clone(); x2[:, -1] = 10 * torch.randn(D)
        assert (model(x)[:, 0] - model(x2)[:, 0]).abs().max() > 1e-4


def test_image_positions_brute_force():
    torch.manual_seed(0)
    ip = ImagePositions(3, 5, 7)
    full = ip()
    assert full.shape == (15, 7)
    for i in range(3):
        for j in range(5): assert_close(full[i * 5 + j], ip.row[i] + ip.col[j])
    assert_close(ip(6, start=4), full[4:10])
    tp = TextPositions(6, 7)
    assert_close(tp(2, start=3), tp.emb[3:5]); assert tp().shape == (6, 7)
    with pytest.raises(InputError): ip(2, start=14)
    with pytest.raises(InputError): tp(7)


@pytest.mark.parametrize('dim,ratio,cross', [(16, 4, False), (24, 2, True)])
def test_block_parameter_count(dim, ratio, cross):
    ln, attn = 2 * dim, 4 * (dim * dim + dim)
    mlp = dim * ratio * dim + ratio * dim + ratio * dim * dim + dim
    hand = 2 * ln + attn + mlp + (ln + attn if cross else 0)
    assert sum(p.numel() for p in Block(dim, 4, ratio, cross=cross).parameters()) == hand


def test_block_is_pre_norm_residual():
    "Zeroing the output projections and the last MLP layer makes the block the identity (residuals, norm inside)."
    torch.manual_seed(5)
    blk = Block(D, 2, cross=True)
    for lin in (blk.attn.out, blk.xattn.out, blk.mlp[-1]):
        torch.nn.init.zeros_(lin.weight); torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 5, D) * 3
    assert_close(blk(x, causal_mask(5), context=torch.randn(2, 3, D)), x)


def test_masks_deduplicated_and_not_saved():
    masks = [image_mask(k, L, H_IMG, W_IMG) for k in dalle_layer_kinds(8)]
    model = Transformer(D, 8, 2, masks)
    assert len({i for i in model.mask_idx}) == 3
    assert not any(k.startswith('mask') for k in model.state_dict())
    for i, m in enumerate(masks): assert torch.equal(model.mask(i), m)


def test_bad_input():
    with pytest.raises(InputError): MultiHeadAttention(10, 3)
    with pytest.raises(InputError): Transformer(D, 2, 2, [causal_mask(4)])
    with pytest.raises(InputError): Transformer(D, 1, 2, [causal_mask(4).float()])
    model = Transformer(D, 1, 2, [causal_mask(4)])
    with pytest.raises(InputError): model(torch.randn(1, 2, D), start=1)
    with pytest.raises(InputError): model(torch.randn(1, 5, D))
    cache = model.new_cache(); model(torch.randn(1, 2, D), cache=cache, start=0)
    with pytest.raises(InputError): model(torch.randn(1, 1, D), cache=cache, start=3)


def test_flex_attention_equals_the_dense_masks_where_it_runs():
    "FlexAttention with block masks from the specs == SDPA with the dense masks (the reference), for a G1 with DALL-E's masks."
    import pytest
    from dalle_course.core import InputError
    from dalle_course.prior import JointPrior
    torch.manual_seed(0)
    prior = JointPrior(40, 16, 8, 8, 8, dim=32, depth=4, n_heads=4, mask_pattern='dalle').eval()
    text, img = torch.randint(1, 40, (2, 8)), torch.randint(0, 16, (2, 64))
    with torch.no_grad():
        ref = prior(text, img)
        tr = prior.transformer.set_attention('flex')
        out = prior(text, img)
        assert tr.block_mask(0, tr.max_len, 'cpu') is tr.block_mask(1, tr.max_len, 'cpu')  # built once: layers 0, 1 share a spec
        n_masks = len(tr._block_masks)
        prior(text, img)
        assert len(tr._block_masks) == n_masks == 3  # row, column, conv; the cache is reused on the next forward
    for k in ref: torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)
    # a wrong block mask (the row layers' predicate for every layer) must not pass for the reference
    with torch.no_grad():
        spec0 = tr.specs[0]
        tr.specs = [spec0 if s is not None else None for s in tr.specs]; tr._block_masks.clear()
        wrong = prior(text, img)['image_logits']
    assert (wrong - ref['image_logits']).abs().max() > 1e-3
    with pytest.raises(InputError, match='no backward on the CPU'):
        prior.train(); prior(text, img)
    with pytest.raises(InputError, match="use 'sdpa' or 'flex'"): tr.set_attention('dense')
    from dalle_course.transformer import Transformer
    with pytest.raises(InputError, match='no attention dropout'): Transformer(32, 1, 4, dropout=0.1).set_attention('flex')


def test_compiled_training_step_of_a_g1_on_a_16x16_grid():
    "torch.compile of a G1's forward and backward at a 16x16 grid (inductor's CPU backward once aborted the process there)."
    import subprocess, sys
    code = ("import torch; from dalle_course.prior import JointPrior; torch.manual_seed(0)\n"
            "p = JointPrior(30, 16, 4, 16, 16, dim=16, depth=1, n_heads=2, mask_pattern='causal')\n"
            "b = {'text': torch.randint(1, 30, (2, 4)), 'image': torch.randint(0, 16, (2, 256))}\n"
            "loss, _ = p.loss_fn(torch.compile(p), b); loss.backward()\n"
            "ref = p.image_pos.row.grad.clone(); p.zero_grad(); p.loss_fn(p, b)[0].backward()\n"
            "torch.testing.assert_close(ref, p.image_pos.row.grad, atol=1e-5, rtol=1e-4); print('ok')\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-2000:]
