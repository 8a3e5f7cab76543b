"dVAE (12_dvae): the shared encoder/decoder, the logit-Laplace likelihood, the KL terms, the DVAE tokenizer and its loss."
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from dalle_course.core import InputError
from dalle_course.dvae import Decoder, DalleBlock, Encoder, Residual


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "These networks are tiny: one thread is as fast, and many times faster when other processes load the CPU."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(m): return sum(p.numel() for p in m.parameters())


class ImageDS(torch.utils.data.Dataset):
    "Items {'image': (3, H, W)} from an image tensor (B, 3, H, W)."
    def __init__(self, images): self.images = images
    def __len__(self): return len(self.images)
    def __getitem__(self, i): return {'image': self.images[i]}
def conv(i, o, k): return i * o * k * k + o  # a k×k conv from i to o channels, with bias


# ---------------------------------------------------------------- networks
@pytest.mark.parametrize('style', ['dalle', 'thesis'])
@pytest.mark.parametrize('hidden,n_down,nrd,nrb,size', [(32, 2, 1, 1, 32), (64, 3, 2, 1, 64), (16, 1, 0, 2, 8),
                                                        (16, 0, 1, 1, 8), (32, 2, 1, 0, 16)])
def test_encoder_decoder_shapes(style, hidden, n_down, nrd, nrb, size):
    enc = Encoder(style, in_ch=3, hidden=hidden, out_ch=10, n_down=n_down, n_res_down=nrd, n_res_bottleneck=nrb)
    dec = Decoder(style, in_ch=10, hidden=hidden, out_ch=6, n_down=n_down, n_res_down=nrd, n_res_bottleneck=nrb)
    z = enc(torch.rand(2, 3, size, size + 2 ** n_down))  # non-square input: axes stay in place
    assert z.shape == (2, 10, size >> n_down, (size >> n_down) + 1)
    assert dec(z).shape == (2, 6, size, size + 2 ** n_down)


