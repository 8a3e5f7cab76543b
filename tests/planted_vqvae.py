"""Planted answers for the VQ-VAE lesson's exercises (13_vqvae): the reference and plausible mistakes."""
import torch
import torch.nn.functional as F


# ---- check_nearest_codes: nearest_code_grid(z (B, D, h, w), codebook (K, D)) -> (B, h, w) int64
def ncg_right(z, codebook):
    B, D, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)                                             # (N, D)
    d = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook ** 2).sum(1)  # (N, K)
    return d.argmin(1).reshape(B, h, w)


def ncg_no_permute(z, codebook):  # reshapes channels-first straight to (-1, D): mixes channels and positions
    B, D, h, w = z.shape
    flat = z.reshape(-1, D)
    d = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook ** 2).sum(1)
    return d.argmin(1).reshape(B, h, w)


def ncg_dot_product(z, codebook):  # largest dot product instead of smallest distance (ignores ||e||^2)
    B, D, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    return (flat @ codebook.t()).argmax(1).reshape(B, h, w)


def ncg_argmax(z, codebook):  # argmax of the distances: the farthest codeword
    B, D, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    return torch.cdist(flat, codebook).argmax(1).reshape(B, h, w)


def ncg_swapped_hw(z, codebook):  # returns (B, w, h)
    return ncg_right(z, codebook).transpose(1, 2)


def ncg_float(z, codebook):  # returns the indices as floats
    return ncg_right(z, codebook).float()


# ---- check_vq_straight_through: vq_straight_through(z, e) -> (z_q, codebook_loss, commitment_loss)
def st_right(z, e):
    return z + (e - z).detach(), F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach())


def st_no_gradient(z, e):  # returns the codewords themselves: nothing reaches the encoder
    return e, F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach())


def st_no_detach(z, e):  # z + (e - z) without sg: value right, but the gradient flows to e too
    return z + (e - z), F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach())


def st_detach_wrong_side(z, e):  # e + (z - e).detach(): gradient goes to e instead of z
    return e + (z - e).detach(), F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach())


def st_losses_swapped(z, e):  # sg on the wrong side of both losses
    return z + (e - z).detach(), F.mse_loss(z, e.detach()), F.mse_loss(e, z.detach())


def st_no_sg_in_losses(z, e):  # both losses move both z and e
    return z + (e - z).detach(), F.mse_loss(e, z), F.mse_loss(z, e)


def st_sum_over_d(z, e):  # sum over D, mean over N: D times too large
    return z + (e - z).detach(), ((e - z.detach()) ** 2).sum(1).mean(), ((z - e.detach()) ** 2).sum(1).mean()


# ---- check_ema_codebook_step: ema_codebook_step(N, m, z, idx, decay, eps) -> (N_new, m_new, codebook)
def _stats(m, z, idx, K):
    n = torch.bincount(idx, minlength=K).to(m.dtype)
    s = torch.zeros_like(m).index_add_(0, idx, z.to(m.dtype))
    return n, s


def ema_right(N, m, z, idx, decay, eps):
    K = N.shape[0]
    n, s = _stats(m, z, idx, K)
    N_new, m_new = decay * N + (1 - decay) * n, decay * m + (1 - decay) * s
    total = N_new.sum()
    return N_new, m_new, m_new / ((N_new + eps) / (total + K * eps) * total)[:, None]


def ema_no_smoothing(N, m, z, idx, decay, eps):  # forgets Laplace smoothing: 0/0 for never-used codes
    K = N.shape[0]
    n, s = _stats(m, z, idx, K)
    N_new, m_new = decay * N + (1 - decay) * n, decay * m + (1 - decay) * s
    return N_new, m_new, m_new / N_new[:, None]


def ema_decay_swapped(N, m, z, idx, decay, eps):  # weights of the old value and the batch swapped
    K = N.shape[0]
    n, s = _stats(m, z, idx, K)
    N_new, m_new = (1 - decay) * N + decay * n, (1 - decay) * m + decay * s
    total = N_new.sum()
    return N_new, m_new, m_new / ((N_new + eps) / (total + K * eps) * total)[:, None]


