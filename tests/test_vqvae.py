"""VQ-VAE (dalle_course.vqvae): lookup, straight-through gradient, losses, EMA codebook, k-means++ init, dead-code
restarts, the tokenizer (save/load for both kinds, eval purity), and training through the Learner."""
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dalle_course.core import InputError
from dalle_course.image_tokenizer import TOKENIZER_FILE, code_counts, codebook_usage, load_tokenizer, perplexity
from dalle_course.learner import Learner, TrainConfig
from dalle_course.schedules import Schedule
from dalle_course.vqvae import (THESIS_TABLE5_VQVAE, VQVAE, VectorQuantizer, code_distances, kmeans, kmeans_plus_plus,
                                nearest_codes, vqvae_hparams, vqvae_loss, vqvae_param_groups)

TINY = dict(image_size=32, vocab_size=16, dim=8, hidden=16, n_down=2, n_res_down=1, n_res_bottleneck=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _flat(z):  # (B, D, h, w) -> (B*h*w, D), row order b, y, x
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _blobs(n_blobs=8, per=64, dim=5, spread=0.1, scale=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_blobs, dim, generator=g) * scale
    pts = centres[:, None] + spread * torch.randn(n_blobs, per, dim, generator=g)
    return centres, pts.reshape(-1, dim)  # blob b = rows b*per .. (b+1)*per - 1


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, x): self.x = x
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {'image': self.x[i]}


def _images(n=16, size=32, seed=0):
    "Simple structured images: coloured squares on black (learnable in a few steps)."
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    for i in range(n):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, y0:y0 + size // 2, x0:x0 + size // 2] = torch.rand(3, 1, 1, generator=g)
    return x


# ---------------------------------------------------------------- lookup
@pytest.mark.parametrize('N,K,D', [(500, 64, 16), (37, 5, 3), (1000, 512, 64)])
def test_nearest_codes_matches_cdist(N, K, D):
    z, cb = torch.randn(N, D) * 2, torch.randn(K, D) * torch.rand(K, 1)
    idx, d = nearest_codes(z, cb)
    ref = torch.cdist(z.double(), cb.double()) ** 2
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert torch.equal(idx, ref.argmin(1))
    assert_close(d.double(), ref.min(1).values, rtol=1e-4, atol=1e-3)


def test_distances_in_float32_even_under_autocast_and_low_precision_inputs():
    z, cb = torch.randn(300, 32), torch.randn(50, 32)
    ref = code_distances(z, cb)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        d = code_distances(z, cb)
    assert d.dtype == torch.float32 and torch.equal(d, ref)
    zb = z.bfloat16()  # bf16 inputs are upcast, not multiplied in bf16
    assert_close(code_distances(zb, cb), torch.cdist(zb.double(), cb.double()).pow(2).float(), rtol=1e-4, atol=1e-3)


def test_quantizer_indices_are_the_nearest_codewords_per_position():
    vq = VectorQuantizer(32, 8, kmeans_init=False, restart_dead=False)
    with torch.no_grad(): vq.codebook.normal_()
    z = torch.randn(3, 8, 4, 5)  # h != w catches transposed grids
    out = vq(z)
    cb = vq.codebook.detach().double()
    for b in range(3):
        for y in range(4):
            for x in range(5):
                assert out.indices[b, y, x] == ((z[b, :, y, x].double() - cb) ** 2).sum(1).argmin()
    assert_close(out.quantized, vq.lookup(out.indices))


