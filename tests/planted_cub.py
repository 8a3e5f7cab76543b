"Planted answers for the lesson-33 checks: the right ones, and the mistakes a learner makes (with the hint each must get)."
import re

import numpy as np
from PIL import Image

from dalle_course.cub import LEXICON, SYNONYMS, perturb_caption, role_words


def pad_right(img):
    w, h = img.size; s = max(w, h); out = Image.new(img.mode, (s, s)); out.paste(img, ((s - w) // 2, (s - h) // 2)); return out
def pad_corner(img):                                                    # pads one side only
    w, h = img.size; s = max(w, h); out = Image.new(img.mode, (s, s)); out.paste(img, (0, 0)); return out
def pad_odd_left(img):                                                  # the odd pixel on the left / top
    w, h = img.size; s = max(w, h); out = Image.new(img.mode, (s, s)); out.paste(img, ((s - w + 1) // 2, (s - h + 1) // 2)); return out
def pad_resize(img):                                                    # stretches instead of padding
    s = max(img.size); return img.resize((s, s))
def pad_white(img):                                                     # pads with white
    w, h = img.size; s = max(w, h); out = Image.new(img.mode, (s, s), (255, 255, 255)); out.paste(img, ((s - w) // 2, (s - h) // 2)); return out


def _perturb(caption, m, rng, replace=False, any_role=False, synonyms=False, fix_article=True):
    slots = role_words(caption)
    out, last = [], 0
    pool = [w for ws in LEXICON.values() for w in ws]
    for k in sorted(set(rng.choice(len(slots), size=m, replace=replace).tolist())):
        a, b, role = slots[k]
        old = caption[a:b].lower()
        cand = pool if any_role else LEXICON[role]
        others = [w for w in cand if w != old and (synonyms or not any(old in s and w in s for s in SYNONYMS))]
        new = others[int(rng.integers(len(others)))]
        head = caption[last:a]
        art = re.search(r'\b(a|an|A|An)(\s+)$', head)
        if art and fix_article:
            f = 'an' if new[0] in 'aeiou' else 'a'
            head = head[:art.start()] + (f.capitalize() if art.group(1)[0] == 'A' else f) + art.group(2)
        out += [head, new]; last = b
    return ''.join(out) + caption[last:]

def perturb_with_replacement(c, m, rng): return _perturb(c, m, rng, replace=True)     # may change fewer than m words
def perturb_any_role(c, m, rng): return _perturb(c, m, rng, any_role=True)             # a colour may become a body part
def perturb_synonyms(c, m, rng): return _perturb(c, m, rng, synonyms=True)             # grey -> gray counts as a change
def perturb_no_article(c, m, rng): return _perturb(c, m, rng, fix_article=False)       # "a orange bill"
def perturb_m_minus_one(c, m, rng): return perturb_caption(c, max(0, m - 1), rng)     # off by one


PLANTED = {
    'check_square_pad': (pad_right, [(pad_corner, 'pad both sides'), (pad_odd_left, 'odd pixel'), pad_resize, pad_white]),
    'check_perturb_caption': (perturb_caption, [(perturb_with_replacement, 'replace=False'), perturb_any_role,
                                                (perturb_synonyms, 'SYNONYMS'), (perturb_no_article, "'a'/'an'"),
                                                perturb_m_minus_one]),
}
