"""Planted answers for the attention-mask lesson's exercises (21_masks): the reference and plausible mistakes."""
import torch


# ---- exercise 1: the causal mask
def causal_right(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def causal_strict(n):  # diagonal excluded: a token may not attend to itself (off by one)
    return torch.ones(n, n, dtype=torch.bool).tril(-1)


def causal_transposed(n):  # upper triangle: queries see the future, not the past
    return torch.ones(n, n, dtype=torch.bool).triu()


def causal_float(n):  # right pattern as 0/1 floats: SDPA would read it as an additive bias, not a mask
    return torch.ones(n, n).tril()


# ---- exercise 2: the row mask
def _row(L, h, w, extent, image_sees_text=True, transpose=False):
    T = L + h * w
    i = torch.arange(T)
    m = i[None, :] <= i[:, None]
    p = torch.arange(h * w)
    m[L:, L:] &= p[None, :] > p[:, None] - extent
    if not image_sees_text: m[L:, :L] = False
    return m.T.contiguous() if transpose else m


def row_right(L, h, w):
    return _row(L, h, w, w + 1)


def row_extent_w(L, h, w):  # window of w: misses the token in the same column of the previous row
    return _row(L, h, w, w)


def row_image_blind_to_text(L, h, w):  # image tokens do not see the caption
    return _row(L, h, w, w + 1, image_sees_text=False)


def row_transposed(L, h, w):  # key × query instead of query × key
    return _row(L, h, w, w + 1, transpose=True)


def row_window_within_row(L, h, w):  # window restricted to the token's own row (no wraparound)
    m = _row(L, h, w, w + 1)
    r = torch.arange(h * w) // w
    m[L:, L:] &= r[None, :] == r[:, None]
    return m


# ---- exercise 3: the per-position pad lookup
def pad_right(ids, tok, pad, pad_id):
    return torch.where((ids == pad_id)[..., None], pad[:ids.shape[1]], tok[ids])


def pad_shared(ids, tok, pad, pad_id):  # one shared pad vector (row 0) for every position
    return torch.where((ids == pad_id)[..., None], pad[0].expand_as(tok[ids]), tok[ids])


def pad_ignored(ids, tok, pad, pad_id):  # plain token lookup: pads get the token embedding's pad row
    return tok[ids]


def pad_by_count(ids, tok, pad, pad_id):  # k-th pad of the caption gets pad[k] instead of pad[position]
    is_pad = ids == pad_id
    k = (is_pad.long().cumsum(1) - 1).clamp(min=0)  # (B, L) index among pads
    return torch.where(is_pad[..., None], pad[k], tok[ids])


def pad_in_place(ids, tok, pad, pad_id):  # right values, but overwrites the token table's pad row
    out = pad_right(ids, tok, pad, pad_id)
    tok[pad_id] = 0
    return out


PLANTED = {
    'check_causal_mask': (causal_right, [causal_strict, causal_transposed, causal_float]),
    'check_row_mask': (row_right, [row_extent_w, row_image_blind_to_text, row_transposed, row_window_within_row]),
    'check_pad_lookup': (pad_right, [pad_shared, pad_ignored, pad_by_count, pad_in_place]),
}
