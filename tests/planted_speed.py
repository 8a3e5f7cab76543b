"Planted answers for the lesson-32 check: the right one, and the mistakes a learner makes (with the hint each must get)."
import torch


def attend_right(q, kt, v, b): return torch.bmm(torch.baddbmm(b.view(1, 1, -1), q, kt, alpha=q.shape[-1] ** -0.5).softmax(-1), v)
def attend_no_scale(q, kt, v, b): return torch.bmm((torch.bmm(q, kt) + b).softmax(-1), v)                    # no 1/sqrt(d)
def attend_no_bias(q, kt, v, b): return torch.bmm((torch.bmm(q, kt) * q.shape[-1] ** -0.5).softmax(-1), v)   # sees every slot
def attend_bias_after(q, kt, v, b):                                                                         # masks after the softmax
    w = (torch.bmm(q, kt) * q.shape[-1] ** -0.5).softmax(-1)
    return torch.bmm(w * torch.isfinite(b).float(), v)
def attend_kt_as_k(q, kt, v, b):                                                                            # reads kt as (BH, T, d)
    return torch.bmm((torch.bmm(q, kt.reshape(kt.shape[0], kt.shape[2], kt.shape[1]).transpose(1, 2)) * q.shape[-1] ** -0.5 + b).softmax(-1), v)
def attend_in_place(q, kt, v, b):                                                                           # scales the cache in place
    kt.mul_(q.shape[-1] ** -0.5); return torch.bmm((torch.bmm(q, kt) + b).softmax(-1), v)


def _pq(p, q, d): return p.gather(-1, d[..., None])[..., 0], q.gather(-1, d[..., None])[..., 0]
def accept_right(p, q, d, u): py, qy = _pq(p, q, d); return (u * qy < py).long().cumprod(-1).sum(-1)
def accept_loop(p, q, d, u):                                                                                # right, a loop
    B, w = d.shape; out = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        for i in range(w):
            if u[b, i] < p[b, i, d[b, i]] / q[b, i, d[b, i]]: out[b] += 1
            else: break
    return out
def accept_all_passing(p, q, d, u): py, qy = _pq(p, q, d); return (u * qy < py).sum(-1)                     # no stop
def accept_no_q(p, q, d, u): py, qy = _pq(p, q, d); return (u < py).long().cumprod(-1).sum(-1)              # ignores q
def accept_inverted(p, q, d, u): py, qy = _pq(p, q, d); return (u * py < qy).long().cumprod(-1).sum(-1)     # q / p
def accept_argmax(p, q, d, u): return (p.argmax(-1) == d).long().cumprod(-1).sum(-1)                        # greedy match
def accept_in_place(p, q, d, u): u.mul_(1.0 + 0 * u); u += 0; py, qy = _pq(p, q, d); u.clamp_(0, 0.5); return (u * qy < py).long().cumprod(-1).sum(-1)


PLANTED = {
    'check_static_attend': (attend_right, [(attend_no_scale, '1/sqrt(d)'), (attend_no_bias, 'before the softmax'),
                                           attend_bias_after, attend_kt_as_k, attend_in_place]),
    'check_accept_drafts': (accept_right, [(accept_all_passing, 'stop at the first'), (accept_no_q, 'divide by the probability q'),
                                           (accept_inverted, 'not q(y) / p(y)'), accept_argmax, accept_in_place]),
}

RIGHT_TOO = {'check_accept_drafts': [accept_loop]}
