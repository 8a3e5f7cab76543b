"""Planted answers for the CTRS-perturbation and contrastive-loss checks (lessons 25 and 28)."""
import numpy as np
import torch
import torch.nn.functional as F

SIZES = (10, 3, 4, 3)


# ---- check_ctrs_perturbation: perturb(attrs (3, 4), m, rng) -> (3, 4)
def pert_right(attrs, m, rng):
    a = np.array(attrs, copy=True)
    for k in rng.choice(12, size=m, replace=False):
        s, f = divmod(int(k), 4)
        a[s, f] = (a[s, f] + rng.integers(1, SIZES[f])) % SIZES[f]
    return a


def pert_with_replacement(attrs, m, rng):  # the thesis's code: positions drawn with replacement, so often fewer than m
    a = np.array(attrs, copy=True)
    for k in rng.integers(0, 12, m):
        s, f = divmod(int(k), 4)
        a[s, f] = (a[s, f] + rng.integers(1, SIZES[f])) % SIZES[f]
    return a


def pert_maybe_same(attrs, m, rng):  # the "new" value may equal the old one
    a = np.array(attrs, copy=True)
    for k in rng.choice(12, size=m, replace=False):
        s, f = divmod(int(k), 4)
        a[s, f] = rng.integers(0, SIZES[f])
    return a


def pert_in_place(attrs, m, rng):  # changes the caller's array
    a = np.asarray(attrs)
    for k in rng.choice(12, size=m, replace=False):
        s, f = divmod(int(k), 4)
        a[s, f] = (a[s, f] + rng.integers(1, SIZES[f])) % SIZES[f]
    return a


def pert_always_plus_one(attrs, m, rng):  # not uniform over the other values: always the next one
    a = np.array(attrs, copy=True)
    for k in rng.choice(12, size=m, replace=False):
        s, f = divmod(int(k), 4)
        a[s, f] = (a[s, f] + 1) % SIZES[f]
    return a


def pert_first_positions(attrs, m, rng):  # always the first m positions
    a = np.array(attrs, copy=True)
    for k in range(m):
        s, f = divmod(k, 4)
        a[s, f] = (a[s, f] + rng.integers(1, SIZES[f])) % SIZES[f]
    return a


# ---- check_contrastive_loss: loss(logits (B, B)) -> scalar
def cl_right(l):
    t = torch.arange(len(l))
    return (F.cross_entropy(l, t) + F.cross_entropy(l.T, t)) / 2


def cl_one_direction(l):  # image -> text only
    return F.cross_entropy(l, torch.arange(len(l)))


def cl_sum_not_mean(l):  # summed over the batch
    t = torch.arange(len(l))
    return (F.cross_entropy(l, t, reduction='sum') + F.cross_entropy(l.T, t, reduction='sum')) / 2


def cl_bce(l):  # sigmoid on each pair instead of a softmax over the batch
    return F.binary_cross_entropy_with_logits(l, torch.eye(len(l), dtype=l.dtype))


def cl_softmax_log(l):  # log of the softmax in float32: overflows at CLIP's logit scales (up to 100)
    i, l = torch.arange(len(l)), l.float()
    return -(l.softmax(1).log()[i, i].mean() + l.softmax(0).log()[i, i].mean()) / 2


PLANTED = {
    'check_ctrs_perturbation': (pert_right, [pert_with_replacement, pert_maybe_same, pert_in_place,
                                             pert_always_plus_one, pert_first_positions]),
    'check_contrastive_loss': (cl_right, [cl_one_direction, cl_sum_not_mean, cl_bce, cl_softmax_log]),
}
