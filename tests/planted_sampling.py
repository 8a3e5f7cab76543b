"""Planted answers for the sampling lesson's exercises (24_sampling): the reference and plausible mistakes."""
import torch

NEG = float('-inf')


# ---- exercise 1: top-k
def top_k_right(l, k):
    return l.masked_fill(l < l.topk(k, -1).values[:, -1:], NEG)


def top_k_keeps_one_extra(l, k):  # the (k+1)-th largest as threshold
    kk = min(k + 1, l.shape[-1])
    return l.masked_fill(l < l.topk(kk, -1).values[:, -1:], NEG)


def top_k_zero_not_inf(l, k):  # zero is still a valid logit, so dropped tokens stay sampleable
    return l.masked_fill(l < l.topk(k, -1).values[:, -1:], 0.0)


def top_k_in_place(l, k):  # writes into the caller's logits
    l.masked_fill_(l < l.topk(k, -1).values[:, -1:], NEG)
    return l


def top_k_smallest(l, k):  # keeps the k smallest
    return l.masked_fill(l > l.topk(k, -1, largest=False).values[:, -1:], NEG)


# ---- exercise 2: top-p
def _sorted_probs(l):
    s, i = l.sort(-1, descending=True)
    return s, i, s.softmax(-1)


def top_p_right(l, p):
    s, i, q = _sorted_probs(l)
    return l.masked_fill(torch.zeros_like(q, dtype=torch.bool).scatter(-1, i, q.cumsum(-1) - q >= p), NEG)


def top_p_inclusive_cumsum(l, p):  # drops the token that crosses p (may drop everything)
    s, i, q = _sorted_probs(l)
    return l.masked_fill(torch.zeros_like(q, dtype=torch.bool).scatter(-1, i, q.cumsum(-1) >= p), NEG)


def top_p_not_unsorted(l, p):  # applies the sorted-order decision to the unsorted logits
    s, i, q = _sorted_probs(l)
    return l.masked_fill(q.cumsum(-1) - q >= p, NEG)


def top_p_on_logits(l, p):  # cumulative sum of logits instead of probabilities
    s, i, q = _sorted_probs(l)
    return l.masked_fill(torch.zeros_like(q, dtype=torch.bool).scatter(-1, i, s.cumsum(-1) - s >= p), NEG)


# ---- exercise 3: guidance
def guide_right(l, s):
    c, u = l.chunk(2)
    return u + s * (c - u)


def guide_halves_swapped(l, s):  # treats the first half as unconditional
    u, c = l.chunk(2)
    return u + s * (c - u)


def guide_from_cond(l, s):  # cond + s (cond - uncond): scale 1 is not the plain model
    c, u = l.chunk(2)
    return c + s * (c - u)


def guide_in_probs(l, s):  # mixes probabilities, not logits
    c, u = l.chunk(2)
    return (u.softmax(-1) + s * (c.softmax(-1) - u.softmax(-1))).clamp_min(1e-9).log()


PLANTED = {
    'check_top_k': (top_k_right, [top_k_keeps_one_extra, top_k_zero_not_inf, top_k_in_place, top_k_smallest]),
    'check_top_p': (top_p_right, [top_p_inclusive_cumsum, top_p_not_unsorted, top_p_on_logits]),
    'check_guide': (guide_right, [guide_halves_swapped, guide_from_cond, guide_in_probs]),
}
