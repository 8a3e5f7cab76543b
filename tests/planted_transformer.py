"""Planted answers for the transformer lesson's exercises (22_transformer): the reference and plausible mistakes."""
import torch


# ---- exercise 1: attention with a boolean mask
def _attn(q, k, v, mask, scale=True, invert=False, axis=-1, fill=float('-inf')):
    s = q @ k.transpose(-2, -1)
    if scale: s = s / q.shape[-1] ** 0.5
    s = s.masked_fill(mask if invert else ~mask, fill)
    return s.softmax(axis) @ v


def attn_right(q, k, v, mask):
    return _attn(q, k, v, mask)


def attn_no_sqrt_d(q, k, v, mask):  # forgets the 1/sqrt(d) scale
    return _attn(q, k, v, mask, scale=False)


def attn_mask_inverted(q, k, v, mask):  # blocks the allowed keys instead of the forbidden ones
    return torch.nan_to_num(_attn(q, k, v, mask, invert=True))


def attn_softmax_wrong_axis(q, k, v, mask):  # normalises over queries instead of keys
    return torch.nan_to_num(_attn(q, k, v, mask, axis=-2))


def attn_mask_as_bias(q, k, v, mask):  # adds the 0/1 mask to the scores instead of -inf where False
    return ((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5 + mask.float()).softmax(-1) @ v


def attn_scale_by_d(q, k, v, mask):  # divides by d instead of sqrt(d)
    return _attn(q * q.shape[-1] ** -0.5, k, v, mask)


# ---- exercise 2: row + column image positions
def pos_right(row, col):
    return (row[:, None] + col[None]).reshape(-1, row.shape[1])


def pos_column_major(row, col):  # column-major order: p = j*h + i
    return (row[None, :] + col[:, None]).reshape(-1, row.shape[1])


def pos_modulo_h(row, col):  # row index p % h, column index p // h
    h, w = row.shape[0], col.shape[0]
    p = torch.arange(h * w)
    return row[p % h] + col[(p // h) % w]


def pos_product(row, col):  # multiplies instead of adding
    return (row[:, None] * col[None]).reshape(-1, row.shape[1])


# ---- exercise 3: one cached decoding step
def _step(pk, pv, q, k, v, prepend=False, append=True, scale=True):
    nk = (torch.cat([k, pk], 2) if prepend else torch.cat([pk, k], 2)) if append else pk
    nv = (torch.cat([v, pv], 2) if prepend else torch.cat([pv, v], 2)) if append else pv
    ak, av = (nk, nv) if append else (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
    s = q @ ak.transpose(-2, -1)
    if scale: s = s / q.shape[-1] ** 0.5
    return s.softmax(-1) @ av, nk, nv


def step_right(pk, pv, q, k, v):
    return _step(pk, pv, q, k, v)


def step_prepend(pk, pv, q, k, v):  # new token put before the past: right output, wrong cache order
    return _step(pk, pv, q, k, v, prepend=True)


def step_not_appended(pk, pv, q, k, v):  # attends correctly but returns the old cache
    return _step(pk, pv, q, k, v, append=False)


def step_only_past(pk, pv, q, k, v):  # the new query does not see itself
    nk, nv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    if pk.shape[2] == 0: return v.clone(), nk, nv
    w = (q @ pk.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
    return w @ pv, nk, nv


def step_no_sqrt_d(pk, pv, q, k, v):
    return _step(pk, pv, q, k, v, scale=False)


def step_only_new(pk, pv, q, k, v):  # ignores the cache when attending
    return v.clone(), torch.cat([pk, k], 2), torch.cat([pv, v], 2)


PLANTED = {
    'check_attention': (attn_right, [(attn_no_sqrt_d, '1/√d'), (attn_mask_inverted, 'True in the mask'), (attn_softmax_wrong_axis, 'over the keys'), (attn_mask_as_bias, 'not 0 or 1'), (attn_scale_by_d, 'not by d')]),
    'check_image_positions': (pos_right, [pos_column_major, pos_modulo_h, pos_product]),
    'check_decode_step': (step_right, [step_prepend, step_not_appended, step_only_past, step_no_sqrt_d, step_only_new]),
}
