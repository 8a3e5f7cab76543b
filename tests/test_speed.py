"The speed lesson (dalle_course.speed): timing, FLOP counts, the static KV cache against the uncached forward, the bench commands."
import json
import time
import warnings

import pytest
import torch
from torch.testing import assert_close

from dalle_course.cli import main
from dalle_course.core import InputError
from dalle_course.prior import JointPrior, SeparatePrior
from dalle_course.sampling import cached_logits, sample
from dalle_course.speed import (StaticDecoder, bench_config, bench_generate, bench_generate_sweep, bench_report,
                                bench_tokenizer, bench_train, decode_limit, jacobi_sample, matmul_params, sweep_report,
                                time_steps, train_flops_per_token)


def _priors():
    torch.manual_seed(0)
    return {'g1-causal': JointPrior(40, 12, 6, 4, 4, dim=32, depth=2, n_heads=4, mask_pattern='causal').eval(),
            'g1-dalle': JointPrior(40, 12, 6, 4, 4, dim=32, depth=4, n_heads=4, mask_pattern='dalle').eval(),
            'g2': SeparatePrior(40, 12, 6, 4, 4, dim=32, depth=2, n_heads=4).eval()}


@pytest.mark.parametrize('name', ['g1-causal', 'g1-dalle', 'g2'])
def test_static_cache_equals_uncached_forward(name):
    prior = _priors()[name]
    g = torch.Generator().manual_seed(1)
    text, img = torch.randint(1, 40, (3, 6), generator=g), torch.randint(0, 12, (3, 16), generator=g)
    with torch.no_grad(): ref = prior(text, img)['image_logits']  # (3, 16, 12)
    dec = StaticDecoder(prior)
    assert_close(cached_logits(dec, text, img), ref, atol=1e-5, rtol=1e-4)
    # a second caption batch through the same buffers: nothing of the first may leak into it
    text2, img2 = torch.randint(1, 40, (3, 6), generator=g), torch.randint(0, 12, (3, 16), generator=g)
    with torch.no_grad(): ref2 = prior(text2, img2)['image_logits']
    assert_close(cached_logits(dec, text2, img2), ref2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', ['g1-dalle', 'g2'])
def test_static_cache_samples_what_the_prior_samples(name):
    prior = _priors()[name]
    text = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(2))
    given = torch.randint(0, 12, (4, 1, 4), generator=torch.Generator().manual_seed(3))  # the top row fixed
    for opts in (dict(), dict(guidance=3.0, top_k=5, temperature=0.7), dict(given=given, top_p=0.9)):
        a = sample(prior, text, generator=torch.Generator().manual_seed(4), **opts)
        b = sample(StaticDecoder(prior), text, generator=torch.Generator().manual_seed(4), **opts)
        assert torch.equal(a, b), opts


def test_static_cache_keeps_its_buffers_and_changes_no_weights():
    prior = _priors()['g1-causal']
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    dec = StaticDecoder(prior)
    text = torch.randint(1, 40, (2, 6))
    state, _ = dec.prefix(text)
    bufs = lambda: [t for c in dec.caches for t in (c.k, c.v)]  # noqa: E731  lesson 22's KVCache buffers, (R, H, T, d)
    ptrs = [t.data_ptr() for t in bufs()] + [dec.pos.data_ptr()]
    shapes = [tuple(t.shape) for t in bufs()]
    assert shapes == [(2, prior.transformer.blocks[0].attn.h, prior.transformer.max_len, prior.transformer.blocks[0].attn.d)] * len(shapes)
    dec.extend(state, torch.randint(0, 12, (2, 15)))  # every token that can be fed
    assert [t.data_ptr() for t in bufs()] + [dec.pos.data_ptr()] == ptrs  # written in place, never reallocated
    assert [tuple(t.shape) for t in bufs()] == shapes
    dec.prefix(torch.randint(1, 40, (2, 6)))                              # the next batch of the same size reuses them
    assert [t.data_ptr() for t in bufs()] + [dec.pos.data_ptr()] == ptrs
    with pytest.raises(InputError, match='static cache holds'): dec.extend(state, torch.zeros(2, 1, dtype=torch.long))
    assert all(torch.equal(v, prior.state_dict()[k]) for k, v in before.items())


