"""Attention masks: brute-force references, causality, self-attention, no future leak through SDPA, layer kinds,
per-position pad embeddings."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dalle_course.core import InputError
from dalle_course.masks import (MASK_KINDS, PadEmbedding, additive_mask, causal_mask, dalle_layer_kinds,
                                image_mask)

GRIDS = [(4, 4, 4), (0, 3, 5), (3, 5, 2), (6, 4, 4), (2, 1, 1), (1, 6, 7)]


@pytest.fixture(autouse=True, scope='module')
def _threads():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)


def reference(kind, L, h, w, extent=None, kernel=11):
    "Loops over (i, j) straight from the lesson's table."
    T = L + h * w; e = w + 1 if extent is None else extent; half = kernel // 2
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            if i < L or j < L: out[i, j] = True; continue
            (rp, cp), (rq, cq) = divmod(i - L, w), divmod(j - L, w)
            out[i, j] = {'causal': True, 'row': (i - j) < e, 'column': cq == cp,
                         'conv': rp - rq <= half and abs(cp - cq) <= half}[kind]
    return out


def test_causal_mask():
    for n in [1, 2, 7]:
        m = causal_mask(n)
        assert m.dtype == torch.bool and m.shape == (n, n)
        assert all(bool(m[i, j]) == (j <= i) for i in range(n) for j in range(n))


@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('L,h,w', GRIDS)
def test_matches_reference(kind, L, h, w):
    for kernel in [3, 5, 11]:
        m = image_mask(kind, L, h, w, kernel=kernel)
        assert m.dtype == torch.bool and m.shape == (L + h * w,) * 2
        assert torch.equal(m, reference(kind, L, h, w, kernel=kernel))
        assert not (m & ~causal_mask(L + h * w)).any()  # subset of causal
        assert m.diagonal().all()  # every token sees itself
        assert m[L:, :L].all() and not m[:L, L:].any()  # image sees all text; text never sees image
        assert torch.equal(m[:L, :L], causal_mask(L))


def test_row_extent_and_known_rows():
    # 4x4, no text: token 5 = (1, 1) sees raster 1..5: (0,1),(0,2),(0,3),(1,0),(1,1)
    assert image_mask('row', 0, 4, 4)[5].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    assert image_mask('column', 0, 4, 4)[13].nonzero().flatten().tolist() == [1, 5, 9, 13]
    # conv 3x3 at (2, 3) of a 4x4 grid: (1,2),(1,3),(2,2),(2,3); clipped at the right border, no wraparound
    assert image_mask('conv', 0, 4, 4, kernel=3)[11].nonzero().flatten().tolist() == [6, 7, 10, 11]
    assert torch.equal(image_mask('row', 2, 3, 3, extent=2), reference('row', 2, 3, 3, extent=2))
    # DALL·E's 32x32 conv 11x11: the top-left token sees itself only, an interior one the causal half-window
    m = image_mask('conv', 0, 32, 32, kernel=11)
    assert m[0].sum() == 1 and m[16 * 32 + 16].sum() == 5 * 11 + 6
    assert image_mask('row', 0, 32, 32)[500].sum() == 33


class OneLayer(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__(); self.h = heads; self.qkv = torch.nn.Linear(d, 3 * d); self.out = torch.nn.Linear(d, d)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D))


def _leaks(mask, seed=0):
    torch.manual_seed(seed); layer = OneLayer(); T = mask.shape[0]
    x = torch.randn(2, T, 16)
    with torch.no_grad():
        y = layer(x, mask)
        x2 = x.clone().unsqueeze(0).repeat(T, 1, 1, 1)  # (T, 2, T, 16): copy j changes token j
        for j in range(T): x2[j, :, j] += 5 * torch.randn(16)
        y2 = layer(x2.view(T * 2, T, 16), mask).view(T, 2, T, 16)
    return [(j, i) for j in range(T) for i in range(j) if (y2[j, :, i] - y[:, i]).abs().max() > 1e-5]  # a leak moves it by O(1)


@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('L,h,w', [(4, 4, 4), (3, 3, 5), (0, 4, 3)])
def test_future_never_leaks(kind, L, h, w):
    assert _leaks(image_mask(kind, L, h, w, kernel=3)) == []


def test_leak_test_catches_a_bad_mask():
    bad = image_mask('column', 4, 4, 4).clone(); bad[6, 9] = True
    assert (9, 6) in _leaks(bad)


@pytest.mark.parametrize('kind', MASK_KINDS)
def test_sdpa_equals_hand_written(kind):
    g = torch.Generator().manual_seed(1)
    m = image_mask(kind, 5, 3, 4, kernel=3); T = m.shape[0]
    q, k, v = (torch.randn(2, 3, T, 8, generator=g) for _ in range(3))
    s = q @ k.transpose(-2, -1) / math.sqrt(8) + additive_mask(m)
    assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=m), s.softmax(-1) @ v)


def test_additive_mask():
    m = image_mask('row', 2, 2, 2)
    a = additive_mask(m, torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a == 0, m) and torch.isneginf(a[~m]).all()


def test_layer_kinds():
    k = dalle_layer_kinds(64)
    assert len(k) == 64 and k[-1] == 'conv' and k.count('conv') == 1
    assert [i for i, x in enumerate(k) if x == 'column'] == list(range(2, 63, 4))
    assert all(x == 'row' for i, x in enumerate(k[:-1]) if (i - 2) % 4)
    assert dalle_layer_kinds(1) == ['conv'] and dalle_layer_kinds(3) == ['row', 'row', 'conv']
    assert dalle_layer_kinds(4) == ['row', 'row', 'column', 'conv']
    with pytest.raises(InputError): dalle_layer_kinds(0)


def test_pad_embedding():
    torch.manual_seed(0)
    pe = PadEmbedding(vocab_size=11, text_len=8, dim=5, pad_id=3)
    ids = torch.tensor([[1, 2, 4, 3, 3, 3], [3, 5, 3, 6, 7, 3]])  # (2, 6)
    out = pe(ids)
    assert out.shape == (2, 6, 5)
    assert not torch.equal(out[0, 3], out[0, 4])  # two pads at different positions differ
    for b in range(2):
        for t in range(6):
            assert torch.equal(out[b, t], pe.pad[t] if ids[b, t] == 3 else pe.tok.weight[ids[b, t]])
    assert torch.equal(out[1, 5], out[0, 5])  # same position, same pad vector across the batch
    (out * torch.randn_like(out)).sum().backward()
    used = {0, 2, 3, 4, 5}
    for t in range(8):
        assert (pe.pad.grad[t].abs().sum() > 0) == (t in used), t
    assert pe.tok.weight.grad[3].abs().sum() == 0  # the token table's pad row is never used
    assert pe.tok.weight.grad[1].abs().sum() > 0


def test_pad_embedding_shares_given_embedding_and_rejects_long_input():
    tok = torch.nn.Embedding(9, 4)
    pe = PadEmbedding(9, 4, 4, pad_id=0, tok=tok)
    assert pe.tok is tok
    assert torch.equal(pe(torch.tensor([[1, 2, 0, 0]]))[0, :2], tok.weight[[1, 2]])
    with pytest.raises(InputError): pe(torch.ones(1, 5, dtype=torch.long))


@pytest.mark.parametrize('args,kw', [(('diag', 2, 2, 2), {}), (('conv', 2, 2, 2), {'kernel': 2}),
                                     (('row', 2, 0, 2), {}), (('row', 2, 2, 2), {'extent': 0})])
def test_bad_input(args, kw):
    with pytest.raises(InputError): image_mask(*args, **kw)
