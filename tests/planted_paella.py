"Planted answers for the lesson-31 checks: the right one, and the mistakes a learner makes (with the hint each must get)."
import math

import torch


def renoise_right(x, t, noise, u): return torch.where(u < t[:, None], noise, x)
def renoise_inverted(x, t, noise, u): return torch.where(u >= t[:, None], noise, x)          # noises a fraction 1 - t
def renoise_swapped(x, t, noise, u): return torch.where(u < t[:, None], x, noise)            # the arms swapped: the same as inverted
def renoise_one_t(x, t, noise, u): return torch.where(u < t[0], noise, x)                    # the first image's t for all
def renoise_fresh(x, t, noise, u): return torch.where(u < t[:, None], (noise + 1) % 64, x)   # not the given noise
def renoise_in_place(x, t, noise, u):
    x[u < t[:, None]] = noise[u < t[:, None]]; return x


def weight_right(m, t, eta): return 1 - (1 - m.float()) * (1 - t[:, None]) * (1 - eta)
def weight_noised_down(m, t, eta): return 1 - m.float() * (1 - t[:, None]) * (1 - eta)
def weight_no_eta(m, t, eta): return 1 - (1 - m.float()) * (1 - t[:, None])
def weight_t_not_1_minus_t(m, t, eta): return 1 - (1 - m.float()) * t[:, None] * (1 - eta)
def weight_constant(m, t, eta): return torch.where(m, 1.0, eta).expand(m.shape)


def schedule_right(r, kind): return torch.cos(math.pi * r / 2) if kind == 'cosine' else torch.arccos(r) / (math.pi / 2)
def schedule_inverted(r, kind): return 1 - schedule_right(r, kind)
def schedule_sin(r, kind): return torch.sin(math.pi * r / 2) if kind == 'cosine' else torch.arccos(r) / (math.pi / 2)
def schedule_no_pi(r, kind): return torch.cos(r) if kind == 'cosine' else torch.arccos(r)
def schedule_arccos_is_cos(r, kind): return torch.cos(math.pi * r / 2)


PLANTED = {
    'check_renoise': (renoise_right, [(renoise_inverted, 'u < t'), (renoise_swapped, 'u < t'),
                                      (renoise_one_t, 'one ratio per image'), (renoise_fresh, 'the token of `noise`'),
                                      renoise_in_place]),
    'check_paella_weight': (weight_right, [(weight_noised_down, 'noised tokens (m = 1) keep weight 1'),
                                           (weight_no_eta, 'floor'), (weight_t_not_1_minus_t, 'use (1 - t)'),
                                           weight_constant]),
    'check_mask_schedule': (schedule_right, [(schedule_inverted, 'fraction still masked'), (schedule_sin, 'not sin'),
                                             (schedule_no_pi, 'scale r by pi / 2'), (schedule_arccos_is_cos, 'arccos(r) / (pi / 2)')]),
}