def test_static_cache_follows_changed_weights():
    prior = _priors()['g1-causal']
    dec = StaticDecoder(prior)
    text, img = torch.randint(1, 40, (2, 6)), torch.randint(0, 12, (2, 16))
    cached_logits(dec, text, img)
    with torch.no_grad():
        for p in prior.parameters(): p.add_(0.01 * torch.randn_like(p))  # "trained further"
        ref = prior(text, img)['image_logits']
    assert_close(cached_logits(dec, text, img), ref, atol=1e-5, rtol=1e-4)


def test_static_decoder_refuses_parallel_priors():
    from dalle_course.paella import PaellaPrior
    with pytest.raises(InputError, match='G1 \\(joint\\) and G2'):
        StaticDecoder(PaellaPrior(40, 16, 6, 8, 8, dim=32, enc_depth=1, n_heads=2))


def test_compile_failure_falls_back_to_the_eager_step(monkeypatch):
    prior = _priors()['g1-causal']
    text = torch.randint(1, 40, (2, 6))
    ref = sample(prior, text, generator=torch.Generator().manual_seed(0))

    def broken(*a, **k):
        def f(*a, **k): raise RuntimeError('no compiler here')
        return f
    monkeypatch.setattr(torch, 'compile', broken)
    dec = StaticDecoder(prior, compile=True)
    with pytest.warns(UserWarning, match='torch.compile failed'):
        out = sample(dec, text, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)


def test_compiled_step_equals_the_eager_step():
    prior = _priors()['g1-dalle']
    text, img = torch.randint(1, 40, (2, 6)), torch.randint(0, 12, (2, 16))
    ref = cached_logits(StaticDecoder(prior), text, img)
    dec = StaticDecoder(prior, compile=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        out = cached_logits(dec, text, img)
    assert not [w for w in seen if 'torch.compile failed' in str(w.message)]  # the compiled step ran, no fallback
    assert dec._fn is not dec.step
    assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_time_steps_warms_up_and_takes_the_median():
    calls = []
    t = time_steps(lambda: (calls.append(1), time.sleep(0.01 * (len(calls) == 5))), warmup=2, repeats=5)
    assert len(calls) == 7 and len(t['times']) == 5
    assert t['max'] >= 0.01 and t['median'] < 0.005  # one slow call moves the max, not the median
    with pytest.raises(InputError): time_steps(lambda: None, warmup=0, repeats=0)


def test_flops_formula_against_torch_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    prior = _priors()['g1-causal']
    text, img = torch.randint(1, 40, (2, 6)), torch.randint(0, 12, (2, 16))
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH): prior(text, img)
    B, T, D, L, N = 2, 6 + 16 - 1, 32, 6, 16
    heads = matmul_params(prior.text_head) + matmul_params(prior.image_head)
    assert matmul_params(prior) == 2 * (12 * D * D) + heads  # 2 blocks of q, k, v, out and the 4x MLP
    exact = B * (T * (2 * (matmul_params(prior) - heads) + 4 * 2 * T * D) + 2 * D * (40 * (L - 1) + 12 * N))
    assert fc.get_total_flops() == exact
    assert abs(B * T * train_flops_per_token(prior, T, 2, D) / 3 / exact - 1) < 0.1


def test_bench_functions_on_the_tiny_config():
    cfg = bench_config('tiny')
    r = bench_train(cfg, mask='dalle', steps=2, warmup=1, peak_flops=1e12)
    assert r['tokens_per_s'] > 0 and r['mfu'] == pytest.approx(r['flops_per_s'] / 1e12)
    assert r['tokens_per_s'] == pytest.approx(2 * (8 + 16) / r['step_s']['median'])
    g = bench_generate(cfg, repeats=1, warmup=0, guidance=2.0)
    assert set(g['samplers']) == {'growing cache', 'static'} and all(v['images_per_s'] > 0 for v in g['samplers'].values())
    k = bench_tokenizer('fsq', batch_size=2, repeats=1, warmup=0)
    assert set(k['results']) == {'encode', 'decode', 'train step'}
    for res in (r, g, k): assert bench_report(res).count('\n') >= 2
    assert bench_config('cpu', dim=128)['dim'] == 128 and bench_config('anchor')['depth'] == 12
    with pytest.raises(InputError, match='unknown bench config'): bench_config('huge')