def ema_mean_not_sum(N, m, z, idx, decay, eps):  # averages the assigned vectors instead of summing them
    K = N.shape[0]
    n, s = _stats(m, z, idx, K)
    s = s / n.clamp_min(1)[:, None]
    N_new, m_new = decay * N + (1 - decay) * n, decay * m + (1 - decay) * s
    total = N_new.sum()
    return N_new, m_new, m_new / ((N_new + eps) / (total + K * eps) * total)[:, None]


def ema_in_place(N, m, z, idx, decay, eps):  # updates the caller's buffers in place
    K = N.shape[0]
    n, s = _stats(m, z, idx, K)
    N.mul_(decay).add_((1 - decay) * n); m.mul_(decay).add_((1 - decay) * s)
    total = N.sum()
    return N, m, m / ((N + eps) / (total + K * eps) * total)[:, None]


PLANTED = {
    'check_nearest_codes': (ncg_right, [ncg_no_permute, ncg_dot_product, ncg_argmax, ncg_swapped_hw, ncg_float]),
    'check_vq_straight_through': (st_right, [st_no_gradient, st_no_detach, st_detach_wrong_side, st_losses_swapped,
                                             st_no_sg_in_losses, st_sum_over_d]),
    'check_ema_codebook_step': (ema_right, [ema_no_smoothing, ema_decay_swapped, ema_mean_not_sum, ema_in_place]),
}


# ---- check_rotation_trick: rotate_to(z (N, D), e (N, D)) -> value e, gradient lambda R^T g
def _rot_parts(z, e):
    zn, en = z.norm(dim=-1, keepdim=True), e.norm(dim=-1, keepdim=True)
    u, v = (z / zn).detach(), (e / en).detach()
    return zn, en, u, v, F.normalize(u + v, dim=-1)


def rot_right(z, e):
    zn, en, u, v, w = _rot_parts(z, e)
    rz = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * v
    return (en / zn).detach() * rz


def rot_straight_through(z, e):  # the usual STE: right value, identity gradient
    return z + (e - z).detach()


def rot_no_scale(z, e):  # forgets lambda: the value is |z| v, not e
    zn, en, u, v, w = _rot_parts(z, e)
    return z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * v


def rot_grad_through_rotation(z, e):  # R and lambda not detached: gradient also flows through u, v, w and to e
    zn, en = z.norm(dim=-1, keepdim=True), e.norm(dim=-1, keepdim=True)
    u, v = z / zn, e / en
    w = F.normalize(u + v, dim=-1)
    rz = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * v
    return (en / zn) * rz


def rot_transpose(z, e):  # applies R^T (v and u swapped in the second term): the value is wrong
    zn, en, u, v, w = _rot_parts(z, e)
    rz = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * v).sum(-1, keepdim=True) * u
    return (en / zn).detach() * rz


# ---- check_fsq_round: fsq_round(z (N, d), levels) -> bounded, rounded, / floor(L/2), straight-through
def _fsq_bound(z, levels, eps=1e-3, shift=True):
    L = torch.tensor(levels, dtype=z.dtype)
    half = (L - 1) * (1 - eps) / 2
    off = torch.where(L % 2 == 0, 0.5, 0.0)
    return torch.tanh(z + (torch.atanh(off / half) if shift else 0)) * half - off, L


def fsq_right(z, levels):
    b, L = _fsq_bound(z, levels)
    return (b + (b.round() - b).detach()) / (L // 2)


def fsq_no_ste(z, levels):  # plain rounding: no gradient reaches z
    b, L = _fsq_bound(z, levels)
    return b.round() / (L // 2)


def fsq_no_offset(z, levels):  # tanh * (L-1)/2 rounded: an even L gets L+1 levels (the paper's offset is missing)
    L = torch.tensor(levels, dtype=z.dtype)
    b = torch.tanh(z) * (L - 1) * (1 - 1e-3) / 2
    return (b + (b.round() - b).detach()) / (L // 2)


def fsq_no_normalise(z, levels):  # integers, not divided by floor(L/2)
    b, L = _fsq_bound(z, levels)
    return b + (b.round() - b).detach()


PLANTED_QUANTISERS = {
    'check_rotation_trick': (rot_right, [rot_straight_through, rot_no_scale, rot_grad_through_rotation, rot_transpose]),
    'check_fsq_round': (fsq_right, [fsq_no_ste, fsq_no_offset, fsq_no_normalise]),
}
PLANTED.update(PLANTED_QUANTISERS)