def test_encoder_widths_follow_the_channel_rule():
    "H/2**n_down at full resolution, doubling to H at the bottleneck (both styles)."
    enc = Encoder('thesis', 3, 64, 7, 2, 1, 1)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 16 and max(c.out_channels for c in convs) == 64
    bns = [m.num_features for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns[:4] == [16, 32, 32, 64]  # ChangeChannels, Down 16→32 (BN 32), Residual(32), Down 32→64
    d = Encoder('dalle', 3, 64, 7, 2, 1, 1)
    assert d.input.out_channels == 16 and d.output.conv.in_channels == 64 and d.input.kernel_size == (7, 7)
    assert [type(m) for m in d.modules()].count(nn.MaxPool2d) == 2
    dd = Decoder('dalle', 7, 64, 3, 2, 1, 1)
    assert [type(m) for m in dd.modules()].count(nn.Upsample) == 2 and dd.input.kernel_size == (1, 1)


def test_thesis_decoder_follows_table3_order():
    "Table 3 lists the decoder top to bottom like the encoder: ChangeChannels, (Up, NRD×Res)×n_down, NRB×Res, ChangeChannels."
    d = Decoder('thesis', 7, 64, 3, 2, n_res_down=1, n_res_bottleneck=2)
    assert list(d._modules) == ['input', 'up_1', 'up_2', 'bottleneck', 'output']
    assert d.input[0].in_channels == 7 and d.input[0].out_channels == 64
    assert [m[0][0].out_channels for m in (d.up_1, d.up_2)] == [32, 16]       # widths halve on the way up
    assert len(d.bottleneck) == 2 and d.bottleneck[0].block[1].in_channels == 16  # NRB blocks at full resolution
    e = Encoder('thesis', 3, 64, 7, 2, n_res_down=3, n_res_bottleneck=2)
    assert list(e._modules) == ['input', 'down_1', 'down_2', 'bottleneck', 'output']
    assert len(e.down_1) == 1 + 3 and len(e.bottleneck) == 2 and e.bottleneck[0].block[1].in_channels == 64


def test_param_count_tiny_config_by_hand():
    # hidden=8, n_down=1, one block of each kind: widths w0=4, w1=8; BatchNorm has 2C parameters
    cc = lambda i, o: conv(i, o, 3) + 2 * o + conv(o, o, 1)
    res = lambda c: conv(c, c, 3) + 2 * c + conv(c, c, 1)
    assert n_params(Encoder('thesis', 3, 8, 5, 1, 1, 1)) == cc(3, 4) + conv(4, 8, 4) + 16 + conv(8, 8, 3) + 2 * res(8) + cc(8, 5) == 3009
    assert n_params(Decoder('thesis', 5, 8, 6, 1, 1, 1)) == cc(5, 8) + conv(8, 4, 4) + 8 + conv(4, 4, 3) + 2 * res(4) + cc(4, 6)
    enc = (conv(3, 4, 7) + conv(4, 1, 3) + 2 * conv(1, 1, 3) + conv(1, 4, 1)
           + conv(4, 8, 1) + conv(4, 2, 3) + 2 * conv(2, 2, 3) + conv(2, 8, 1) + conv(8, 5, 1))
    assert n_params(Encoder('dalle', 3, 8, 5, 1, 1, 1)) == enc == 916
    dec = (conv(5, 2, 1) + conv(2, 8, 1) + conv(2, 2, 1) + 2 * conv(2, 2, 3) + conv(2, 8, 3)
           + conv(8, 4, 1) + conv(8, 1, 1) + 2 * conv(1, 1, 3) + conv(1, 4, 3) + conv(4, 6, 1))
    assert n_params(Decoder('dalle', 5, 8, 6, 1, 1, 1)) == dec
    assert n_params(Decoder('dalle', 5, 8, 6, 1, 1, 1, n_init=3)) == dec - conv(5, 2, 1) - conv(2, 8, 1) - conv(2, 2, 1) \
        + conv(5, 3, 1) + conv(3, 8, 1) + conv(3, 2, 1)


def test_dalle_paper_size():
    "DALL·E's released dVAE: encoder 53.8M, decoder 43.8M parameters (n_hid 256 → hidden 2048, 3 poolings, 2 blocks per group)."
    with torch.device('meta'):
        e = Encoder('dalle', 3, 2048, 8192, 3, 2, 2); d = Decoder('dalle', 8192, 2048, 6, 3, 2, 2, n_init=128)
    assert n_params(e) == 53_786_240 and n_params(d) == 43_829_766


def test_dalle_block_is_id_plus_scaled_residual():
    torch.manual_seed(0)
    blk = DalleBlock(8, 16, n_layers=4); x = torch.randn(2, 8, 6, 6)
    h = x
    for m in [m for m in blk.res_path if isinstance(m, nn.Conv2d)]: h = m(F.relu(h))
    assert_close(blk(x), blk.id_path(x) + h / 16)
    e = Encoder('dalle', 3, 16, 5, 1, 2, 1)  # 3 blocks in all → post-gain 1/9
    assert {m.post_gain for m in e.modules() if isinstance(m, DalleBlock)} == {1 / 9}


def test_thesis_residual_keeps_its_input():
    r = Residual(4).eval(); x = torch.randn(1, 4, 5, 5); x0 = x.clone()
    out = r(x)
    assert torch.equal(x, x0)
    assert_close(out, x0 + r.block(x0))


@pytest.mark.parametrize('kw', [dict(style='vq'), dict(hidden=30, n_down=2), dict(hidden=8, n_down=2, style='dalle'),
                                dict(n_res_down=-1), dict(colour=True)])
def test_bad_network_arguments(kw):
    args = dict(style='thesis', in_ch=3, hidden=32, out_ch=5, n_down=2, n_res_down=1, n_res_bottleneck=1) | kw
    with pytest.raises(InputError):
        Encoder(**args)


# ---------------------------------------------------------------- likelihood and KL terms
from dalle_course.dvae import (DALLE_DVAE, DVAE, THESIS_TABLE5, THESIS_TABLE6_DVAE, THESIS_TABLE7_DVAE, batch_usage_kl,
                               code_distribution, dvae_from_table, dvae_hparams, dvae_loss, kl_to_uniform,
                               logit_laplace_nll, map_pixels, tokenizer_eval_fn, unmap_pixels)
from dalle_course.image_tokenizer import TOKENIZER_FILE, code_counts, load_tokenizer
from dalle_course.learner import Learner, TrainConfig
from dalle_course.schedules import Schedule


@pytest.mark.parametrize('mu,b', [(0.0, 1.0), (-2.0, 0.3), (1.5, 0.1), (0.7, 0.5), (3.0, 0.8)])
def test_logit_laplace_density_integrates_to_one(mu, b):
    xs = torch.linspace(0, 1, 400_001, dtype=torch.float64)[1:-1]
    dens = torch.exp(-logit_laplace_nll(xs, torch.tensor(mu), torch.tensor(math.log(b))).double())
    assert abs(torch.trapezoid(dens, xs).item() - 1) < 2e-3
    # and the mass sits where the Laplace puts it: P(x < σ(μ)) = 1/2 (σ(μ) is the median)
    below = xs < torch.sigmoid(torch.tensor(mu, dtype=torch.float64))
    assert abs(torch.trapezoid(dens[below], xs[below]).item() - 0.5) < 5e-3


def test_logit_laplace_nll_formula():
    g = torch.Generator().manual_seed(0)
    x = 0.05 + 0.9 * torch.rand(3, 3, 5, 5, generator=g)
    mu, lb = 2 * torch.randn(3, 3, 5, 5, generator=g), torch.randn(3, 3, 5, 5, generator=g)
    xd, md, bd = x.double(), mu.double(), lb.double().exp()
    ref = torch.log(2 * bd) + torch.log(xd) + torch.log(1 - xd) + (torch.log(xd / (1 - xd)) - md).abs() / bd
    out = logit_laplace_nll(x, mu, lb)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    lap = torch.distributions.Laplace(md, bd)  # independent: Laplace density of logit x, minus the log-Jacobian
    assert_close(out.double(), -(lap.log_prob(torch.logit(xd)) - torch.log(xd * (1 - xd))), rtol=1e-5, atol=1e-5)
    assert logit_laplace_nll(x.bfloat16(), mu.bfloat16(), lb.bfloat16()).dtype == torch.float32


def test_pixel_map():
    x = torch.rand(2, 3, 4, 4)
    assert_close(map_pixels(x), 0.8 * x + 0.1)
    assert_close(unmap_pixels(map_pixels(x)), x)
    assert_close(map_pixels(x, eps=0.05), 0.9 * x + 0.05)
    assert unmap_pixels(torch.tensor([0.0, 0.05, 0.95, 1.0])).tolist() == [0.0, 0.0, 1.0, 1.0]  # clipped to [0, 1]


def _brute_kl(l):
    B, K, h, w = l.shape; out = torch.zeros(B, h, w, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                p = torch.softmax(l[b, :, i, j].double(), 0)
                out[b, i, j] = sum(pk * math.log(pk * K) for pk in p.tolist() if pk > 0)
    return out


def test_kl_to_uniform_brute_force():
    l = torch.randn(2, 7, 3, 5, generator=torch.Generator().manual_seed(3)) * 3
    assert_close(kl_to_uniform(l).double(), _brute_kl(l), rtol=1e-5, atol=1e-6)
    assert_close(kl_to_uniform(l + 500.0).double(), _brute_kl(l), rtol=1e-4, atol=1e-4)  # stable for large logits
    assert (kl_to_uniform(l) >= -1e-6).all()
    assert kl_to_uniform(torch.zeros(1, 9, 2, 2)).abs().max() < 1e-6          # uniform encoder: KL 0
    sure = 50 * F.one_hot(torch.tensor([[[3]]]), 9).permute(0, 3, 1, 2).float()
    assert_close(kl_to_uniform(sure), torch.full((1, 1, 1), math.log(9)))   # certain encoder: ln K


def test_kl_in_float32_for_bf16_logits():
    "Defect: a softmax over thousands of codes in bf16. The KL of bf16 logits is computed in float32."
    l = (torch.randn(2, 4096, 4, 4, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    ls = torch.log_softmax(l.double(), 1); exact = (ls.exp() * ls).sum(1) + math.log(4096)  # float64 reference
    out = kl_to_uniform(l)
    assert out.dtype == torch.float32 and (out.double() - exact).abs().max() < 1e-4
    assert batch_usage_kl(l).dtype == torch.float32


def test_batch_usage_kl_brute_force():
    l = torch.randn(4, 6, 2, 3, generator=torch.Generator().manual_seed(4)) * 2
    q = torch.zeros(6, dtype=torch.float64)
    for b in range(4):
        for i in range(2):
            for j in range(3): q += torch.softmax(l[b, :, i, j].double(), 0)
    q /= 24
    assert_close(code_distribution(l).double(), q, rtol=1e-5, atol=1e-7)
    assert_close(batch_usage_kl(l).double(), (q * torch.log(q * 6)).sum(), rtol=1e-5, atol=1e-6)
    assert batch_usage_kl(l).ndim == 0
    # confident but evenly spread codes: batch KL 0 although every position's KL is ln K
    spread = 30 * F.one_hot(torch.arange(12) % 6, 6).float().view(12, 6, 1, 1)
    assert batch_usage_kl(spread).abs() < 1e-5 and kl_to_uniform(spread).min() > math.log(6) - 1e-4
    collapsed = 30 * F.one_hot(torch.zeros(12, dtype=torch.long), 6).float().view(12, 6, 1, 1)
    assert abs(batch_usage_kl(collapsed).item() - math.log(6)) < 1e-4


# ---------------------------------------------------------------- the tokenizer
def tiny(style, **kw):
    torch.manual_seed(0)
    return DVAE(style, **{**dict(image_size=32, vocab_size=16, hidden=32, n_down=2, n_res_down=1, n_res_bottleneck=1), **kw})


@pytest.mark.parametrize('style', ['dalle', 'thesis'])
def test_dvae_shapes_ranges_dtypes(style):
    m = tiny(style).eval(); x = torch.rand(3, 3, 32, 32)
    assert m.kind == f'dvae-{style}' and m.grid == (8, 8) and m.vocab_size == 16 and m.downsample == 4
    o = m(x, tau=0.5)
    assert o['logits'].shape == o['z'].shape == (3, 16, 8, 8) and o['logits'].dtype == torch.float32
    assert o['out'].shape == (3, 6 if style == 'dalle' else 3, 32, 32)
    assert_close(o['z'].sum(1), torch.ones(3, 8, 8))
    t = m.encode(x)
    assert t.dtype == torch.int64 and t.shape == (3, 8, 8) and torch.equal(t, m.logits(x).argmax(1))
    assert t.min() >= 0 and t.max() < 16
    r = m.decode(t)
    assert r.shape == x.shape and r.dtype == torch.float32 and r.min() >= 0 and r.max() <= 1
    assert not r.requires_grad and not t.requires_grad
    assert torch.equal(m.decode(t.int()), r)                                  # int32 tokens work too
    with torch.no_grad(): out = m.decoder(F.one_hot(t, 16).permute(0, 3, 1, 2).float())
    if style == 'dalle':  # the image is φ⁻¹(σ(μ)), not μ, not σ(μ)
        assert_close(r, ((torch.sigmoid(out[:, :3]) - 0.1) / 0.8).clamp(0, 1))
    else:
        assert_close(r, torch.sigmoid(out))


def test_dalle_encoder_sees_mapped_pixels():
    m = tiny('dalle').eval(); x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(): assert_close(m.logits(x), m.encoder(0.8 * x + 0.1))
    t = tiny('thesis').eval()
    with torch.no_grad(): assert_close(t.logits(x), t.encoder(x))


@pytest.mark.parametrize('style', ['dalle', 'thesis'])
def test_forward_samples_with_the_course_gumbel_softmax(style):
    from dalle_course.gumbel import gumbel_softmax
    m = tiny(style).eval(); x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3); o = m(x, tau=0.3)
    torch.manual_seed(3); z = gumbel_softmax(m.logits(x), tau=0.3, dim=1)
    assert_close(o['z'], z)
    assert_close(o['out'], m.decoder(z))


@pytest.mark.parametrize('style', ['dalle', 'thesis'])
def test_straight_through_gradients(style):
    m = tiny(style, straight_through=True).train(); x = torch.rand(2, 3, 32, 32)
    o = m(x, tau=1.0)
    assert ((o['z'] == 0) | (o['z'] == 1)).all() and (o['z'].sum(1) == 1).all()   # exact one-hots forward
    o['out'].square().mean().backward()
    enc_grads = [p.grad for p in m.encoder.parameters()]
    assert all(gr is not None for gr in enc_grads) and sum(gr.abs().sum() for gr in enc_grads) > 0
    m.zero_grad(); o = m(x, tau=1.0, hard=False)                                # soft samples
    assert ((o['z'] > 0) & (o['z'] < 1)).any()


@pytest.mark.parametrize('style', ['dalle', 'thesis'])
def test_dvae_loss_formula(style):
    m = tiny(style); x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7); loss, logs = dvae_loss(m, {'image': x}, {'tau': 0.6, 'kl_weight': 3.0, 'step': 5})
    torch.manual_seed(7); o = m(x, tau=0.6)                                   # same Gumbel noise
    q = torch.softmax(o['logits'].double(), 1)
    if style == 'dalle':
        xm = 0.8 * x.double() + 0.1; mu, b = o['out'][:, :3].double(), o['out'][:, 3:].double().exp()
        nll = torch.log(2 * b * xm * (1 - xm)) + (torch.log(xm / (1 - xm)) - mu).abs() / b
        kl_pos = (q * torch.log(q * 16)).sum(1)                                # (B, h, w)
        ref = ((nll.sum((1, 2, 3)) + 3.0 * kl_pos.sum((1, 2))) / (3 * 32 * 32)).mean()
        assert_close(logs['rec'].double(), nll.mean(), rtol=1e-4, atol=1e-5)
        assert_close(logs['kl'].double(), kl_pos.mean(), rtol=1e-4, atol=1e-5)
    else:
        r = torch.sigmoid(o['out'].double()); qb = q.mean((0, 2, 3))
        bce = -(x * torch.log(r) + (1 - x) * torch.log(1 - r)).mean()
        ref = bce + 3.0 * (qb * torch.log(qb * 16)).sum()
        assert_close(logs['rec'].double(), bce, rtol=1e-4, atol=1e-5)
    assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    counts = code_counts(o['logits'].argmax(1), 16)
    assert math.isclose(float(logs['usage']), (counts > 0).float().mean().item(), abs_tol=1e-6)
    p = counts.double() / counts.sum()
    assert math.isclose(float(logs['perplexity']), math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()), rel_tol=1e-5)
    assert set(logs) == {'rec', 'kl', 'usage', 'perplexity', 'mse'}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in logs.values())


