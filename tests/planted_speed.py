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


PLANTED = {
    'check_static_attend': (attend_right, [(attend_no_scale, '1/sqrt(d)'), (attend_no_bias, 'before the softmax'),
                                           attend_bias_after, attend_kt_as_k, attend_in_place]),
}
