"Lesson 31: Paella renoising and MaskGIT masking priors on the Prior contract, their samplers, inpainting and the sweep."
import math

import pytest
import torch

from dalle_course.core import InputError, seed_everything
from dalle_course.paella import (MaskGITPrior, PaellaPrior, categorical, mask_sample, mask_schedule, mask_tokens,
                                 maskgit_loss, paella_loss, paella_loss_weight, paella_timesteps, renoise)
from dalle_course.core import model_class
from dalle_course.prior import load_prior, save_prior

KW = dict(text_vocab=21, image_vocab=16, text_len=6, h=8, w=8, dim=16, channels=(8, 16, 16), n_heads=2, enc_depth=1)


def _prior(cls, **kw):
    seed_everything(0)
    return cls(**{**KW, **kw}).eval()


def _text(B=3):
    return torch.randint(1, 21, (B, 6), generator=torch.Generator().manual_seed(1))


def test_registered_for_the_cli():
    assert model_class('prior', 'paella') is PaellaPrior and model_class('prior', 'maskgit') is MaskGITPrior


def test_renoise_fraction_and_source():
    x = torch.zeros(4, 4000, dtype=torch.long); noise = torch.ones_like(x)
    out, m = renoise(x, torch.tensor([0.0, 0.25, 0.75, 1.0]), noise, torch.Generator().manual_seed(0))
    assert torch.equal(out, m.long())                                 # noised places hold the noise, kept ones the token
    assert torch.allclose(m.float().mean(1), torch.tensor([0.0, 0.25, 0.75, 1.0]), atol=0.03)


def test_paella_weight_formula():
    m = torch.tensor([[False, True, False]]); t = torch.tensor([0.4])
    assert torch.allclose(paella_loss_weight(m, t, 0.3), torch.tensor([[1 - 0.6 * 0.7, 1.0, 1 - 0.6 * 0.7]]))


def test_paella_loss_is_the_weighted_mean_of_smoothed_ce():
    p = _prior(PaellaPrior, p_uncond=0.0).train()
    text, img = _text(), torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(2))
    seed_everything(5); loss, _ = paella_loss(p, (text, img))
    seed_everything(5)                                                # replay the draws: t, then the noise, then the mask
    t = torch.rand(3); noise = torch.randint_like(img, 16)
    u = torch.rand(img.shape); m = u < t[:, None]
    logits = p(text, torch.where(m, noise, img), t)['image_logits'].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), img, reduction='none', label_smoothing=0.1)
    w = 1 - (~m).float() * (1 - t[:, None]) * 0.7
    assert torch.allclose(loss, ((w * ce).sum(1) / w.sum(1)).mean(), atol=1e-6)


@pytest.mark.parametrize('kind,ref', [('cosine', lambda r: math.cos(math.pi * r / 2)),
                                      ('arccos', lambda r: math.acos(r) / (math.pi / 2)), ('linear', lambda r: 1 - r)])
def test_mask_schedules(kind, ref):
    r = torch.linspace(0, 1, 11)
    assert torch.allclose(mask_schedule(r, kind), torch.tensor([ref(float(v)) for v in r]), atol=1e-6)
    with pytest.raises(InputError, match='unknown mask schedule'): mask_schedule(r, 'cos')


def test_mask_tokens_masks_gamma_not_one_minus_gamma():
    x = torch.arange(100).repeat(2, 1) % 16
    xm, m = mask_tokens(x, torch.tensor([0.9, 0.1]), 16)
    assert m.sum(1).tolist() == [90, 10] and (xm[m] == 16).all() and torch.equal(xm[~m], x[~m])


def test_maskgit_loss_masks_gamma_of_r(monkeypatch):
    "r = 0.5 under the cosine schedule masks ceil(cos(pi/4) * 64) = 46 places, not the 19 of an inverted 1 - gamma."
    p = _prior(MaskGITPrior, p_uncond=0.0)
    rand = torch.rand
    monkeypatch.setattr(torch, 'rand', lambda *shape, **kw: torch.full(shape, 0.5) if len(shape) == 1 else rand(*shape, **kw))
    seen = {}
    p.forward = lambda text, x, t: (seen.update(x=x, t=t), {'image_logits': torch.zeros(2, 64, 16)})[1]
    maskgit_loss(p, (_text(2), torch.randint(0, 16, (2, 64))))
    assert (seen['x'] == 16).sum(1).tolist() == [46, 46] and torch.allclose(seen['t'], torch.full((2,), 46 / 64))


