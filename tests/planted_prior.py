"""Planted answers for the prior lesson's exercises (23_prior): the reference and plausible mistakes."""
import torch
import torch.nn.functional as F


# ---- exercise 1: shifted inputs and targets of the joint stream
def shift_right(text, image):
    seq = torch.cat([text, image], 1)
    return seq[:, :-1], text[:, 1:], image


def shift_full_inputs(text, image):  # feeds the whole stream, last image token included
    return torch.cat([text, image], 1), text[:, 1:], image


def shift_text_targets_unshifted(text, image):  # text targets are the inputs themselves
    seq = torch.cat([text, image], 1)
    return seq[:, :-1], text[:, :-1], image


def shift_image_targets_off_by_one(text, image):  # drops the first image token from the targets
    seq = torch.cat([text, image], 1)
    return seq[:, :-1], text[:, 1:], torch.cat([image[:, 1:], image[:, -1:]], 1)


# ---- exercise 2: weighted loss with pads ignored
def _ce(logits, target, **kw):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), **kw)


def loss_right(tl, il, text, image, pad, wt, wi):
    return wt * _ce(tl, text[:, 1:], ignore_index=pad) + wi * _ce(il, image)


def loss_pads_counted(tl, il, text, image, pad, wt, wi):  # forgets ignore_index
    return wt * _ce(tl, text[:, 1:]) + wi * _ce(il, image)


def loss_weights_swapped(tl, il, text, image, pad, wt, wi):
    return wi * _ce(tl, text[:, 1:], ignore_index=pad) + wt * _ce(il, image)


def loss_pads_in_denominator(tl, il, text, image, pad, wt, wi):  # zeroes pad terms but divides by all positions
    tgt = text[:, 1:]
    ce = F.cross_entropy(tl.flatten(0, 1), tgt.flatten(), reduction='none') * (tgt.flatten() != pad)
    return wt * ce.mean() + wi * _ce(il, image)


def loss_unshifted_text(tl, il, text, image, pad, wt, wi):  # text targets not shifted
    return wt * _ce(tl, text[:, :-1], ignore_index=pad) + wi * _ce(il, image)


# ---- exercise 3: null-text dropout
def null_right(text, drop, pad):
    return torch.where(drop[:, None], torch.full_like(text, pad), text)


def null_in_place(text, drop, pad):  # zeroes the caller's prompt
    text[drop] = pad
    return text


def null_zero_not_pad(text, drop, pad):  # writes 0 instead of pad_id
    return torch.where(drop[:, None], torch.zeros_like(text), text)


def null_inverted(text, drop, pad):  # drops the rows that should be kept
    return torch.where(~drop[:, None], torch.full_like(text, pad), text)


PLANTED = {
    'check_joint_shift': (shift_right, [shift_full_inputs, shift_text_targets_unshifted, shift_image_targets_off_by_one]),
    'check_prior_loss': (loss_right, [(loss_pads_counted, 'ignore the pad'), (loss_weights_swapped, 'w_text weighs'), (loss_pads_in_denominator, 'non-pad targets only'), (loss_unshifted_text, 'text[:, 1:]')]),
    'check_null_text': (null_right, [null_in_place, null_zero_not_pad, null_inverted]),
}
