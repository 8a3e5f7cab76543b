"""Planted answers for the Gumbel-softmax lesson's exercises (10_gumbel): the reference and plausible mistakes."""
import torch


def noise_right(u):
    return -torch.log(-torch.log(u))


def noise_sign_error(u):  # log(-log u): a reversed Gumbel (the max becomes a min)
    return torch.log(-torch.log(u))


def noise_one_log(u):  # -log u: exponential noise, the outer log forgotten
    return -torch.log(u)


def noise_in_place(u):  # right values, but computed in place: the caller's uniforms are destroyed
    return u.log_().neg_().log_().neg_()


def noise_float32(u):  # casts to float32: a float64 input comes back in the wrong dtype
    return -torch.log(-torch.log(u.float()))


def relaxed_right(logits, gumbels, tau, dim=-1):
    return torch.softmax((logits + gumbels) / tau, dim=dim)


def relaxed_no_tau(logits, gumbels, tau, dim=-1):  # temperature forgotten
    return torch.softmax(logits + gumbels, dim=dim)


def relaxed_last_dim(logits, gumbels, tau, dim=-1):  # softmax always over the last dimension
    return torch.softmax((logits + gumbels) / tau, dim=-1)


def relaxed_tau_on_logits_only(logits, gumbels, tau, dim=-1):  # only the logits divided by tau
    return torch.softmax(logits / tau + gumbels, dim=dim)


def relaxed_times_tau(logits, gumbels, tau, dim=-1):  # multiplies by tau instead of dividing
    return torch.softmax((logits + gumbels) * tau, dim=dim)


def relaxed_naive_exp(logits, gumbels, tau, dim=-1):  # the formula as written: exp overflows for large logits / tau
    e = torch.exp((logits + gumbels) / tau)
    return e / e.sum(dim, keepdim=True)


def _hard(soft, dim):
    return torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)


def st_right(soft, dim=-1):
    hard = _hard(soft, dim)
    return hard - soft.detach() + soft


def st_no_gradient(soft, dim=-1):  # the one-hot alone: no gradient reaches the logits
    return _hard(soft, dim)


def st_detach_wrong_term(soft, dim=-1):  # stop-gradient on the wrong soft term: exact forward, negated gradient
    return _hard(soft, dim) - (soft - soft.detach())


def st_detach_everything(soft, dim=-1):  # (hard - soft) detached and soft detached too: no gradient
    return (_hard(soft, dim) - soft).detach() + soft.detach()


def st_last_dim(soft, dim=-1):  # argmax and one-hot always over the last dimension
    return st_right(soft, -1)


def st_returns_soft(soft, dim=-1):  # the relaxed sample, not a one-hot
    return soft


def st_float32(soft, dim=-1):  # computed and returned in float32: a bfloat16 input changes dtype
    s = soft.float()
    return _hard(s, dim) - s.detach() + s


PLANTED = {
    'check_gumbel_noise': (noise_right, [(noise_sign_error, 'two minus signs'), (noise_one_log, 'logarithm twice'), noise_in_place, noise_float32]),
    'check_relaxed_sample': (relaxed_right, [(relaxed_no_tau, 'divide by the temperature'), (relaxed_last_dim, 'not always the last'),
                                             (relaxed_tau_on_logits_only, 'the noise too'), (relaxed_times_tau, 'do not multiply'), relaxed_naive_exp]),
    'check_straight_through': (st_right, [st_no_gradient, st_detach_wrong_term, st_detach_everything, st_last_dim,
                                          st_returns_soft, st_float32]),
}