def test_maskgit_loss_looks_at_masked_places_only():
    "Both directions: logits at unmasked places do not move the loss; logits at masked places do."
    p = _prior(MaskGITPrior, p_uncond=0.0)
    text, img = _text(2), torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(3))
    seen = {}
    def fake(lg):
        def fwd(text, x, t): seen['x'] = x; return {'image_logits': lg}
        return fwd
    base = torch.randn(2, 64, 16)
    p.forward = fake(base); seed_everything(0); l0 = maskgit_loss(p, (text, img))[0]
    masked = seen['x'] == p.mask_id
    assert 0 < masked.sum() < masked.numel()
    for where, moves in ((~masked, False), (masked, True)):
        lg = base.clone(); lg[where] += 3 * torch.randn_like(lg[where])
        p.forward = fake(lg); seed_everything(0); l1 = maskgit_loss(p, (text, img))[0]
        assert (abs(float(l1 - l0)) > 1e-3) == moves


def test_categorical_matches_multinomial_and_skips_zero_probability():
    p = torch.tensor([[0.5, 0.0, 0.3, 0.2]])
    d = categorical(p.expand(200000, 4), torch.Generator().manual_seed(0))
    f = torch.bincount(d, minlength=4).float() / len(d)
    assert f[1] == 0 and torch.allclose(f, p[0], atol=0.006)


def test_categorical_never_reaches_a_zero_probability_tail_when_u_is_one(monkeypatch):
    "A uniform of exactly 1 (low-precision generators can give one) must still land on a token with probability > 0."
    p = torch.tensor([[1.5, 1.5, 0.0, 0.0]])                     # unnormalised: total 3, trailing zeros
    monkeypatch.setattr(torch, 'rand', lambda shape, **kw: torch.ones(shape))
    assert categorical(p).tolist() == [1]                        # not 3 (p = 0) nor 4 (no such token)


def test_strength_needs_a_whole_given_grid():
    for cls in (PaellaPrior, MaskGITPrior):
        p, text = _prior(cls), _text()
        z = torch.randint(0, 16, (3, 8, 8))
        with pytest.raises(InputError, match='strength 0.5 < 1 varies a given image'): p.generate(text, strength=0.5)
        with pytest.raises(InputError, match='whole grid'): p.generate(text, given=z[:, :3], strength=0.5)
        with pytest.raises(InputError, match=r'strength must be in \(0, 1\]'): p.generate(text, given=z, strength=0)


def test_unknown_constructor_argument_refused():
    with pytest.raises(TypeError, match='schedule'): _prior(PaellaPrior, schedule='cosine')  # Paella has no schedule
    assert _prior(MaskGITPrior, schedule='linear').config['schedule'] == 'linear'


def test_paella_algorithm_1_levels_and_renoising_to_the_initial_noise(monkeypatch):
    """Stub the model's draw with "token 0 everywhere": step i sees level t_i, and its input is the previous sample
    with a fraction t_i of the places put back to the *initial* noise u_init (not fresh noise)."""
    import dalle_course.paella as pa
    seen = []
    def draw(prior, x, level, *a, **k):
        seen.append((x.clone(), level.clone())); return torch.zeros_like(x), torch.ones(x.shape)
    monkeypatch.setattr(pa, '_draw', draw)
    p, B = _prior(PaellaPrior), 32
    z = pa.renoise_sample(p, _text(B), steps=5, generator=torch.Generator().manual_seed(0))
    ts = paella_timesteps(5)
    assert [lev.tolist() for _, lev in seen] == [[float(t)] * B for t in ts]
    u_init = seen[0][0]
    assert (u_init != 0).float().mean() > 0.9                          # the random start
    for (x, _), t in zip(seen[1:], ts[1:]):
        assert ((x == 0) | (x == u_init)).all()                       # each place: the sample or its own initial noise
        back = ((x == u_init) & (u_init != 0)).float().sum() / (u_init != 0).float().sum()
        assert abs(float(back) - float(t)) < 0.05, (float(back), float(t))
    assert (z == 0).all()                                              # the last step is not renoised


