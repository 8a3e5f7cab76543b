"""Planted answers for the ruler lesson (07_ruler) and the caption-following exercise (25_evaluation)."""
import torch
import torch.nn.functional as F


# ---- check_slot_strips: strips(images (B, 3, S, S)) -> (B, 3, 3, S, 2h)
def _h(S): return -(-S // 6) + S // 32


def strips_right(images):
    S = images.shape[-1]; h = _h(S)
    p = F.pad(images, (h, h))
    return torch.stack([p[..., round((2 * s + 1) * S / 6):round((2 * s + 1) * S / 6) + 2 * h] for s in range(3)], 1)


def strips_thirds(images):  # cuts at multiples of S/3 with no padding: the strips start at the column's left edge
    S = images.shape[-1]; h = _h(S)
    p = F.pad(images, (0, 2 * h))
    return torch.stack([p[..., (s * S) // 3:(s * S) // 3 + 2 * h] for s in range(3)], 1)


def strips_no_pad(images):  # clamps the window into the image instead of padding with zeros
    S = images.shape[-1]; h = _h(S)
    out = []
    for s in range(3):
        a = min(max(round((2 * s + 1) * S / 6) - h, 0), S - 2 * h)
        out.append(images[..., a:a + 2 * h])
    return torch.stack(out, 1)


def strips_rows(images):  # cuts rows instead of columns (height and width confused)
    return strips_right(images.transpose(-1, -2)).transpose(-1, -2)


def strips_channel_last(images):  # slot and channel axes swapped: (B, 3 channels, 3 slots, ...)
    return strips_right(images).transpose(1, 2)


# ---- check_caption_following: following(said, seen) -> dict
def fol_right(said, seen):
    ok = said == seen
    out = {f: float(ok[..., i].float().mean()) for i, f in enumerate(('value', 'size', 'colour', 'position'))}
    out['binding'] = float(ok.all(-1).float().mean())
    out['exact'] = float(ok.all(-1).all(-1).float().mean())
    return out


def fol_binding_as_mean(said, seen):  # binding = mean attribute accuracy: a bag of attributes, no binding
    out = fol_right(said, seen); out['binding'] = float((said == seen).float().mean()); return out


def fol_exact_any(said, seen):  # exact = images with at least one digit right
    out = fol_right(said, seen); out['exact'] = float((said == seen).all(-1).any(-1).float().mean()); return out


def fol_fields_by_slot(said, seen):  # averages over the wrong axis: per slot instead of per attribute type
    ok = (said == seen).float()
    out = fol_right(said, seen)
    for i, f in enumerate(('value', 'size', 'colour')): out[f] = float(ok[:, i].mean())
    return out


PLANTED = {
    'check_slot_strips': (strips_right, [strips_thirds, strips_no_pad, strips_rows, strips_channel_last]),
    'check_caption_following': (fol_right, [fol_binding_as_mean, fol_exact_any, fol_fields_by_slot]),
}