def test_dvae_loss_kl_weight_and_defaults():
    m = tiny('dalle'); x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0); l0, logs = dvae_loss(m, {'image': x}, {'tau': 1.0, 'kl_weight': 0.0})
    torch.manual_seed(0); l1, _ = dvae_loss(m, {'image': x}, {'tau': 1.0, 'kl_weight': 6.6})
    torch.manual_seed(0); ld, _ = dvae_loss(m, x, {})                          # a plain tensor batch, default hp
    assert_close(l1 - l0, 6.6 * logs['kl'] * 64 / (3 * 32 * 32))              # effective KL weight β·hw/(3HW)
    assert_close(ld, l0)
    with pytest.raises(InputError): dvae_loss(m, {'image': torch.rand(2, 32, 32)}, {})


@pytest.mark.parametrize('style', ['dalle', 'thesis'])
def test_save_load_round_trip(tmp_path, style):
    m = tiny(style, straight_through=(style == 'thesis'))
    m.train()(torch.rand(4, 3, 32, 32)); m.eval()                             # BatchNorm statistics move (thesis)
    m.save(tmp_path / TOKENIZER_FILE)
    m2 = load_tokenizer(tmp_path)
    assert type(m2) is DVAE and m2.kind == m.kind and m2.config == m.config and not m2.training
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(m2.encode(x), m.encode(x)) and torch.equal(m2.decode(m.encode(x)), m.decode(m.encode(x)))


