"""Attention specs: the predicate equals the dense reference for every kind, `is_causal` only for plain causal, the
causal spec takes SDPA's fused path (is_causal=True, no mask) and computes what the dense mask does (full, cached,
extended), and DALL·E's per-layer assignment built into a Transformer."""
import pytest
import torch
from torch.testing import assert_close

import dalle_course.transformer as tr
from dalle_course.core import InputError
from dalle_course.masks import (MASK_KINDS, CausalSpec, ImageSpec, MaskSpec, causal_mask, dalle_layer_kinds,
                                dalle_layer_specs, image_mask)
from dalle_course.transformer import MultiHeadAttention, Transformer

# (text_len, h, w, extent, kernel): no text, text not a multiple of w, non-square grids, a 1-wide and a 1-tall grid
CONFIGS = [(4, 4, 4, None, 3), (0, 3, 5, None, 3), (3, 5, 2, 3, 5), (5, 2, 6, 1, 1), (0, 6, 1, None, 3),
           (2, 1, 7, 8, 11), (3, 4, 5, 2, 5), (1, 1, 1, None, 3)]


@pytest.fixture(autouse=True, scope='module')
def _threads():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)


def loops(kind, L, h, w, extent, kernel):
    "Reference from the lesson's table, one (i, j) pair at a time."
    T = L + h * w; e = w + 1 if extent is None else extent; half = kernel // 2
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            if j < L: out[i, j] = True; continue  # text key: causal (j <= i) is all it takes
            (rp, cp), (rq, cq) = divmod(i - L, w), divmod(j - L, w)
            out[i, j] = {'causal': True, 'row': i - j < e, 'column': cq == cp,
                         'conv': rp - rq <= half and abs(cp - cq) <= half}[kind]
    return out