def test_maskgit_remasks_the_least_confident(monkeypatch):
    "Stub the draw with fixed confidences: without choice noise the masked places after step i are the lowest ones."
    import dalle_course.paella as pa
    N = 64
    conf = torch.randperm(N, generator=torch.Generator().manual_seed(3)).float().add(1) / (N + 1)  # (N,) distinct
    seen = []
    def draw(prior, x, level, *a, **k):
        seen.append(x.clone()); return torch.full_like(x, 5), conf.expand(x.shape).clone()
    monkeypatch.setattr(pa, '_draw', draw)
    p = _prior(MaskGITPrior)
    z = pa.mask_sample(p, _text(1), steps=4, choice_temperature=0.0)
    order = conf.argsort()                                              # least confident first
    for i, x in enumerate(seen[1:], 1):
        n = math.floor(math.cos(math.pi / 2 * i / 4) * N)
        assert set((x[0] == 16).nonzero()[:, 0].tolist()) == set(order[:n].tolist()), i
    assert (z == 5).all()


def test_recipes_of_the_parallel_priors():
    from dalle_course.prior_training import resolve_prior_recipe
    r = resolve_prior_recipe('maskgit', 'tiny', 100, 21, 6, 16, 8, 8, overrides={'model': {'schedule': 'arccos'}})
    assert r.model['schedule'] == 'arccos' and MaskGITPrior(**r.model).schedule == 'arccos'
    assert r.extra['sampling']['steps'] == 8                          # MaskGIT's own default reaches the recipe
    paella = resolve_prior_recipe('paella', 'tiny', 100, 21, 6, 16, 8, 8).model
    joint = resolve_prior_recipe('joint', 'tiny', 100, 21, 6, 16, 8, 8).model
    assert paella['channels'] == (48, 96, 96) or list(paella['channels']) == [48, 96, 96]
    assert 'channels' not in joint and 'schedule' not in paella        # each class gets only the keys it has
    PaellaPrior(**paella)


@pytest.mark.parametrize('cls', [PaellaPrior, MaskGITPrior])
def test_sampler_contract(cls):
    p = _prior(cls)
    text = _text()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    trace = []
    z = p.generate(text, steps=5, guidance=2.0, temperature=0.8, top_k=8, trace=trace, generator=g())
    assert z.shape == (3, 8, 8) and z.dtype == torch.long and int(z.min()) >= 0 and int(z.max()) < 16  # never the mask id
    assert len(trace) == 5 and torch.equal(trace[-1], z)
    assert torch.equal(p.generate(text, steps=5, guidance=2.0, temperature=0.8, top_k=8, generator=g()), z)
    region = torch.zeros(8, 8, dtype=torch.bool); region[2:5, 3:7] = True
    inp = p.generate(text, steps=4, given=z, region=region, generator=g())
    assert torch.equal(inp[:, ~region], z[:, ~region])                 # bit-identical outside the region
    rows = p.generate(text, steps=3, given=z[:, :3], generator=g())
    assert torch.equal(rows[:, :3], z[:, :3])                          # completion: given rows stay
    var = p.generate(text, steps=3, given=z, strength=0.4, generator=g())
    assert 0 < (var != z).float().mean() < 0.9
    with pytest.raises(InputError, match='no option'): p.generate(text, beam=3)
    with pytest.raises(InputError, match='steps'): p.generate(text, steps=0)
    with pytest.raises(InputError, match='region'): p.generate(text, region=region)
    with pytest.raises(InputError, match='codebook'): p.generate(text, given=z + 16)