# ---------------------------------------------------------------- gradients and losses
def test_straight_through_and_loss_gradients():
    vq = VectorQuantizer(16, 4, beta=0.25, kmeans_init=False, restart_dead=False)
    with torch.no_grad(): vq.codebook.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    g = torch.randn_like(z)
    (gz,) = torch.autograd.grad(out.quantized, z, g, retain_graph=True)
    assert torch.equal(gz, g)                                                  # gradient copied unchanged
    assert torch.autograd.grad(out.quantized, vq.codebook, g, retain_graph=True, allow_unused=True)[0] is None
    fl, e = _flat(z.detach()), vq.codebook.detach()[out.indices.flatten()]
    numel = fl.numel()
    assert_close(out.commitment_loss, ((fl - e) ** 2).mean()); assert_close(out.codebook_loss, ((fl - e) ** 2).mean())
    assert_close(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)
    gz, gcb = torch.autograd.grad(out.loss, (z, vq.codebook))
    # L3 moves z by β·2(z − e)/numel; L2 moves each codeword by the sum of 2(e − z)/numel over its vectors
    assert_close(_flat(gz), 0.25 * 2 * (fl - e) / numel)
    ref = torch.zeros_like(vq.codebook).index_add_(0, out.indices.flatten(), 2 * (e - fl) / numel)
    assert_close(gcb, ref)


def test_ema_quantizer_has_no_codebook_gradient_or_loss():
    vq = VectorQuantizer(16, 4, ema=True, kmeans_init=False, restart_dead=False)
    assert not any(True for _ in vq.parameters())
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    assert out.codebook_loss.item() == 0 and out.loss.requires_grad
    (gz,) = torch.autograd.grad(out.loss, z)
    e = out.quantized.detach()  # the codewords at lookup time (the EMA step moved the codebook afterwards)
    assert_close(gz, 0.25 * 2 * (z.detach() - e) / z.numel())


def test_batch_usage_and_perplexity_match_imagetok_metrics():
    vq = VectorQuantizer(16, 4, kmeans_init=False, restart_dead=False)
    with torch.no_grad(): vq.codebook.normal_()
    out = vq(torch.randn(4, 4, 5, 5))
    c = code_counts(out.indices, 16)
    assert torch.equal(out.counts.long(), c)
    assert math.isclose(out.usage.item(), codebook_usage(c), rel_tol=1e-6)
    assert math.isclose(out.perplexity.item(), perplexity(c), rel_tol=1e-5)


