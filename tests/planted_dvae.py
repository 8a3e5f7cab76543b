"""Planted answers for the dVAE lesson's exercises (12_dvae): the reference and plausible mistakes."""
import math

import torch


# ---- exercise 1: logit-Laplace negative log-likelihood
def nll_right(x, mu, log_b):
    return math.log(2) + log_b + torch.log(x) + torch.log1p(-x) + (torch.logit(x) - mu).abs() * torch.exp(-log_b)


def nll_no_jacobian(x, mu, log_b):  # the Laplace NLL of logit x, forgetting the 1/(x(1-x)) factor
    return math.log(2) + log_b + (torch.logit(x) - mu).abs() * torch.exp(-log_b)


def nll_log_b_as_b(x, mu, log_b):  # uses the decoder's ln b channel as b itself
    return math.log(2) + torch.log(log_b.abs()) + torch.log(x * (1 - x)) + (torch.logit(x) - mu).abs() / log_b.abs()


def nll_no_logit(x, mu, log_b):  # compares μ with x instead of logit x
    return math.log(2) + log_b + torch.log(x * (1 - x)) + (x - mu).abs() * torch.exp(-log_b)


def nll_sign(x, mu, log_b):  # returns the log-density, not its negative
    return -nll_right(x, mu, log_b)


def nll_mean(x, mu, log_b):  # reduces to a scalar
    return nll_right(x, mu, log_b).mean()


# ---- exercise 2: KL(softmax ‖ uniform) at every position
def kl_right(logits):
    logq = torch.log_softmax(logits.float(), 1)
    return (logq.exp() * logq).sum(1) + math.log(logits.shape[1])


def kl_last_dim(logits):  # softmax over the last axis (channels-last habit)
    logq = torch.log_softmax(logits, -1)
    return ((logq.exp() * logq).sum(-1) + math.log(logits.shape[-1]))


def kl_reversed(logits):  # KL(uniform ‖ q) instead of KL(q ‖ uniform)
    K = logits.shape[1]
    return (-(torch.log_softmax(logits, 1)).mean(1) - math.log(K))


def kl_no_log_k(logits):  # the negative entropy only
    logq = torch.log_softmax(logits, 1)
    return (logq.exp() * logq).sum(1)


def kl_naive_softmax(logits):  # exp without subtracting the maximum: overflows for large logits
    e = logits.exp(); q = e / e.sum(1, keepdim=True)
    return (q * torch.log(q * logits.shape[1])).sum(1)


# ---- exercise 3: KL of the batch's average code usage to uniform
def usage_right(logits):
    q = torch.softmax(logits.float(), 1).mean((0, 2, 3))
    return (q * torch.log(q * q.numel())).sum()


def usage_mean_of_kls(logits):  # the average of the per-position KLs (DALL·E's term), not the KL of the average
    return kl_right(logits).mean()


def usage_softmax_of_mean_logits(logits):  # averages the logits, then takes one softmax
    q = torch.softmax(logits.mean((0, 2, 3)), 0)
    return (q * torch.log(q * q.numel())).sum()


def usage_batch_only(logits):  # averages over the batch only, then averages the positions' KLs
    q = torch.softmax(logits, 1).mean(0)                                   # (K, h, w)
    return (q * torch.log(q * q.shape[0])).sum(0).mean()


def usage_reversed(logits):  # KL(uniform ‖ q̄)
    q = torch.softmax(logits, 1).mean((0, 2, 3))
    return (-torch.log(q * q.numel())).mean()


PLANTED = {
    'check_logit_laplace_nll': (nll_right, [(nll_no_jacobian, 'Jacobian'), (nll_log_b_as_b, 'exp(log_b)'), (nll_no_logit, 'logit x'), (nll_sign, 'negative log-density'), (nll_mean, 'no reduction')]),
    'check_kl_to_uniform': (kl_right, [(kl_last_dim, 'dim 1'), (kl_reversed, 'not KL(uniform'), (kl_no_log_k, 'add ln K'), (kl_naive_softmax, 'not finite')]),
    'check_batch_usage_kl': (usage_right, [(usage_mean_of_kls, 'then one KL'), (usage_softmax_of_mean_logits, 'not the logits'), (usage_batch_only, 'dims 0, 2, 3'), usage_reversed]),
}