@pytest.mark.parametrize('cls', [PaellaPrior, MaskGITPrior])
def test_guidance_pushes_towards_the_caption_not_the_null_text(cls):
    """Stub the network: a caption's rows favour token 1, null-text rows token 2. Guidance 5 must draw 1 and guidance 0
    (the null text alone) 2: a sampler whose rows are [null; caption] while `guide` reads [caption; null] fails."""
    p = _prior(cls)
    p.encode = lambda text: (text == p.pad_id).all(1).float()[:, None, None].expand(-1, 6, 16)  # 1 = a null row
    def predict(x, level, ctx):
        null = ctx[:, 0, 0][:, None]                                        # (R, 1)
        lg = torch.zeros(x.shape[0], 64, 16); lg[..., 1] = 5 * (1 - null); lg[..., 2] = 5 * null
        return lg
    p.predict = predict
    for w, want in ((5.0, 1), (0.0, 2)):
        z = p.generate(_text(), steps=3, guidance=w, top_k=1)
        assert (z == want).all(), (w, z.unique())


@pytest.mark.parametrize('cls', [PaellaPrior, MaskGITPrior])
def test_inpainting_feeds_the_given_tokens_outside_the_region_at_every_step(cls, monkeypatch):
    import dalle_course.paella as pa
    seen = []
    def draw(prior, x, level, *a, generator=None, **k):
        seen.append(x.clone()); return torch.randint(0, 16, x.shape), torch.rand(x.shape)
    monkeypatch.setattr(pa, '_draw', lambda prior, x, level, ctx, cfg, t, tk, tp, gen: draw(prior, x, level))
    p, given = _prior(cls), torch.randint(0, 16, (3, 8, 8), generator=torch.Generator().manual_seed(4))
    region = torch.zeros(8, 8, dtype=torch.bool); region[1:5, 2:6] = True              # 16 places
    z = p.generate(_text(), steps=4, given=given, region=region)
    keep = ~region.reshape(-1)
    assert len(seen) == 4 and all(torch.equal(x[:, keep], given.reshape(3, -1)[:, keep]) for x in seen)
    assert torch.equal(z[:, ~region], given[:, ~region]) and (z[:, region] != given[:, region]).any()
    if cls is MaskGITPrior:                                                            # the schedule counts the region
        left = [int((x == 16).sum()) // 3 for x in seen]
        assert left == [16] + [math.floor(math.cos(math.pi / 2 * i / 4) * 16) for i in range(1, 4)]


def test_mask_token_never_drawn_even_when_the_head_wants_it():
    "The head has K outputs; the mask (id K) is an input only. Force every logit flat: nothing outside 0..K-1 appears."
    p = _prior(MaskGITPrior)
    assert p.unet.head.out_channels == 16 * 2 * 2 and p.unet.embed.num_embeddings == 17
    with torch.no_grad(): p.unet.head.weight.zero_(); p.unet.head.bias.zero_()
    z = p.generate(_text(), steps=3)
    assert int(z.max()) < 16


def test_maskgit_follows_the_schedule_and_keeps_committed_tokens():
    p = _prior(MaskGITPrior, schedule='cosine')
    grids, orig = [], p.predict
    p.predict = lambda x, level, ctx: (grids.append(x.clone()), orig(x, level, ctx))[1]
    z = mask_sample(p, _text(1), steps=6, generator=torch.Generator().manual_seed(0))
    left = [int((q == 16).sum()) for q in grids]
    assert left == [64] + [math.floor(math.cos(math.pi / 2 * i / 6) * 64) for i in range(1, 6)]
    for a, b in zip(grids, grids[1:] + [z.reshape(1, -1)]):
        assert torch.equal(b[a != 16], a[a != 16])


def test_paella_timesteps():
    assert torch.allclose(paella_timesteps(5), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert paella_timesteps(1).tolist() == [1.0] and paella_timesteps(3, 0.5).tolist() == [0.5, 0.25, 0.0]


@pytest.mark.parametrize('cls', [PaellaPrior, MaskGITPrior])
def test_save_load_round_trip_and_denoising_ce(cls, tmp_path):
    p = _prior(cls, schedule='arccos') if cls is MaskGITPrior else _prior(cls)
    save_prior(p, tmp_path / 'p.safetensors')
    q = load_prior(tmp_path / 'p.safetensors')
    assert type(q) is cls and q.config == p.config
    text, img = _text(), torch.randint(0, 16, (3, 64))
    assert torch.allclose(q.per_image_ce(text, img), p.per_image_ce(text, img))
    assert p.ce_kind == 'denoising_ce' and p.per_image_ce(text, img).shape == (3,)


def test_cli_steps_refused_for_an_autoregressive_prior(tmp_path, capsys):
    from dalle_course.cli import main
    from dalle_course.pipeline import SHIPPED_DEMO_RUN
    out = tmp_path / 'g.png'
    rc = main(['sample', '--prior', str(SHIPPED_DEMO_RUN), '--prompt', '7 30 r up 2 20 w down 9 40 g middle', '--n', '1',
               '--steps', '4', '--out', str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and "no option 'steps'" in err and len(err.strip().splitlines()) == 1


def test_cli_samples_a_shipped_paella_prior_with_steps(tmp_path, capsys):
    from dalle_course.cli import main
    from dalle_course.pipeline import SHIPPED_DEMO_RUN
    out = tmp_path / 'g.png'
    rc = main(['sample', '--prior', str(SHIPPED_DEMO_RUN.parent / 'paella_64'), '--prompt', '7 30 r up 2 20 w down 9 40 g middle',
               '--n', '2', '--steps', '3', '--out', str(out)])
    assert rc == 0 and out.is_file() and 'steps 3' in capsys.readouterr().out


def test_bench_samplers_tiny(tmp_path):
    from dalle_course.cli import main
    from dalle_course.pipeline import SHIPPED_DEMO_RUN
    import json
    rc = main(['bench', 'samplers', '--prior', str(SHIPPED_DEMO_RUN.parent / 'maskgit_64'), '--steps', '2,3', '--n', '4',
               '--out', str(tmp_path / 'sw')])
    res = json.loads((tmp_path / 'sw' / 'sweep.json').read_text())
    assert rc == 0 and [r['steps'] for r in res['rows']] == [2, 3] and (tmp_path / 'sw' / 'sweep.png').is_file()
    assert all(0 <= r['attributes'] <= 1 and r['images_per_s'] > 0 for r in res['rows'])


@pytest.mark.parametrize('extra,match', [(['--prior', '{mg}'], 'given twice'),
                                         (['--clip', '{tmp}/no_clip'], 'no_clip has no'),
                                         (['--classifier', '{tmp}/no_ruler.safetensors'], 'no attribute classifier at'),
                                         (['--temperature', '0'], 'temperature must be a finite number > 0')])
def test_bench_samplers_refuses_bad_input_before_writing(tmp_path, capsys, extra, match):
    from dalle_course.cli import main
    from dalle_course.pipeline import SHIPPED_DEMO_RUN
    mg = str(SHIPPED_DEMO_RUN.parent / 'maskgit_64')
    extra = [e.format(mg=mg, tmp=tmp_path) for e in extra]
    rc = main(['bench', 'samplers', '--prior', mg, '--steps', '2', '--n', '2', '--out', str(tmp_path / 'sw'), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / 'sw').exists()


def test_bench_samplers_checks_out_before_sampling(tmp_path, capsys, monkeypatch):
    import dalle_course.study as st
    from dalle_course.cli import main
    from dalle_course.pipeline import SHIPPED_DEMO_RUN
    (tmp_path / 'sw').mkdir(); (tmp_path / 'sw' / 'mine.txt').write_text('keep')
    monkeypatch.setattr(st, 'step_sweep', lambda *a, **k: pytest.fail('sampled before --out was checked'))
    rc = main(['bench', 'samplers', '--prior', str(SHIPPED_DEMO_RUN.parent / 'maskgit_64'), '--out', str(tmp_path / 'sw')])
    assert rc == 2 and 'did not write' in capsys.readouterr().err and (tmp_path / 'sw' / 'mine.txt').read_text() == 'keep'