# ---------------------------------------------------------------- EMA codebook
def test_ema_updates_follow_the_equations_over_several_steps():
    K, D, decay, eps = 8, 3, 0.9, 1e-5
    vq = VectorQuantizer(K, D, ema=True, decay=decay, eps=eps, kmeans_init=False, restart_dead=False).train()
    N, m = vq.cluster_size.double().clone(), vq.embed_sum.double().clone()
    for step in range(4):
        z = torch.randn(2, D, 4, 4) + step
        cb = vq.codebook.double().clone()
        out = vq(z)
        fl = _flat(z).double()
        idx = torch.cdist(fl, cb).argmin(1)
        assert torch.equal(out.indices.flatten(), idx)
        for i in range(K):  # brute force, one code at a time
            mem = fl[idx == i]
            N[i] = decay * N[i] + (1 - decay) * len(mem)
            m[i] = decay * m[i] + (1 - decay) * mem.sum(0)
        tot = N.sum()
        e = m / ((N + eps) / (tot + K * eps) * tot)[:, None]
        assert_close(vq.cluster_size.double(), N, rtol=1e-5, atol=1e-6)
        assert_close(vq.embed_sum.double(), m, rtol=1e-5, atol=1e-5)
        assert_close(vq.codebook.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('ema', [False, True])
def test_eval_mode_changes_nothing(ema):
    m = VQVAE(**TINY, ema=ema, dead_after=1)
    x = torch.rand(4, 3, 32, 32)
    m(x)  # train mode: initialise
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for _ in range(3): m(x); vqvae_loss(m, {'image': x}, {})
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize('ema', [False, True])
def test_encode_decode_have_no_side_effects_in_train_mode(ema):
    m = VQVAE(**TINY, ema=ema, dead_after=1).train()
    x = torch.rand(4, 3, 32, 32)
    m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    t = m.encode(x); r = m.decode(t)
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert t.shape == (4, 8, 8) and t.dtype == torch.int64 and r.shape == x.shape and 0 <= r.min() and r.max() <= 1
    m.eval(); assert torch.equal(m(x).vq.indices, t) and torch.equal(m.encode(x), t)


# ---------------------------------------------------------------- k-means++
def test_kmeans_plus_plus_centres_are_spread_data_points():
    centres, pts = _blobs()
    for trial in range(10):
        ids = kmeans_plus_plus(pts, 8)
        assert ids.dtype == torch.int64 and len(set(ids.tolist())) == 8   # distinct data points (rows of pts)
        assert len(set((ids // 64).tolist())) == 8                         # one per blob
    torch.manual_seed(5); a = kmeans_plus_plus(pts, 8)
    torch.manual_seed(5); b = kmeans_plus_plus(pts, 8)
    assert torch.equal(a, b)                                               # reproducible under the torch seed


def test_kmeans_plus_plus_first_centre_is_uniform():
    pts = torch.randn(5, 2)
    firsts = torch.cat([kmeans_plus_plus(pts, 1) for _ in range(500)])
    assert set(firsts.tolist()) == set(range(5))


def test_kmeans_recovers_blob_centres_and_counts():
    centres, pts = _blobs(per=50)
    c, n = kmeans(pts, 8, iters=5)
    d = torch.cdist(c, centres)
    assert d.min(1).values.max() < 0.1 and sorted(d.argmin(1).tolist()) == list(range(8))
    assert n.tolist() == [50.0] * 8


def test_kmeans_init_once_and_not_after_resume():
    centres, pts = _blobs(per=32)
    z = pts.reshape(4, 64, 5).permute(0, 2, 1)[..., None]                 # (4, 5, 64, 1)
    for ema in (False, True):
        vq = VectorQuantizer(8, 5, ema=ema, kmeans_init=True, restart_dead=False)
        assert not vq.is_initialized
        out = vq(z)
        assert vq.is_initialized and int(vq.initialized) == 1 and out.usage.item() == 1.0
        assert torch.cdist(vq.codebook.detach(), centres).min(1).values.max() < 0.1
        if ema: assert_close(vq.cluster_size, torch.full((8,), 32.0), rtol=0.05, atol=0.5)
        vq2 = VectorQuantizer(8, 5, ema=ema, kmeans_init=True, restart_dead=False).eval()
        vq2.load_state_dict(vq.state_dict())
        cb = vq2.codebook.detach().clone()
        vq2.train()(torch.randn(4, 5, 64, 1) * 100)
        assert vq2.is_initialized
        if not ema: assert torch.equal(vq2.codebook.detach(), cb)          # no re-initialisation


def test_no_kmeans_in_eval_mode():
    vq = VectorQuantizer(8, 5, kmeans_init=True).eval()
    cb = vq.codebook.detach().clone()
    vq(torch.randn(2, 5, 4, 4))
    assert not vq.is_initialized and torch.equal(vq.codebook.detach(), cb)


# ---------------------------------------------------------------- dead-code restarts
@pytest.mark.parametrize('ema', [False, True])
def test_dead_codes_are_restarted_onto_batch_vectors(ema):
    vq = VectorQuantizer(16, 2, ema=ema, kmeans_init=False, restart_dead=True, dead_after=3)
    with torch.no_grad():
        vq.codebook.normal_(); vq.codebook[4:] = 100.0
        if ema: vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
    used, restarted = [], []
    for step in range(6):
        z = torch.randn(4, 2, 8, 8)
        alive = vq.codebook.detach().clone()
        out = vq(z)
        used.append(int((out.counts > 0).sum())); restarted.append(int(out.restarted))
        if step == 3:  # the 12 dead codes now sit exactly on vectors of this batch; the 4 live ones did not move
            if not ema:
                cb = vq.codebook.detach()
                assert torch.equal(cb[:4], alive[:4])
                assert (cb[4:, None, :] == _flat(z)[None]).all(-1).any(1).all()      # each one equals a batch vector
    assert used[:3] == [u for u in used[:3] if u <= 4] and restarted == [0, 0, 0, 12, 0, 0]
    assert used[3] == 16


def test_restarts_are_reproducible_under_the_seed():
    def run(seed):
        torch.manual_seed(seed)
        vq = VectorQuantizer(32, 4, ema=True, kmeans_init=False, dead_after=2)
        for _ in range(5): vq(torch.randn(2, 4, 4, 4))
        return vq.codebook.clone()
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_used_codes_are_never_restarted():
    vq = VectorQuantizer(4, 2, kmeans_init=False, restart_dead=True, dead_after=1)
    with torch.no_grad(): vq.codebook.copy_(torch.tensor([[1., 1], [-1, 1], [1, -1], [-1, -1]]))
    z = torch.tensor([[1., 1], [-1, 1], [1, -1], [-1, -1]]).repeat(4, 1).t().reshape(1, 2, 4, 4)  # every code used
    cb = vq.codebook.detach().clone()
    for _ in range(5): assert vq(z).restarted.item() == 0
    assert torch.equal(vq.codebook.detach(), cb) and (vq.unused == 0).all()


# ---------------------------------------------------------------- the tokenizer
@pytest.mark.parametrize('ema', [False, True])
def test_save_load_round_trip_both_kinds(ema, tmp_path):
    m = VQVAE(**TINY, ema=ema)
    x = torch.rand(4, 3, 32, 32)
    for _ in range(2): m(x)  # k-means init, EMA steps, BN statistics
    m.save(tmp_path / TOKENIZER_FILE)
    m2 = load_tokenizer(tmp_path)
    assert type(m2) is VQVAE and m2.kind == ('vqvae-ema' if ema else 'vqvae') and m2.config == m.config
    assert not m2.training and m2.quantizer.is_initialized
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    if ema: assert {'quantizer.cluster_size', 'quantizer.embed_sum'} <= set(sd2)
    t = m.encode(x)
    assert torch.equal(m2.encode(x), t) and torch.equal(m2.decode(t), m.decode(t))


def test_defaults_follow_the_thesis():
    m = VQVAE(image_size=64, vocab_size=32, hidden=16, n_res_down=1, n_res_bottleneck=1)
    assert m.dim == 32 and m.quantizer.codebook.shape == (32, 32)        # D = K, as in the thesis
    assert m.kind == 'vqvae' and m.encoder.style == 'thesis' and isinstance(m.norm, torch.nn.BatchNorm2d)
    assert m.grid == (16, 16) and m.quantizer.beta == 0.25 and m.quantizer.decay == 0.99


def test_dalle_style_works(tmp_path):
    m = VQVAE(image_size=32, vocab_size=16, dim=8, style='dalle', hidden=32, n_down=2, n_res_down=1, n_res_bottleneck=1,
              style_kwargs={'n_init': 8})
    x = torch.rand(2, 3, 32, 32)
    out = m(x)
    assert out.recon.shape == x.shape and m.encode(x).shape == (2, 8, 8) and m.encoder.style == 'dalle'
    m.save(tmp_path / 't.safetensors'); m2 = load_tokenizer(tmp_path / 't.safetensors')
    assert torch.equal(m2.encode(x), m.encode(x))


def test_bad_inputs_raise_input_error():
    m = VQVAE(**TINY)
    for bad in (torch.rand(2, 3, 16, 16), torch.rand(3, 32, 32)):
        with pytest.raises(InputError): m.encode(bad)
    with pytest.raises(InputError): m.decode(torch.full((1, 8, 8), 16))
    with pytest.raises(InputError): VQVAE(**{**TINY, 'image_size': 30})
    with pytest.raises(InputError): VectorQuantizer(16, 8)(torch.randn(1, 4, 2, 2))
    with pytest.raises(InputError): VectorQuantizer(16, 8, decay=1.0)
    with pytest.raises(InputError): vqvae_param_groups(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- training API
def test_param_groups_hold_the_codebook_only():
    m = VQVAE(**TINY)
    g = vqvae_param_groups(m, 10.0)
    assert len(g) == 2 and g[1]['params'] == [m.quantizer.codebook] and g[1]['lr_mult'] == 10.0 and g[0]['lr_mult'] == 1.0
    ids0 = [id(p) for p in g[0]['params']]
    assert len(ids0) == len(set(ids0)) and sorted(ids0 + [id(m.quantizer.codebook)]) == sorted(id(p) for p in m.parameters())
    assert len(vqvae_param_groups(VQVAE(**TINY, ema=True), 10.0)) == 1


def test_codebook_learning_rate_really_is_ten_times():
    m = VQVAE(**TINY, kmeans_init=False, restart_dead=False)
    x = _images(8)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-3, grad_clip=None, log_every=1)
    l = Learner(m, vqvae_loss, ImageSet(x), cfg, param_groups=vqvae_param_groups(m, 10.0))
    l.fit()
    assert [round(g['lr'], 9) for g in l.opt.param_groups] == [1e-3, 1e-2]
    # Adam's first step moves every parameter with a nonzero gradient by about lr (times the sign)
    dcb = (m.quantizer.codebook.detach() - before['quantizer.codebook']).abs().max().item()
    dother = max((p.detach() - before[n]).abs().max().item() for n, p in m.named_parameters() if n != 'quantizer.codebook')
    assert 0.9e-2 < dcb < 1.1e-2 and 0.9e-3 < dother < 1.1e-3


def test_vqvae_loss_terms_logs_and_beta_from_hp():
    m = VQVAE(**TINY)
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1); loss, logs = vqvae_loss(m, {'image': x}, {})
    assert set(logs) == {'mse', 'codebook', 'commitment', 'usage', 'perplexity', 'restarted'}
    assert_close(loss, logs['mse'] + logs['codebook'] + 0.25 * logs['commitment'])
    m.eval()
    l1, lg = vqvae_loss(m, {'image': x}, {'beta': 2.0})
    r = m(x)
    assert_close(lg['mse'], F.mse_loss(r.recon, x))
    assert_close(l1, lg['mse'] + lg['codebook'] + 2.0 * lg['commitment'])
    assert vqvae_hparams(100) == {} and vqvae_hparams(100, beta=0.25) == {'beta': Schedule.constant(0.25)}
    assert vqvae_hparams(100, beta=0.5, beta_warmup=10)['beta'](5) == 0.25


def test_thesis_table5_columns():
    p, s = THESIS_TABLE5_VQVAE['plain'], THESIS_TABLE5_VQVAE['sep-vocab-lr']
    assert set(THESIS_TABLE5_VQVAE) == {'plain', 'sep-vocab-lr'}
    for c in (p, s):
        assert (c['epochs'], c['batch_size'], c['lr'], c['lr_gamma'], tuple(c['lr_milestone_epochs'])) == (150, 16, 1e-3, 0.1, (5, 100))
        assert (c['vocab_size'], c['dim'], c['beta'], c['ema_decay'], c['n_down'], c['n_res_down'], c['n_res_bottleneck'],
                c['hidden']) == (512, 512, 0.25, 0.99, 2, 6, 4, 512)
    assert (p['codebook_lr'], s['codebook_lr']) == (1e-3, 1e-2) and math.isclose(s['codebook_lr'] / s['lr'], s['codebook_lr_mult'])


@pytest.mark.parametrize('ema', [False, True])
def test_tiny_overfit_reduces_loss(ema):
    torch.manual_seed(0)
    m = VQVAE(**TINY, ema=ema, dead_after=5)
    x = _images(8)
    cfg = TrainConfig(steps=60, batch_size=8, lr=1e-2, log_every=1, seed=0)
    l = Learner(m, vqvae_loss, ImageSet(x), cfg, param_groups=vqvae_param_groups(m, 10.0))
    l.fit()
    mse = [r['metrics']['mse'] for r in l.records if r['split'] == 'train']
    assert mse[-1] < 0.5 * mse[0], (mse[0], mse[-1])
    m.eval()
    assert F.mse_loss(m.decode(m.encode(x)), x).item() < 0.5 * mse[0]


def test_resumed_training_equals_uninterrupted(tmp_path):
    "Exact resume: the k-means init is not redone and restarts draw the same random vectors."
    x = _images(16)
    def learner(out, steps, resume=False):
        torch.manual_seed(0)
        m = VQVAE(**TINY, ema=True, dead_after=2)
        cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, ckpt_every=3, log_every=1, seed=0)
        return m, Learner(m, vqvae_loss, ImageSet(x), cfg, out=out, param_groups=vqvae_param_groups(m, 10.0), resume=resume)
    ma, la = learner(tmp_path / 'a', 6); la.fit()
    mb, lb = learner(tmp_path / 'b', 3); lb.fit()
    mc, lc = learner(tmp_path / 'b', 6, resume=True); lc.fit()
    sa, sc = ma.state_dict(), mc.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sc[k])]