def test_input_errors():
    m = tiny('dalle')
    for bad in (torch.rand(1, 3, 64, 64), torch.rand(1, 1, 32, 32), torch.rand(3, 32, 32)):
        with pytest.raises(InputError, match='images have shape'): m.encode(bad)
    for bad in (torch.full((1, 8, 8), 16), torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 8, 8), torch.full((1, 8, 8), -1)):
        with pytest.raises(InputError): m.decode(bad)
    for kw in (dict(style='vqvae'), dict(image_size=30), dict(vocab_size=1), dict(eps=0.5), dict(style='thesis', n_init=8),
               dict(hidden=24)):
        with pytest.raises(InputError): tiny(kw.pop('style', 'dalle'), **kw)


# ---------------------------------------------------------------- training, schedules, tables
@pytest.mark.parametrize('style', ['dalle', 'thesis'])
def test_overfit_four_images(style):
    "A few dozen Learner steps on 4 MD-MNIST images lower the loss clearly (deterministic)."
    from dalle_course.mdmnist import generate_mdmnist
    imgs = torch.from_numpy(generate_mdmnist(4, seed=1, size=64)['images']).permute(0, 3, 1, 2).float() / 255
    ds = ImageDS(F.avg_pool2d(imgs, 2))                                       # (4, 3, 32, 32)
    def run():
        torch.manual_seed(0)
        m = DVAE(style, image_size=32, vocab_size=16, hidden=16, n_down=2, n_res_down=1, n_res_bottleneck=0)
        cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, log_every=1, seed=0)
        l = Learner(m, dvae_loss, ds, cfg, hparams=dvae_hparams(style, 30, kl_end=0.0 if style == 'dalle' else 0.01))
        l.fit()
        return [r['loss'] for r in l.records]
    losses = run()
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - (0.8 if style == 'dalle' else 0.1), (first, last)
    assert run() == losses                                                     # same seeds, same run


