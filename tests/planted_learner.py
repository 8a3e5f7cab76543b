"""Planted answers for the learner lesson's exercises (06_learner): the reference and plausible mistakes."""
import math

import torch


def wc_right(step, peak, warmup, total, final=0.0):
    if step < warmup: return peak * step / warmup
    if step >= total: return float(final)
    t = (step - warmup) / (total - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def wc_cosine_over_total(step, peak, warmup, total, final=0.0):  # cosine phase measured over total, not total - warmup
    if step < warmup: return peak * step / warmup
    if step >= total: return float(final)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / total))


def wc_warmup_off_by_one(step, peak, warmup, total, final=0.0):  # starts the warmup at peak/warmup instead of 0
    if step < warmup: return peak * (step + 1) / warmup
    return wc_right(step, peak, warmup, total, final)


def wc_ignores_final(step, peak, warmup, total, final=0.0):  # decays to 0 whatever `final` is
    if step < warmup: return peak * step / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def wc_no_hold(step, peak, warmup, total, final=0.0):  # keeps following the cosine after `total` (rises again)
    if step < warmup: return peak * step / warmup
    t = (step - warmup) / (total - warmup) if total > warmup else 1.0
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def ema_right(ema_params, params, decay):
    with torch.no_grad():
        for e, p in zip(ema_params, params): e.mul_(decay).add_(p, alpha=1 - decay)


def ema_swapped(ema_params, params, decay):  # weights of old and new swapped
    with torch.no_grad():
        for e, p in zip(ema_params, params): e.mul_(1 - decay).add_(p, alpha=decay)


def ema_not_in_place(ema_params, params, decay):  # rebinds list slots: the caller's tensors never change
    for i, (e, p) in enumerate(zip(ema_params, params)):
        ema_params[i] = decay * e + (1 - decay) * p.detach()


def ema_updates_live(ema_params, params, decay):  # averages into the live weights instead of the EMA copy
    with torch.no_grad():
        for e, p in zip(ema_params, params): p.mul_(1 - decay).add_(e, alpha=decay)


PLANTED = {
    'check_warmup_cosine_lr': (wc_right, [wc_cosine_over_total, wc_warmup_off_by_one, wc_ignores_final, wc_no_hold]),
    'check_ema_update': (ema_right, [ema_swapped, ema_not_in_place, ema_updates_live]),
}
