"Planted answers for the lesson-35 checks: right ones in other styles, and the mistakes a learner makes (with the hint each must get)."
import torch


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s): ctx.s = s; return x.view_as(x)
    @staticmethod
    def backward(ctx, g): return g * ctx.s, None


def scale_right(x, s): return _Scale.apply(x, s)
def scale_detach_trick(x, s): return x + (s - 1) * (x - x.detach())               # right, another style
def scale_hook(x, s):                                                             # right, a tensor hook
    y = x.view_as(x); y.register_hook(lambda g: g * s); return y
def scale_forward(x, s): return x * s                                              # scales the values, not the gradient
def scale_none(x, s): return x.clone()                                             # forgets the backward pass
def scale_divides(x, s): return _Scale.apply(x, 1 / s)                             # divides
def scale_detached(x, s): return x.detach()                                        # no gradient at all
def scale_twice(x, s): return _Scale.apply(_Scale.apply(x, s), s)                  # s squared
def scale_in_place(x, s):                                                          # scales x itself
    with torch.no_grad(): x.mul_(s)
    return _Scale.apply(x, s)


def update_right(scale, good, finite, every):
    if not finite: return scale / 2, 0
    good += 1
    return (scale * 2, 0) if good == every else (scale, good)
def update_modulo(scale, good, finite, every):                                     # right, counting without a reset
    if not finite: return scale * 0.5, 0
    return (scale * 2 if (good + 1) % every == 0 else scale), good + 1
def update_every_step(scale, good, finite, every):                                 # ignores `every`
    return (scale * 2 if finite else scale / 2), 0
def update_no_reset(scale, good, finite, every):                                   # a non-finite step does not restart the run
    if not finite: return scale / 2, good
    good += 1
    return (scale * 2, 0) if good >= every else (scale, good)
def update_never_halves(scale, good, finite, every):                               # skips the step but keeps the scale
    if not finite: return scale, 0
    good += 1
    return (scale * 2, 0) if good == every else (scale, good)
def update_swapped(scale, good, finite, every):                                    # halves on finite steps
    if finite: return scale / 2, 0
    return scale * 2, 0


PLANTED = {
    'check_scale_grad': (scale_right, [(scale_forward, 'backward pass only'), (scale_none, 'multiplies the incoming gradient'),
                                       (scale_divides, 'do not divide'), scale_detached, (scale_twice, 's squared'),
                                       (scale_in_place, 'must not change x')]),
    'check_update_scale': (update_right, [update_every_step, (update_no_reset, 'in a row'),
                                          (update_never_halves, 'halves the scale'), update_swapped]),
}
RIGHT_TOO = {'check_scale_grad': [scale_detach_trick, scale_hook], 'check_update_scale': [update_modulo]}


def scale_hook_on_x(x, s):                                                        # scales every gradient x receives
    if x.requires_grad: x.register_hook(lambda g: g * s)
    return x


class _Shared(torch.autograd.Function):
    s = 1.0
    @staticmethod
    def forward(ctx, x): return x.view_as(x)
    @staticmethod
    def backward(ctx, g): return g * _Shared.s


def scale_shared(x, s):                                                            # one s for every call: the last one's
    _Shared.s = s; return _Shared.apply(x)


def update_floor(scale, good, finite, every):                                      # floor division
    if not finite: return scale // 2, 0
    good += 1
    return (scale * 2, 0) if good == every else (scale, good)


def update_clamped(scale, good, finite, every):                                    # never below 1
    if not finite: return max(scale / 2, 1.0), 0
    good += 1
    return (scale * 2, 0) if good == every else (scale, good)


PLANTED['check_scale_grad'][1].extend([(scale_hook_on_x, 'hook on x itself'), (scale_shared, 'its own s')])
PLANTED['check_update_scale'][1].extend([(update_floor, 'no floor'), update_clamped])