def test_hparams_match_tables():
    h = dvae_hparams('dalle', 3_000_000, table=DALLE_DVAE)
    assert h['kl_weight'](0) == 0 and math.isclose(h['kl_weight'](2500), 3.3) and h['kl_weight'](5000) == 6.6
    assert math.isclose(h['kl_weight'](1250), 6.6 * (1 - math.cos(math.pi / 4)) / 2)   # cosine, not linear
    assert h['tau'](0) == 1 and math.isclose(h['tau'](75_000), (1 + 1 / 16) / 2) and h['tau'](150_000) == 1 / 16
    t5 = dvae_hparams('thesis', 100_000, table=THESIS_TABLE5['growing-kl'])
    assert math.isclose(t5['tau'](20_000), 5 - 4.99 / 4) and t5['tau'](80_000) == 0.01 == t5['tau'](90_000)
    assert math.isclose(t5['kl_weight'](17_500), 0.00025) and t5['kl_weight'](70_000) == 0.001
    assert dvae_hparams('thesis', 1000, table=THESIS_TABLE5['no-kl'])['kl_weight'] == Schedule.constant(0.0)
    p64 = dvae_hparams('thesis', 1000, table=THESIS_TABLE5['64px'])
    assert p64['tau'](0) == 8 and math.isclose(p64['kl_weight'](35_000), 0.00005)
    t6 = dvae_hparams('thesis', 5000, table=THESIS_TABLE6_DVAE)
    assert t6['kl_weight'] == Schedule.constant(0.01) and math.isclose(t6['tau'](750), 5 - 4.99 / 4) and t6['tau'](3000) == 0.01
    c128 = dvae_hparams('thesis', 1, table=THESIS_TABLE7_DVAE['cub128'])
    assert math.isclose(c128['tau'](70_000), (5 + 0.01) / 2) and math.isclose(c128['kl_weight'](50_000), 0.0005)
    # defaults fitted to the run, and overrides
    assert dvae_hparams('dalle', 300) == {'tau': Schedule.cosine(1, 1 / 16, 300), 'kl_weight': Schedule.cosine(0, 6.6, 10)}
    assert dvae_hparams('thesis', 800) == {'tau': Schedule.linear(5, 0.01, 800), 'kl_weight': Schedule.linear(0, 0.001, 700)}
    assert dvae_hparams('thesis', 800, kl_start=0.01, kl_end=0.01)['kl_weight'] == Schedule.constant(0.01)
    assert dvae_hparams('dalle', 10**7)['tau'] == Schedule.cosine(1, 1 / 16, 150_000)
    with pytest.raises(InputError): dvae_hparams('dalle', 100, beta=3)
    with pytest.raises(InputError): dvae_hparams('vq', 100)