@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('L,h,w,extent,kernel', CONFIGS)
def test_predicate_equals_dense(kind, L, h, w, extent, kernel):
    spec = ImageSpec(kind, L, h, w, extent=extent, kernel=kernel)
    T = spec.length; ref = spec.dense()
    assert T == L + h * w and ref.dtype == torch.bool and ref.shape == (T, T)
    assert torch.equal(ref, loops(kind, L, h, w, extent, kernel))
    assert torch.equal(ref, image_mask(kind, L, h, w, extent=extent, kernel=kernel))
    t = torch.tensor  # brute force: the predicate on single 0-d index tensors, every (q, k) pair
    pairs = torch.tensor([[bool(spec.mask_mod(0, 0, t(i), t(j))) for j in range(T)] for i in range(T)])
    assert torch.equal(pairs, ref)
    i = torch.arange(T)
    assert torch.equal(spec.mask_mod(None, None, i[:, None], i[None, :]), ref)  # (T, 1) x (1, T) -> (T, T)
    q4, k4 = i.view(1, 1, T, 1).expand(2, 3, T, 1), i.view(1, 1, 1, T)  # FlexAttention-like (B, H, Q, 1), (1, 1, 1, K)
    assert torch.equal(spec.mask_mod(torch.zeros(2, 1, 1, 1), None, q4, k4), ref.expand(2, 3, T, T))
    for n in (0, 1, T // 2, T):
        assert torch.equal(spec.dense(n), ref[:n, :n])


@pytest.mark.parametrize('L,h,w,extent,kernel', CONFIGS[:4])
def test_predicate_equals_flex_create_mask(L, h, w, extent, kernel):
    try:
        from torch.nn.attention.flex_attention import create_mask
        create_mask(CausalSpec(2).mask_mod, None, None, 2, 2, device='cpu')
    except Exception as e:
        pytest.skip(f'flex_attention.create_mask does not run here: {type(e).__name__}')
    for kind in MASK_KINDS:
        spec = ImageSpec(kind, L, h, w, extent=extent, kernel=kernel)
        T = spec.length
        assert torch.equal(create_mask(spec.mask_mod, None, None, T, T, device='cpu')[0, 0], spec.dense())


def test_causal_spec_and_is_causal():
    for n in (1, 2, 9):
        s = CausalSpec(n); i = torch.arange(n)
        assert s.is_causal and torch.equal(s.dense(), causal_mask(n))
        assert torch.equal(s.mask_mod(None, None, i[:, None], i[None, :]), causal_mask(n))
    for kind in MASK_KINDS:
        for L, h, w, extent, kernel in CONFIGS:
            s = ImageSpec(kind, L, h, w, extent=extent, kernel=kernel)
            assert isinstance(s, MaskSpec) and s.is_causal is (kind == 'causal'), (kind, L, h, w)
            if s.is_causal: assert torch.equal(s.dense(), causal_mask(s.length))
    assert ImageSpec('row', 2, 3, 3) == ImageSpec('row', 2, 3, 3) != ImageSpec('row', 2, 3, 3, extent=2)
    assert len({ImageSpec('row', 2, 3, 3), ImageSpec('row', 2, 3, 3), CausalSpec(11)}) == 2  # frozen: hashable


@pytest.mark.parametrize('args,kw', [(('diag', 2, 2, 2), {}), (('conv', 2, 2, 2), {'kernel': 2}),
                                     (('row', 2, 0, 2), {}), (('row', -1, 2, 2), {}), (('row', 2, 2, 2), {'extent': 0})])
def test_bad_spec(args, kw):
    with pytest.raises(InputError): ImageSpec(*args, **kw)


def test_bad_dense_length_and_causal_length():
    with pytest.raises(InputError): ImageSpec('row', 2, 2, 2).dense(7)
    with pytest.raises(InputError): CausalSpec(4).dense(5)
    with pytest.raises(InputError): CausalSpec(0)
    with pytest.raises(InputError): dalle_layer_specs(0, 2, 2, 2)


# ---- the fused causal path in the Transformer
L, H_IMG, W_IMG, D = 3, 3, 4, 16
T = L + H_IMG * W_IMG  # 15


@pytest.fixture
def sdpa_calls(monkeypatch):
    "Record (n_queries, n_keys, is_causal, attn_mask) of every SDPA call made by dalle_course.transformer."
    calls, real = [], tr.F.scaled_dot_product_attention
    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((q.shape[2], k.shape[2], is_causal, attn_mask))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
    monkeypatch.setattr(tr.F, 'scaled_dot_product_attention', spy)
    return calls


def twins(specs, dense, **kw):
    "A spec-built and a tensor-built Transformer with the same weights."
    torch.manual_seed(0)
    a = Transformer(D, len(specs), 4, specs, **kw).eval()
    b = Transformer(D, len(dense), 4, dense, **kw).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def decode(model, x, chunks):
    cache, outs, s = model.new_cache(), [], 0
    for c in chunks:
        outs.append(model(x[:, s:s + c], cache=cache, start=s)); s += c
    return torch.cat(outs, 1)


def test_causal_spec_full_forward_is_fused_and_row_layer_passes_its_mask(sdpa_calls):
    specs = [CausalSpec(T), ImageSpec('row', L, H_IMG, W_IMG), CausalSpec(T)]
    spec_model, dense_model = twins(specs, [s.dense() for s in specs])
    assert spec_model.causal == [True, False, True] and dense_model.causal == [False] * 3
    x = torch.randn(2, T, D)
    with torch.no_grad(): y = spec_model(x)
    assert [(c[2], c[3] is None) for c in sdpa_calls] == [(True, True), (False, False), (True, True)]
    row = sdpa_calls[1][3]
    assert row.dtype == torch.bool and torch.equal(row, image_mask('row', L, H_IMG, W_IMG))
    sdpa_calls.clear()
    with torch.no_grad(): y_dense = dense_model(x)
    assert all(c[2] is False and c[3] is not None for c in sdpa_calls)  # the tensor-built twin always passes masks
    assert_close(y, y_dense, atol=1e-6, rtol=1e-6)


def test_causal_spec_cached_paths(sdpa_calls):
    "Prefix from 0: fused; one new token: no mask; several new tokens after a prefix: the bottom-right rows."
    spec_model, dense_model = twins([CausalSpec(T)] * 2, [causal_mask(T)] * 2)
    x = torch.randn(2, T, D)
    with torch.no_grad():
        full = dense_model(x)
        sdpa_calls.clear()
        inc = decode(spec_model, x, [4, 1, 5, 1, 2, 2])  # prefix, step, extend, step, extend, extend
    assert_close(inc, full, atol=1e-5, rtol=0)
    layer0 = sdpa_calls[::2]
    assert [(n_q, n_k, c) for n_q, n_k, c, _ in layer0] == [(4, 4, True), (1, 5, False), (5, 10, False), (1, 11, False),
                                                             (2, 13, False), (2, 15, False)]
    assert layer0[0][3] is None and layer0[1][3] is None and layer0[3][3] is None
    assert torch.equal(layer0[2][3], causal_mask(T)[5:10, :10])  # (5, 10) rows of the extend, not top-left aligned
    assert torch.equal(layer0[5][3], causal_mask(T)[13:15, :15])


@pytest.mark.parametrize('chunks', [[1] * T, [L] + [1] * (T - L), [6, 4, 1, 4], [T]])
def test_spec_models_equal_dense_models_step_by_step(chunks):
    "A causal-spec stack and a DALL·E-spec stack equal their tensor twins, full and cached."
    for specs in ([CausalSpec(T)] * 3, dalle_layer_specs(4, L, H_IMG, W_IMG, kernel=3),
                  [CausalSpec(T), ImageSpec('column', L, H_IMG, W_IMG), CausalSpec(T)]):
        spec_model, dense_model = twins(specs, [s.dense() for s in specs])
        x = torch.randn(2, T, D)
        with torch.no_grad():
            full = dense_model(x)
            assert_close(spec_model(x), full, atol=1e-6, rtol=1e-6)
            assert_close(decode(spec_model, x, chunks), full, atol=1e-5, rtol=0)
            assert_close(decode(dense_model, x, chunks), full, atol=1e-5, rtol=0)


def test_max_len_materialises_specs_shorter():
    "A prior feeds T - 1 positions: specs are built at max_len, the fused path still holds."
    specs = dalle_layer_specs(3, L, H_IMG, W_IMG, kernel=3) + [CausalSpec(T)]
    model = Transformer(D, 4, 2, specs, max_len=T - 1).eval()
    assert model.max_len == T - 1 and model.new_cache()[0]['self'].max_len == T - 1
    for i, s in enumerate(specs): assert torch.equal(model.mask(i), s.dense()[:T - 1, :T - 1])
    with pytest.raises(InputError): model(torch.randn(1, T, D))
    with pytest.raises(InputError): Transformer(D, 1, 2, [causal_mask(T)], max_len=T - 1)
    with pytest.raises(InputError): Transformer(D, 1, 2, [CausalSpec(T)], max_len=T + 1)
    with pytest.raises(InputError): Transformer(D, 1, 2, ['row'])


def test_mha_is_causal_guards():
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, 2)
    x = torch.randn(1, 5, D)
    assert_close(mha(x, is_causal=True), mha(x, causal_mask(5)), atol=1e-6, rtol=1e-6)
    with pytest.raises(InputError): mha(x, causal_mask(5), is_causal=True)
    with pytest.raises(InputError): MultiHeadAttention(D, 2, cross=True)(x, context=x, is_causal=True)
    cache = tr.KVCache(); mha(x[:, :2], cache=cache, is_causal=True)
    with pytest.raises(InputError): mha(x[:, 2:4], cache=cache, is_causal=True)  # top-left would be wrong here


