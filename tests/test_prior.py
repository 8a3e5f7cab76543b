"""Priors (G1 joint, G2 separate): shapes, no future leak for every mask pattern, cached == full, the (1/8, 7/8) loss
against a hand computation with pads ignored, null-text dropout only in train mode, save/load, a tiny overfit."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dalle_course.core import InputError
from dalle_course.prior import JointPrior, SeparatePrior, drop_text, load_prior, prior_loss, prior_masks, save_prior

TV, K, L, H, W = 11, 16, 5, 3, 4
N = H * W


@pytest.fixture(autouse=True, scope='module')
def _threads():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)


def make(kind, pattern='dalle', seed=0, **kw):
    torch.manual_seed(seed)
    if kind == 'joint': return JointPrior(TV, K, L, H, W, dim=32, depth=4, n_heads=4, mask_pattern=pattern, kernel=3, **kw).eval()
    return SeparatePrior(TV, K, L, H, W, dim=32, depth=2, enc_depth=2, n_heads=4, **kw).eval()


def data(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, TV, (B, L), generator=g); text[0, 3:] = 0
    return text, torch.randint(0, K, (B, N), generator=g)


MODELS = [('joint', 'causal'), ('joint', 'dalle'), ('separate', None)]


@pytest.mark.parametrize('kind,pattern', MODELS)
def test_shapes(kind, pattern):
    m = make(kind, pattern); text, img = data()
    out = m(text, img)
    assert out['image_logits'].shape == (3, N, K)
    if kind == 'joint': assert out['text_logits'].shape == (3, L - 1, TV)
    else: assert 'text_logits' not in out
    assert_close(m(text, img.view(3, H, W))['image_logits'], out['image_logits'])  # (B, h, w) accepted
    with pytest.raises(InputError): m(text, img[:, :-1])
    with pytest.raises(InputError): m(text[:, :-1], img)


@pytest.mark.parametrize('kind,pattern', MODELS)
@torch.no_grad()
def test_image_causality(kind, pattern):
    m = make(kind, pattern); text, img = data()
    base = m(text, img)['image_logits']
    for j in range(N):
        img2 = img.clone(); img2[:, j] = (img2[:, j] + 3) % K
        o = m(text, img2)['image_logits']
        assert_close(o[:, :j + 1], base[:, :j + 1], atol=1e-6, rtol=0, msg=f'image token {j} leaked into logits <= {j}')
        if j == 0: assert not torch.allclose(o[:, 1:], base[:, 1:])  # and the model does use the past
    t2 = text.clone(); t2[:, 1] = (t2[:, 1] + 1) % TV
    assert not torch.allclose(m(t2, img)['image_logits'][:, 0], base[:, 0])  # the first image token sees the text


@pytest.mark.parametrize('pattern', ['causal', 'dalle'])
@torch.no_grad()
def test_text_causality(pattern):
    m = make('joint', pattern); text, img = data()
    base = m(text, img)['text_logits']  # (B, L-1, V): position t predicts text t+1 from text <= t
    for t in range(L):
        t2 = text.clone(); t2[:, t] = (t2[:, t] + 1) % TV
        o = m(t2, img)['text_logits']
        assert_close(o[:, :t], base[:, :t], atol=1e-6, rtol=0, msg=f'text token {t} leaked into text logits < {t}')
        if t < L - 1: assert not torch.allclose(o[:, t], base[:, t])
    img2 = (img + 1) % K
    assert_close(m(text, img2)['text_logits'], base, atol=1e-6, rtol=0)  # text never sees the image


def test_masks():
    ms = prior_masks('dalle', 4, L, H, W, kernel=3)
    assert len(ms) == 4 and all(m.shape == (L + N - 1,) * 2 and not m.triu(1).any() for m in ms)
    assert all(torch.equal(m, torch.ones_like(m).tril()) for m in prior_masks('causal', 2, L, H, W))
    assert not torch.equal(ms[0], ms[2]) and not torch.equal(ms[0], ms[3])  # row, column, conv differ
    with pytest.raises(InputError): prior_masks('sparse', 2, L, H, W)


@pytest.mark.parametrize('kind,pattern', MODELS)
@torch.no_grad()
def test_cached_equals_full(kind, pattern):
    m = make(kind, pattern); text, img = data()
    full = m(text, img)['image_logits']
    state, l0 = m.prefix(text)
    parts = [l0[:, None], m.extend(state, img[:, :2])] + [m.extend(state, img[:, i:i + 1]) for i in range(2, N - 1)]
    assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_joint_loss_by_hand():
    m = make('joint'); text, img = data()
    text[1, 2:] = 0  # more pads
    loss, logs = prior_loss(m, {'text': text, 'image': img}, {})
    o = m(text, img)
    tl, tgt = o['text_logits'], text[:, 1:]
    nll = [-tl[b, t].log_softmax(-1)[tgt[b, t]] for b in range(3) for t in range(L - 1) if tgt[b, t] != 0]
    ce_t = torch.stack(nll).mean()
    ce_i = F.cross_entropy(o['image_logits'].reshape(-1, K), img.reshape(-1))
    assert_close(logs['ce_text'], ce_t); assert_close(logs['ce_image'], ce_i)
    assert_close(loss, ce_t / 8 + 7 * ce_i / 8)
    loss2, _ = prior_loss(m, (text, img), {'w_text': 0.5, 'w_img': 0.25})
    assert_close(loss2, 0.5 * ce_t + 0.25 * ce_i)


def test_pad_targets_ignored():
    m = make('joint'); text, img = data()
    _, a = prior_loss(m, (text, img), {})
    # changing the logits at pad-target positions must not change the text CE: swap the pad id's embedding target
    with torch.no_grad(): m.text_head.bias[0] += 5.0  # makes pad far more likely: would lower the CE if pads counted
    _, b = prior_loss(m, (text, img), {})
    mask = text[:, 1:] != 0
    o = m(text, img)['text_logits']
    assert_close(b['ce_text'], F.cross_entropy(o[mask], text[:, 1:][mask]))
    assert not torch.allclose(b['ce_text'], F.cross_entropy(o.reshape(-1, TV), text[:, 1:].reshape(-1)))
    allpad = torch.zeros_like(text)
    _, c = prior_loss(m, (allpad, img), {})
    assert float(c['ce_text']) == 0.0 and torch.isfinite(c['ce_image'])


def test_separate_loss_is_image_ce():
    m = make('separate'); text, img = data()
    loss, logs = prior_loss(m, (text, img), {})
    assert set(logs) == {'ce_image'}
    assert_close(loss, F.cross_entropy(m(text, img)['image_logits'].reshape(-1, K), img.reshape(-1)))


@pytest.mark.parametrize('kind', ['joint', 'separate'])
def test_null_text_dropout(kind):
    m = make(kind, p_uncond=0.5); text, img = data(B=8)
    assert torch.equal(m.null_text(4), torch.zeros(4, L, dtype=torch.long))
    orig = text.clone()
    ev = prior_loss(m, (text, img), {})[0]  # eval mode: no dropout, deterministic
    assert_close(prior_loss(m, (text, img), {})[0], ev)
    m.train()
    torch.manual_seed(0); l1 = prior_loss(m, (text, img), {})[0]
    torch.manual_seed(0); l2 = prior_loss(m, (text, img), {})[0]
    assert_close(l1, l2)  # seeded
    assert not torch.allclose(l1, ev)  # some rows dropped
    assert_close(prior_loss(m, (text, img), {'p_uncond': 0.0})[0], ev)  # p = 0: no dropout
    torch.manual_seed(0); rows_null = (drop_text(text, 0.5) == 0).all(1)
    torch.manual_seed(0); expect_null = torch.rand(8) < 0.5
    assert torch.equal(rows_null, expect_null)
    assert torch.equal(text, orig)  # the caller's text is untouched
    big = torch.randint(1, TV, (4000, L))
    assert abs((drop_text(big, 0.1) == 0).all(1).float().mean() - 0.1) < 0.02
    assert torch.equal(drop_text(big, 0.0), big)


@pytest.mark.parametrize('kind,pattern', MODELS)
def test_save_load(tmp_path, kind, pattern):
    m = make(kind, pattern); text, img = data()
    save_prior(m, tmp_path / 'p.safetensors')
    m2 = load_prior(tmp_path / 'p.safetensors')
    assert type(m2) is type(m) and m2.config == m.config and not m2.training
    assert_close(m2(text, img)['image_logits'], m(text, img)['image_logits'])


def test_separate_loads_checkpoints_from_before_the_text_encoder_module():
    "G2 state dicts saved before lesson 31 keep text_emb/text_pos/encoder at the top; they load into today's layout."
    m = make('separate'); text, img = data()
    old = {k.removeprefix('text_encoder.'): v for k, v in m.state_dict().items()}
    assert any(k.startswith('encoder.') for k in old) and not any(k.startswith('text_encoder.') for k in old)
    m2 = make('separate', seed=5)
    assert not torch.allclose(m2(text, img)['image_logits'], m(text, img)['image_logits'])
    m2.load_state_dict(old)                                       # strict: every key lands somewhere
    assert_close(m2(text, img)['image_logits'], m(text, img)['image_logits'])
    assert set(m2.state_dict()) == set(m.state_dict())


@pytest.mark.parametrize('kind', ['joint', 'separate'])
def test_overfit(kind):
    m = make(kind, p_uncond=0.0).train(); text, img = data(B=4, seed=5)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, logs = prior_loss(m, (text, img), {})
        opt.zero_grad(); loss.backward(); opt.step()
        first = first if first is not None else float(logs['ce_image'])
    assert float(logs['ce_image']) < 0.5 * first, (first, float(logs['ce_image']))