def test_ddp_ranks_keep_one_codebook(tmp_path):
    "Two Gloo processes: every codebook buffer agrees across ranks; the EMA equals one process on the whole batch."
    import importlib.util, os, subprocess, sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                        os.path.join(here, 'vqvae_ddp_script.py'), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path / f'rank{i}.pt') for i in (0, 1))
    for name in s0:
        for k in s0[name]: assert torch.equal(s0[name][k], s1[name][k]), (name, k)
    spec = importlib.util.spec_from_file_location('vqvae_ddp_script', os.path.join(here, 'vqvae_ddp_script.py'))
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    single = mod.run()
    for k in single['ema']: assert_close(s0['ema'][k], single['ema'][k], rtol=1e-5, atol=1e-6)
    assert s0['ema+tricks']['initialized'] == 1 and s0['grad+tricks']['initialized'] == 1


# ---- beyond the thesis: the rotation trick and FSQ (lesson 13, section 10)
def _plane_rotation(u, v):
    "Rotation (D, D) float64 in the plane of unit vectors u, v taking u to v (built with Gram-Schmidt, not Householder)."
    c = float(u @ v); vp = v - c * u; vp = vp / vp.norm(); s = (1 - c * c) ** 0.5
    return (torch.eye(len(u), dtype=torch.float64) + s * (torch.outer(vp, u) - torch.outer(u, vp))
            + (c - 1) * (torch.outer(u, u) + torch.outer(vp, vp)))