# ---- DALL·E's layer assignment
# Ramesh et al. 2021, Appendix B.1, as in /work/shared/seeds/001_729462cd97075ca5.txt (the OCR there dropped the minus):
#   "Row attention is the default. Column attention is used in every 4th layer, when $i 2 \mod 4 = 0$.
#    Convolutional attention is applied only in the final layer, slightly improving performance."
# Counting layers from 0, (i - 2) % 4 == 0 at i = 2, 6, 10; the final layer is conv even where that rule says column.
R, C, V = 'row', 'column', 'conv'
EXPECTED = {  # typed by hand
    1: [V],
    2: [R, V],
    3: [R, R, V],
    4: [R, R, C, V],
    5: [R, R, C, R, V],
    6: [R, R, C, R, R, V],
    7: [R, R, C, R, R, R, V],  # layer 6 would be column, but it is the last
    8: [R, R, C, R, R, R, C, V],
    9: [R, R, C, R, R, R, C, R, V],
    10: [R, R, C, R, R, R, C, R, R, V],
    11: [R, R, C, R, R, R, C, R, R, R, V],  # layer 10 would be column, but it is the last
    12: [R, R, C, R, R, R, C, R, R, R, C, V],
}


@pytest.mark.parametrize('depth', list(EXPECTED))
def test_dalle_layer_kinds_and_specs_per_layer(depth):
    assert dalle_layer_kinds(depth) == EXPECTED[depth]
    specs = dalle_layer_specs(depth, L, H_IMG, W_IMG, kernel=5)
    assert [s.kind for s in specs] == EXPECTED[depth]
    assert all(isinstance(s, ImageSpec) and (s.text_len, s.h, s.w, s.kernel) == (L, H_IMG, W_IMG, 5) for s in specs)


@pytest.mark.parametrize('depth', [4, 7, 12])
def test_transformer_from_dalle_specs_has_the_right_mask_per_layer(depth):
    model = Transformer(D, depth, 2, dalle_layer_specs(depth, L, H_IMG, W_IMG, kernel=3))
    assert model.causal == [False] * depth
    for i, kind in enumerate(EXPECTED[depth]):
        assert torch.equal(model.mask(i), image_mask(kind, L, H_IMG, W_IMG, kernel=3)), (depth, i, kind)
    assert len(set(model.mask_idx)) == len(set(EXPECTED[depth]))  # deduplicated: one buffer per kind
    # 3 text + 3x4 grid: query = image token (2, 1) at position 3 + 9 = 12.
    # Key (0, 1) at position 3 + 1 = 4 is above it in its column, but 8 raster steps back (row extent is 5).
    row, col = model.mask(0), model.mask(2)
    assert not row[12, 4] and col[12, 4]
    # Key (2, 0) at position 11 is the previous raster token, in another column.
    assert row[12, 11] and not col[12, 11]