def test_table_constants():
    for t in [*THESIS_TABLE5.values(), THESIS_TABLE6_DVAE, *THESIS_TABLE7_DVAE.values()]:
        # Tables 5 and 7 give 512 codes (CUB); Table 6 gives none, and the thesis's MD-MNIST code uses 256
        assert t['vocab_size'] == (256 if t is THESIS_TABLE6_DVAE else 512)
        assert t['n_down'] == 2 and t['gamma'] == 0.1 and t['tau_end'] == 0.01 and t['style'] == 'thesis'
    assert [THESIS_TABLE5[k]['kl_end'] for k in ('no-kl', 'growing-kl', '64px')] == [0, 0.001, 0.0001]
    assert [THESIS_TABLE5[k]['batch_size'] for k in ('no-kl', 'growing-kl', '64px')] == [16, 16, 64]
    assert THESIS_TABLE5['64px']['milestones'] == (20, 120) and THESIS_TABLE5['growing-kl']['milestones'] == (5, 100)
    assert (THESIS_TABLE6_DVAE['lr'], THESIS_TABLE6_DVAE['epochs'], THESIS_TABLE6_DVAE['batch_size'], THESIS_TABLE6_DVAE['hidden'],
            THESIS_TABLE6_DVAE['n_res_down'], THESIS_TABLE6_DVAE['tau_steps']) == (0.01, 30, 32, 256, 4, 3000)
    c64, c128 = THESIS_TABLE7_DVAE['cub64'], THESIS_TABLE7_DVAE['cub128']
    assert (c64['tau_start'], c64['kl_end'], c64['epochs'], c128['tau_steps'], c128['kl_steps']) == (8, 0.001, 500, 140_000, 100_000)
    assert (DALLE_DVAE['kl_end'], DALLE_DVAE['kl_steps'], DALLE_DVAE['tau_end'], DALLE_DVAE['tau_steps']) == (6.6, 5000, 1 / 16, 150_000)
    with torch.device('meta'):
        m = dvae_from_table(THESIS_TABLE6_DVAE)
        assert m.grid == (32, 32) and m.vocab_size == 256 and m.kind == 'dvae-thesis'
        d = dvae_from_table(DALLE_DVAE)
        assert d.grid == (32, 32) and d.vocab_size == 8192 and d.kind == 'dvae-dalle'


def test_tokenizer_eval_fn_in_learner():
    ds = ImageDS(torch.rand(8, 3, 32, 32))
    m = tiny('thesis')
    l = Learner(m, dvae_loss, ds, TrainConfig(steps=2, batch_size=4, log_every=1), eval_data=ds,
                hparams=dvae_hparams('thesis', 2), eval_fn=tokenizer_eval_fn(max_images=8))
    ev = l.fit()['eval']
    assert {'loss', 'rec', 'kl', 'usage', 'psnr', 'tok_mse', 'perplexity'} <= set(ev) and 0 < ev['usage'] <= 1