def test_rotation_trick_value_and_gradient_against_an_explicit_rotation():
    from dalle_course.vqvae import rotation_trick
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    e = (torch.randn(20, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    gout = torch.randn(20, 6, generator=g, dtype=torch.float64)
    q = rotation_trick(z, e)
    assert torch.equal(q.detach(), e.detach())
    gz, ge = torch.autograd.grad(q, (z, e), gout, allow_unused=True)
    assert ge is None or bool((ge == 0).all())
    for n in range(20):
        zd, ed = z[n].detach(), e[n].detach()
        R = _plane_rotation(zd / zd.norm(), ed / ed.norm())
        torch.testing.assert_close(gz[n], ed.norm() / zd.norm() * R.T @ gout[n])
    # opposite vectors (u = -v): a reflection, still mapping z onto e
    zz = torch.tensor([[1.0, 0.0]], requires_grad=True); ee = torch.tensor([[-2.0, 0.0]])
    assert torch.equal(rotation_trick(zz, ee).detach(), ee)


def test_quantizer_gradient_option():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3, requires_grad=True); gr = torch.randn(2, 4, 3, 3)
    outs = {}
    for grad in ('ste', 'rotation'):
        vq = VectorQuantizer(vocab_size=8, dim=4, kmeans_init=False, restart_dead=False, grad=grad)
        torch.manual_seed(1); vq.codebook.data.normal_()
        o = vq(z); outs[grad] = (o.quantized.detach(), torch.autograd.grad(o.quantized, z, gr)[0])
    assert_close(outs['ste'][0], outs['rotation'][0])                           # same codewords chosen and returned
    assert torch.equal(outs['ste'][1], gr) and not torch.allclose(outs['rotation'][1], gr)
    with pytest.raises(InputError, match='grad'): VectorQuantizer(8, 4, grad='gumbel')


def test_fsq_grid_is_a_bijection_and_rounding_is_the_nearest_point():
    from dalle_course.vqvae import FSQ, FSQ_LEVELS, fsq_vocab_size
    for levels in [(8, 5, 5, 5), (4, 4, 4), (7, 5, 5, 5, 5), (3,)]:
        q = FSQ(levels)
        assert q.vocab_size == fsq_vocab_size(levels) == int(np.prod(levels))
        pts = q.codes(torch.arange(q.vocab_size))                          # (K, d) in [-1, 1]
        assert len(torch.unique(pts, dim=0)) == q.vocab_size and float(pts.abs().max()) <= 1
        assert torch.equal(q.indices_of(pts), torch.arange(q.vocab_size))
        z = torch.randn(3, len(levels), 4, 4) * 3
        o = q(z)
        b = q.bound(z.permute(0, 2, 3, 1)) / (q.L // 2)
        brute = torch.cdist(b.reshape(-1, len(levels)).double(), pts.double()).argmin(1)
        assert torch.equal(o.indices.flatten(), brute)
        torch.testing.assert_close(o.quantized, q.lookup(o.indices))
        assert o.loss == 0 and o.commitment_loss == 0
    assert all(fsq_vocab_size(v) <= k * 1.2 for k, v in FSQ_LEVELS.items())
    assert FSQ_LEVELS[1024] == (8, 5, 5, 5)                                  # the FSQ paper's Table 1
    with pytest.raises(InputError, match='levels'): FSQ((1, 5))


def test_fsq_gradient_is_straight_through_the_rounding():
    from dalle_course.vqvae import FSQ
    q = FSQ((8, 5, 3))
    z = (torch.randn(2, 3, 4, 4) * 2).requires_grad_()
    g = torch.randn(2, 3, 4, 4)
    got = torch.autograd.grad(q(z).quantized, z, g)[0]
    zz = z.detach().clone().requires_grad_()
    ref = torch.autograd.grad((q.bound(zz.permute(0, 2, 3, 1)) / (q.L // 2)).permute(0, 3, 1, 2), zz, g)[0]
    torch.testing.assert_close(got, ref)
    assert bool((got != 0).any())


@pytest.mark.parametrize('kind', ['fsq', 'vqvae-rotation'])
def test_new_kinds_train_save_and_load(kind, tmp_path):
    from dalle_course.tokenizer_training import train_tokenizer, resolve_recipe
    from dalle_course.image_tokenizer import load_tokenizer
    from dalle_course.mdmnist import write_mdmnist
    write_mdmnist(tmp_path / 'd', n=48, seed=0, size=64, split='train', show_progress=False)
    r = resolve_recipe(kind, 'tiny', 64, 48)
    if kind == 'fsq':
        assert r.model['levels'] == [4, 4, 4] and r.model['vocab_size'] == 64 and r.model['bn'] is False
        big = resolve_recipe(kind, 'tiny', 64, 48, overrides={'model': {'vocab_size': 1024}})
        assert big.model['levels'] == [8, 5, 5, 5] and big.model['vocab_size'] == 1000    # the override picks the levels
        own = resolve_recipe(kind, 'tiny', 64, 48, overrides={'model': {'levels': [5, 3]}})
        assert own.model['vocab_size'] == 15
        with pytest.raises(InputError, match='level lists'): resolve_recipe(kind, 'tiny', 64, 48, overrides={'model': {'vocab_size': 100}})
    else: assert r.model['grad'] == 'rotation' and r.model['ema'] is True
    res = train_tokenizer(kind, tmp_path / 'd', 'tiny', out=tmp_path / 'run', steps=30, plots=False, ruler=None)
    m = res['tokenizer']
    from dalle_course.tokenizer_training import build_tokenizer
    from dalle_course.image_tokenizer import evaluate_tokenizer
    torch.manual_seed(0)
    fresh = evaluate_tokenizer(build_tokenizer(res['recipe']).eval(), res['test_data'])['mse']
    assert m.kind == kind and res['test']['mse'] < 0.7 * fresh                  # trained: well below an untrained one
    m2 = load_tokenizer(tmp_path / 'run')
    x = torch.rand(2, 3, 64, 64)
    assert m2.kind == kind and torch.equal(m2.encode(x), m.encode(x))
    losses = [x['loss'] for x in res['records'] if x['split'] == 'train']
    assert losses[-1] < losses[0]
