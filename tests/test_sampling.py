"""Sampling: cached == uncached for both priors, greedy == brute force, CFG batched and side-effect free,
filters against brute force, sampled frequencies match the model, teacher-forced CE, one-line errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dalle_course.core import InputError, seed_everything
from dalle_course.prior import JointPrior, SeparatePrior
from dalle_course.evaluation import teacher_forced_ce
from dalle_course.runs import SamplingSettings
from dalle_course.sampling import cached_logits, filter_logits, guide, sample

L, H, W, V, K = 6, 4, 5, 15, 24


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _priors():
    seed_everything(0)
    return [JointPrior(V, K, L, H, W, dim=32, depth=4, n_heads=4, mask_pattern='dalle', kernel=3).eval(),
            JointPrior(V, K, L, H, W, dim=32, depth=2, n_heads=4, mask_pattern='causal').eval(),
            SeparatePrior(V, K, L, H, W, dim=32, depth=2, enc_depth=1, n_heads=4).eval()]


def _inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, V, (B, L), generator=g); text[-1, 4:] = 0
    return text, torch.randint(0, K, (B, H * W), generator=g)


@pytest.mark.parametrize('i', range(3))
def test_cached_equals_uncached_fp32(i):
    m = _priors()[i]; text, img = _inputs()
    full = m(text, img)['image_logits']
    assert (cached_logits(m, text, img) - full).abs().max() < 1e-5


@torch.no_grad()
def _brute_greedy(m, text, scale=1.0, given=None):
    B = text.shape[0]; z = torch.zeros(B, m.n_img, dtype=torch.long); k0 = 0
    if given is not None: k0 = given.shape[1]; z[:, :k0] = given
    for i in range(k0, m.n_img):
        l = m(text, z)['image_logits'][:, i]
        if scale != 1.0:
            u = m(m.null_text(B), z)['image_logits'][:, i]; l = u + scale * (l - u)
        z[:, i] = l.argmax(-1)
    return z.view(B, m.h, m.w)


@pytest.mark.parametrize('i', range(3))
@pytest.mark.parametrize('scale', [1.0, 0.0, 4.0])
def test_greedy_equals_brute_force(i, scale):
    m = _priors()[i]; text, img = _inputs()
    assert torch.equal(sample(m, text, top_k=1, guidance=scale), _brute_greedy(m, text, scale))
    given = img[:, :7]  # not a whole number of rows
    out = sample(m, text, top_k=1, guidance=scale, given=given)
    assert torch.equal(out, _brute_greedy(m, text, scale, given))


def test_completion_accepts_rows_and_full_grid():
    m = _priors()[0]; text, img = _inputs()
    rows = img.view(3, H, W)[:, :2]
    assert torch.equal(sample(m, text, top_k=1, given=rows), _brute_greedy(m, text, given=rows.reshape(3, -1)))
    assert torch.equal(sample(m, text, given=img), img.view(3, H, W))  # nothing left to sample


def test_cfg_is_one_batch_and_leaves_inputs_untouched():
    m = _priors()[0]; text, img = _inputs()
    seen, orig = [], m.prefix
    m.prefix = lambda t: (seen.append(t.clone()), orig(t))[1]
    t0, g0 = text.clone(), img[:, :3].clone()
    given = img[:, :3]
    sample(m, text, guidance=3.0, given=given, top_p=0.9, temperature=0.8, generator=torch.Generator().manual_seed(0))
    del m.prefix
    assert len(seen) == 1 and seen[0].shape == (6, L)
    assert torch.equal(seen[0][:3], text) and (seen[0][3:] == m.pad_id).all()
    assert torch.equal(text, t0) and torch.equal(given, g0)
    assert m.training is False


def test_sampler_restores_train_mode_and_is_seeded():
    m = _priors()[2].train(); text, _ = _inputs()
    a = sample(m, text, generator=torch.Generator().manual_seed(5))
    b = sample(m, text, generator=torch.Generator().manual_seed(5))
    assert m.training and torch.equal(a, b)  # eval inside (dropout off), train mode back afterwards


def test_sampled_frequencies_match_the_model():
    "With a 1x1 grid every row draws one token from softmax(filtered logits of the prefix)."
    seed_everything(0)
    m = JointPrior(V, 8, L, 1, 1, dim=16, depth=1, n_heads=2, mask_pattern='causal').eval()
    with torch.no_grad():
        for p in m.image_head.parameters(): p.mul_(20)  # a peaked, non-uniform distribution
    text = torch.randint(1, V, (1, L)).repeat(20000, 1)
    for kw in [dict(), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.7), dict(guidance=2.5)]:
        with torch.no_grad():
            _, l = m.prefix(torch.cat([text[:1], m.null_text(1)]))
        l = guide(l, kw['guidance']) if 'guidance' in kw else l[:1]
        p = filter_logits(l, kw.get('temperature', 1.0), kw.get('top_k'), kw.get('top_p')).softmax(-1)[0]
        z = sample(m, text, generator=torch.Generator().manual_seed(0), **kw).flatten()
        freq = torch.bincount(z, minlength=8).float() / len(z)
        assert (freq[p == 0] == 0).all(), kw
        assert (freq - p).abs().max() < 0.02, (kw, freq, p)


def test_filter_logits_brute_force_and_errors():
    g = torch.Generator().manual_seed(0)
    l = torch.randn(5, 30, generator=g) * 3; l0 = l.clone()
    for T, k, p in [(1.0, None, None), (0.5, 4, None), (1.5, None, 0.8), (1.0, 10, 0.6), (1.0, 30, 1.0)]:
        out = filter_logits(l, T, k, p)
        for b in range(5):
            x = (l[b] / T).tolist(); order = sorted(range(30), key=lambda j: -x[j])[:k or 30]
            e = [math.exp(x[j]) for j in order]; s, mass = sum(e), 0.0
            keep = set()
            for j, v in zip(order, e):
                if p is None or mass < p: keep.add(j)
                mass += v / s
            for j in range(30):
                assert (out[b, j] == x[j]) if j in keep else out[b, j] == float('-inf')
    assert torch.equal(l, l0)
    m = _priors()[0]; text, _ = _inputs()
    for kw, word in [(dict(temperature=0), 'temperature'), (dict(top_k=0), 'top_k'), (dict(top_p=0), 'top_p'),
                     (dict(top_p=1.5), 'top_p'), (dict(guidance=float('inf')), 'guidance')]:
        with pytest.raises(InputError, match=word): SamplingSettings(**kw)     # the settings are checked once,
        with pytest.raises(InputError, match=word): sample(m, text, **kw)      # at the sampler's entry, not per token


def test_given_errors_are_one_line():
    m = _priors()[0]; text, img = _inputs()
    for bad in [img[:2, :3], img.view(3, H, W)[:, :, :2], torch.cat([img, img], 1), img[:, :3] + K]:
        with pytest.raises(InputError) as e: sample(m, text, given=bad)
        assert '\n' not in str(e.value)


def test_teacher_forced_ce_matches_manual_and_dict_items():
    m = _priors()[2]; text, img = _inputs(B=5)
    ce = teacher_forced_ce(m, torch.utils.data.TensorDataset(text, img), batch_size=2)
    with torch.no_grad():
        ref = torch.stack([F.cross_entropy(m(text[i:i + 1], img[i:i + 1])['image_logits'][0], img[i]) for i in range(5)])
    assert_close(ce, ref)
    items = [{'text': text[i], 'image': img[i]} for i in range(5)]
    assert_close(teacher_forced_ce(m, items, batch_size=3, max_items=4), ref[:4])
    with pytest.raises(InputError, match='empty'): teacher_forced_ce(m, [])