def test_bench_commands(tmp_path, capsys):
    out = tmp_path / 'train.json'
    assert main(['bench', 'train', '--config', 'tiny', '--steps', '2', '--warmup', '0', '--peak-tflops', '1',
                 '--json', str(out)]) == 0
    res = json.loads(out.read_text())
    assert res['written_by'] == 'dalle-course bench' and res['what'] == 'train' and res['peak_source'] == 'given'
    assert 'tokens/s' in capsys.readouterr().out
    assert main(['bench', 'train', '--config', 'tiny', '--steps', '1', '--json', str(out)]) == 2  # exists
    assert main(['bench', 'train', '--config', 'tiny', '--steps', '1', '--warmup', '0', '--peak-tflops', '1',
                 '--json', str(out), '--overwrite']) == 0  # its own file
    foreign = tmp_path / 'mine.json'; foreign.write_text('{"a": 1}')
    assert main(['bench', 'generate', '--config', 'tiny', '--json', str(foreign), '--overwrite']) == 2
    assert foreign.read_text() == '{"a": 1}'
    assert main(['bench', 'generate', '--config', 'tiny', '--repeats', '1', '--grid', '2', '--static-only']) == 0
    assert 'static' in capsys.readouterr().out
    assert main(['bench', 'tokenizer', '--kind', 'dvae-dalle', '--batch-size', '2', '--repeats', '1']) == 0
    assert main(['bench', 'train', '--config', 'tiny', '--dim', '30', '--heads', '4']) == 2
    assert main(['bench', 'generate', '--config', 'tiny', '--guidance', 'inf']) == 2
    assert main(['bench', 'train', '--config', 'tiny', '--attention', 'flex', '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert 'not divisible' in err and 'guidance' in err and 'FlexAttention has no backward' in err
    assert len(err.strip().splitlines()) == 3


def test_channels_last_tokenizer_encodes_and_decodes_the_same():
    "bench tokenizer's CUDA layout (channels_last) computes what the default layout computes (checked on the CPU)."
    from dalle_course.tokenizer_training import build_tokenizer, resolve_recipe
    for kind in ('dvae-thesis', 'vqvae'):
        torch.manual_seed(0)
        tok = build_tokenizer(resolve_recipe(kind, 'tiny', 64, n_train=100)).eval()
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            codes, img = tok.encode(x), tok.decode(tok.encode(x))
            tok_cl = tok.to(memory_format=torch.channels_last)
            codes_cl = tok_cl.encode(x.to(memory_format=torch.channels_last))
            img_cl = tok_cl.decode(codes_cl)
        assert torch.equal(codes, codes_cl)
        assert_close(img_cl, img, atol=1e-5, rtol=1e-4)


def test_side_by_side_script_uses_the_library_configs():
    "bench/side_by_side.py keeps its own copy of the configs and DALL-E's layer pattern (dalle-pytorch's venv has no dalle_course): they must agree."
    import importlib.util
    from pathlib import Path
    from dalle_course.masks import dalle_layer_kinds
    from dalle_course.speed import BENCH_CONFIGS
    spec = importlib.util.spec_from_file_location('side_by_side', Path(__file__).resolve().parent.parent / 'bench' / 'side_by_side.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    assert mod.CONFIGS == BENCH_CONFIGS
    assert all(mod._dalle_kinds(d) == dalle_layer_kinds(d) for d in range(1, 13))
    r = mod.measure('dalle_course', 'generate', mod.CONFIGS['tiny'], 'causal', 2, 1, 0, 1, 'cpu', 1)
    assert r['images_per_s'] > 0 and len(r['times']) == 1


# ---- the limit every decoding number is set against

def test_decode_limit_counts_a_g1_by_hand():
    tiny = JointPrior(10, 6, 3, 2, 2, dim=8, depth=1, n_heads=2).eval()
    P = sum(m.weight.numel() for m in tiny.transformer.blocks.modules() if isinstance(m, torch.nn.Linear)) + 6 * 8
    steps = sum(2 * P + 4 * t * 8 for t in (4, 5, 6))       # 3 token steps after 3 text tokens: 4, 5, 6 keys seen
    prefix = 2 * matmul_params(tiny.transformer) * 3  # the caption's 3 positions through the linear layers
    lim = decode_limit(tiny, 1, peak_flops=1e9, bandwidth=1e30)
    assert lim['binds'] == 'compute' and lim['flops_per_image'] == pytest.approx(steps + prefix)
    assert 1 / lim['images_per_s'] == pytest.approx((steps + prefix) / 1e9)
    mem = decode_limit(tiny, 2, guidance=3.0, peak_flops=1e30, bandwidth=1e6)  # guidance: 4 rows for 2 images
    nbytes = sum(4 * (P + 4 * 2 * t * 8) for t in (4, 5, 6)) + 4 * P
    half = decode_limit(tiny, 2, guidance=3.0, peak_flops=1e30, bandwidth=1e6, cache_bytes_per_number=2)  # a bf16 cache
    assert half['bytes_per_image'] == pytest.approx((sum(4 * P + 2 * 4 * 2 * t * 8 for t in (4, 5, 6)) + 4 * P) / 2)
    assert mem['binds'] == 'memory' and mem['rows'] == 4 and mem['passes_per_image'] == 4
    assert mem['bytes_per_image'] == pytest.approx(nbytes / 2) and 2 / mem['images_per_s'] == pytest.approx(nbytes / 1e6)


def test_decode_limit_of_a_g2_counts_cross_attention_once():
    g2 = SeparatePrior(10, 6, 3, 2, 2, dim=8, depth=1, n_heads=2).eval()
    blk = g2.decoder.blocks[0]
    P = (sum(m.weight.numel() for m in blk.modules() if isinstance(m, torch.nn.Linear))
         - blk.xattn.k.weight.numel() - blk.xattn.v.weight.numel() + 6 * 8)  # the text's keys and values: once, in prefix
    lim = decode_limit(g2, 1, peak_flops=1e9, bandwidth=1e30)
    steps = sum(2 * P + 4 * t * 8 + 4 * 3 * 8 for t in (2, 3, 4))   # BOS then tokens: 2, 3, 4 keys; 3 text positions
    prefix = 2 * (matmul_params(g2.text_encoder) * 3 + matmul_params(g2.decoder))  # the encoder, then the start token
    assert lim['flops_per_image'] == pytest.approx(steps + prefix)


def test_decode_limit_weights_are_shared_by_the_batch_and_the_cache_is_not():
    cfg = bench_config('cpu')
    prior = JointPrior(cfg['text_vocab'], cfg['image_vocab'], cfg['text_len'], 16, 16, dim=cfg['dim'], depth=cfg['depth'],
                       n_heads=cfg['n_heads']).eval()
    one, many = (decode_limit(prior, B, peak_flops=300e9, bandwidth=30e9) for B in (1, 64))
    assert one['binds'] == 'memory' and one['flops_per_image'] == pytest.approx(many['flops_per_image'])
    cache = 4 * 2 * cfg['depth'] * cfg['dim'] * sum(range(cfg['text_len'] + 1, cfg['text_len'] + 256))  # per image, any batch
    assert many['bytes_per_image'] - cache == pytest.approx((one['bytes_per_image'] - cache) / 64)
    assert many['images_per_s'] > 5 * one['images_per_s']
    assert decode_limit(prior, 64, peak_flops=300e9, bandwidth=1e13)['binds'] == 'compute'  # memory fast enough


def test_bench_generate_reports_cold_warm_and_the_limit(capsys, tmp_path):
    cfg = bench_config('tiny')
    g = bench_generate(cfg, repeats=1, warmup=0, peak_flops=1e11, bandwidth=1e10)
    for v in g['samplers'].values():
        assert v['cold_s'] > 0 and v['of_limit'] == pytest.approx(v['images_per_s'] / g['limit']['images_per_s'])
    assert g['limit']['peak_flops'] == 1e11 and g['limit']['passes_per_image'] == 16
    assert 'limit' in bench_report(g) and 'sequential forward passes per image' in bench_report(g)
    rs = bench_generate_sweep(cfg, batch_sizes=(1, 2), repeats=1, peak_flops=1e11, bandwidth=1e10)
    assert [(r['batch_size'], r['guidance'], r['limit']['rows']) for r in rs] == [(1, 1.0, 1), (1, 3.0, 2), (2, 1.0, 2), (2, 3.0, 4)]
    table = sweep_report(rs)
    assert table.count('\n| ') == 5 and '| 2 | 3 | 4 |' in table  # the header and 4 rows
    js = tmp_path / 'sweep.json'
    assert main(['bench', 'generate', '--config', 'tiny', '--sweep', '--repeats', '1', '--json', str(js)]) == 0
    out = capsys.readouterr().out
    assert '| 64 | 3 | 128 |' in out and '| 1 | 1 | 1 |' in out and 'bound by' in out
    res = json.loads(js.read_text())
    assert res['written_by'] == 'dalle-course bench' and [r['batch_size'] for r in res['sweep']] == [1, 1, 8, 8, 64, 64]


def test_bench_train_states_its_limit():
    r = bench_train(bench_config('tiny'), steps=1, warmup=0, peak_flops=1e11)
    assert r['limit_tokens_per_s'] * r['mfu'] == pytest.approx(r['tokens_per_s'])
    assert 'limit' in bench_report(r)


# ---- speculative Jacobi decoding draws what plain sampling draws, in fewer passes

def _exact_images(prior, text, temperature=1.0, top_k=None, guidance=1.0):
    "Every image of a tiny prior with its probability: the product of the filtered conditionals, teacher-forced."
    import itertools
    from dalle_course.sampling import Guidance, filter_logits
    cfg, out = Guidance(prior, text, guidance), {}
    imgs = torch.tensor(list(itertools.product(range(prior.image_vocab), repeat=prior.n_img)))
    with torch.no_grad():
        logits = prior(cfg.rows.repeat(len(imgs), 1) if not cfg.on else torch.cat([text.repeat(len(imgs), 1), prior.null_text(len(imgs))]),
                       cfg.both(imgs))['image_logits']
        P = filter_logits(cfg.logits(logits), temperature, top_k).softmax(-1)  # (n, N, K)
        p = P.gather(-1, imgs[..., None])[..., 0].prod(-1)
    return {tuple(i): float(v) for i, v in zip(imgs.tolist(), p)}


def _tv(tokens, exact):
    counts = {}
    for r in tokens.reshape(len(tokens), -1).tolist(): counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    return 0.5 * sum(abs(counts.get(k, 0) / len(tokens) - v) for k, v in exact.items())


@pytest.mark.parametrize('kw', [dict(), dict(temperature=1.5, top_k=2, guidance=1.5)], ids=['plain', 'filtered-guided'])
def test_jacobi_draws_what_sample_draws(kw):
    torch.manual_seed(0)
    prior = JointPrior(10, 3, 3, 2, 2, dim=16, depth=2, n_heads=2).eval()
    with torch.no_grad():
        for p in prior.parameters(): p.mul_(1.5)  # conditionals far from uniform
    text = torch.randint(1, 10, (1, 3))
    exact = _exact_images(prior, text, **kw)
    assert max(exact.values()) < 0.5  # not one image: the test can tell distributions apart
    n, g = 6000, torch.Generator().manual_seed(1)
    plain = _tv(sample(prior, text.repeat(n, 1), generator=g, **kw), exact)
    for window in (2, 4):
        z, st = jacobi_sample(prior, text.repeat(n, 1), window=window, generator=g, **kw)
        assert _tv(z, exact) < max(0.04, 2 * plain), (window, _tv(z, exact), plain)
    one = torch.stack([jacobi_sample(prior, text, window=3, generator=g, **kw)[0] for _ in range(1500)])[:, 0]  # batch 1
    assert _tv(one, exact) < 0.08


def test_jacobi_saves_passes_at_batch_one_and_keeps_the_cache_straight():
    from dalle_course.pipeline import Pipeline
    pipe = Pipeline.from_run('demo_64', 'cpu')
    text = pipe.encode(['7 30 r up 2 20 w down 9 40 g middle'])
    s = pipe.sampling
    z, st = jacobi_sample(pipe.prior, text, window=16, temperature=s.temperature, top_k=s.top_k, guidance=s.guidance,
                          generator=torch.Generator().manual_seed(0))
    assert st['passes'] < pipe.prior.n_img / 2 and 0 < st['acceptance'] <= 1
    # every committed token is one the prior could draw given the ones before (teacher-forced, filtered): no stale cache
    from dalle_course.sampling import Guidance, filter_logits
    cfg = Guidance(pipe.prior, text, s.guidance)
    with torch.no_grad():
        logits = pipe.prior(cfg.rows, cfg.both(z.view(1, -1)))['image_logits']
    P = filter_logits(cfg.logits(logits), s.temperature, s.top_k).softmax(-1)[0]  # (N, K)
    assert (P.gather(-1, z.view(-1, 1)) > 0).all()
    with pytest.raises(InputError, match='window'): jacobi_sample(pipe.prior, text, window=0)
    with pytest.raises(InputError, match='pass the prior itself'): jacobi_sample(StaticDecoder(pipe.prior), text)
