"Stage 2 as a user runs it: presets, `train_prior`, `dalle-course train prior`, `sample` and `demo`."
import json, math

import numpy as np

import pytest
import torch
from helpers import StopAt, cli, one_line_error, write_splits
from torch.testing import assert_close

from dalle_course.core import MODELS, InputError, model_class
from dalle_course.image_tokenizer import PatchColourTokenizer
from dalle_course.pipeline import Pipeline, encode_prompts
from dalle_course.prior import JointPrior, SeparatePrior
from dalle_course.evaluation import teacher_forced_ce
from dalle_course.tokenizer_training import train_tokenizer
from dalle_course.prior_training import PRIOR_PRESETS, resolve_prior_recipe, train_prior
from dalle_course.runs import SamplingSettings
from dalle_course.text import AttributeTokenizer, WordTokenizer, fit_text_tokenizer

SMALL = {'model': {'dim': 32, 'depth': 1, 'enc_depth': 1, 'n_heads': 2}}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = write_splits(tmp_path_factory.mktemp('stage2'), 64, 16, 4)
    PatchColourTokenizer(image_size=64, patch=8, levels=4).save(root / 'patch.safetensors')  # an 8x8 grid, K = 64
    return root





# ---- presets (numbers typed from the thesis's Table 6, not from the module)
@pytest.mark.parametrize('arch', ['joint', 'separate'])
def test_thesis_preset_is_table6(arch):
    r = resolve_prior_recipe(arch, 'thesis-mdmnist', 10_000, 21, 12, 256, 32, 32)
    m, t = r['model'], r['train']
    # Table 6: 12 blocks, 8 heads, dropout 0.1, "Hidden dim. 512" = the MLP's inner width (Table 4); the model width
    # 256 is not in the table (the thesis's MD-MNIST code), so width x mlp_ratio must be 512, not the width.
    assert (m['depth'], m['n_heads'], m['dropout']) == (12, 8, 0.1)
    assert (m['dim'], m['dim'] * m['mlp_ratio']) == (256, 512)
    assert m.get('enc_depth') == (6 if arch == 'separate' else None)
    per_epoch = 10_000 // 12  # one epoch = the sampler's full batches
    assert (t['batch_size'], t['lr'], t['gamma'], t['lr_schedule']) == (12, 1e-3, 0.1, 'multistep')
    assert t['steps'] == 20 * per_epoch and t['milestones'] == [5 * per_epoch, 10 * per_epoch]
    # Table 6 has no caption dropout and no DALL-E 1/8-7/8 weighting: the image tokens' CE alone
    assert m['p_uncond'] == 0.0 and r['hparams'] == {'w_text': 0.0, 'w_img': 1.0}
    model = model_class('prior', arch)(**m)  # the recipe builds
    assert model.text_len == 12 and model.n_img == 1024
    assert model.config['mlp_ratio'] == 2 and model.p_uncond == 0.0


def test_our_presets_keep_what_they_add():
    "The non-thesis presets add DALL-E's loss weights and CFG caption dropout, and say so."
    for preset in ('tiny', 'gpu-mdmnist'):
        r = resolve_prior_recipe('joint', preset, 1000, 21, 12, 64, 8, 8)
        assert r['model']['p_uncond'] == 0.1 and r['hparams'] == {'w_text': 1 / 8, 'w_img': 7 / 8}


def test_steps_override_scales_milestones():
    r = resolve_prior_recipe('joint', 'thesis-mdmnist', 1200, 21, 12, 64, 8, 8, steps=100)
    assert r['train']['steps'] == 100 and r['train']['milestones'] == [25, 50]


@pytest.mark.parametrize('kw,msg', [(dict(arch='g1'), 'joint, separate'), (dict(preset='huge'), 'tiny'),
                                    (dict(n_train=0), 'empty')])
def test_bad_recipes(kw, msg):
    args = dict(arch='joint', preset='tiny', n_train=10, text_vocab=21, text_len=12, image_vocab=64, h=8, w=8) | kw
    with pytest.raises(InputError, match=msg): resolve_prior_recipe(**args)


def test_every_preset_builds_both_archs():
    for preset in PRIOR_PRESETS:
        for arch in PRIOR_PRESETS[preset].get('archs', MODELS['prior']):  # Table 7's CUB presets are G2 only (test_cub)
            r = resolve_prior_recipe(arch, preset, 200, 21, 12, 64, 8, 8)
            model_class('prior', arch)(**r['model'])


def test_text_tokenizer_choice():
    tok, spec = fit_text_tokenizer({'kind': 'attributes'}, [['7 30 r up 2 20 w down 9 40 g middle'], ['1 20 b down 3 30 g up 5 40 w middle']])
    assert isinstance(tok, AttributeTokenizer) and spec['length'] == 12
    with pytest.raises(InputError, match='not an MD-MNIST description'):
        fit_text_tokenizer({'kind': 'attributes'}, [['a small red bird']])
    tok, spec = fit_text_tokenizer({'kind': 'words'}, [['a small red bird', 'this bird has black wings and a white belly']])
    assert isinstance(tok, WordTokenizer) and spec['length'] == 9
    L = spec['length']
    t = encode_prompts(tok, ['a red bird'], L)
    assert t.shape == (1, 9) and (t[0, 3:] == tok.pad_id).all()
    with pytest.raises(InputError, match='1 to 9'): encode_prompts(tok, ['bird ' * 10], L)
    with pytest.raises(InputError, match='no prompts'): encode_prompts(tok, [], L)


# ---- train_prior
def test_run_folder_is_self_contained_and_ce_reproduces(data, tmp_path):
    out = tmp_path / 'g1'
    res = train_prior('joint', data / 'patch.safetensors', data / 'train', out=out, test=data / 'test', steps=30,
                      batch_size=8, overrides=SMALL, n_sample_captions=2)
    names = {p.name for p in out.iterdir()}
    assert names >= {'recipe.json', 'tokens.safetensors', 'tokenizer.safetensors', 'text_tokenizer.json',
                     'checkpoint.safetensors', 'metrics.jsonl', 'metrics.png', 'prior.safetensors', 'eval.json',
                     'ce.png', 'samples.png'}
    ev = json.loads((out / 'eval.json').read_text())
    assert ev['n_test'] == 16 and ev['steps'] == 30 and ev['train_tokens_per_s'] > 0 and ev['sample_images_per_s'] > 0
    pipe = Pipeline.from_run(out, device='cpu')
    prior, itok, ttok = pipe.prior, pipe.tokenizer, pipe.text_tokenizer
    assert isinstance(prior, JointPrior) and isinstance(ttok, AttributeTokenizer) and itok.grid == (8, 8)
    ce = teacher_forced_ce(prior, res['test_tokens'])
    assert abs(float(ce.mean()) - ev['teacher_forced_ce']) < 1e-5
    # the cached test tokens are the tokenizer's codes of the test images
    from dalle_course.mdmnist import MDMNIST
    img = MDMNIST(data / 'test')[3]['image'][None]
    assert torch.equal(res['test_tokens'].tensors[1][3], itok.encode(img).reshape(-1))


def test_training_lowers_teacher_forced_ce(data, tmp_path):
    res = train_prior('separate', data / 'patch.safetensors', data / 'train', test=data / 'test', steps=80,
                      batch_size=16, overrides=SMALL, plots=False)
    fresh = SeparatePrior(**res['recipe']['model'])
    before = float(teacher_forced_ce(fresh, res['test_tokens']).mean())
    assert before > 0.8 * math.log(64)  # untrained: near a uniform guess
    assert res['eval']['teacher_forced_ce'] < 0.5 * before




@pytest.mark.parametrize('arch', ['joint', 'separate'])
def test_interrupted_then_resumed_equals_uninterrupted(arch, data, tmp_path):
    kw = dict(test=data / 'test', steps=20, batch_size=8, overrides=SMALL, plots=False)
    with pytest.raises(KeyboardInterrupt):
        train_prior(arch, data / 'patch.safetensors', data / 'train', out=tmp_path / 'a', callbacks=[StopAt(13)], **kw)
    a = train_prior(arch, data / 'patch.safetensors', data / 'train', out=tmp_path / 'a', resume=True, **kw)
    b = train_prior(arch, data / 'patch.safetensors', data / 'train', out=tmp_path / 'b', **kw)
    for (k, va), vb in zip(a['prior'].state_dict().items(), b['prior'].state_dict().values()):
        assert torch.equal(va, vb), k
    assert a['eval']['teacher_forced_ce'] == b['eval']['teacher_forced_ce']


def test_trained_tokenizer_run_feeds_a_prior(data, tmp_path):
    train_tokenizer('vqvae-ema', data / 'train', 'tiny', out=tmp_path / 'tok', test=data / 'test', steps=3, plots=False)
    res = train_prior('joint', tmp_path / 'tok', data / 'train', out=tmp_path / 'g1', test=data / 'test', steps=3,
                      batch_size=4, overrides=SMALL, plots=False)
    assert res['recipe']['model']['h'] == 16 and res['recipe']['model']['image_vocab'] == 64
    pipe = Pipeline.from_run(tmp_path / 'g1', device='cpu')
    prior, itok, ttok = pipe.prior, pipe.tokenizer, pipe.text_tokenizer
    imgs = Pipeline(prior, itok, ttok)(['7 30 r up 2 20 w down 9 40 g middle'], n=2, guidance=2.0, top_k=5).images
    assert imgs.shape == (2, 3, 64, 64) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1


# ---- the commands
@pytest.fixture(scope='module')
def prior_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('cli') / 'g2'
    p = cli('train', 'prior', '--arch', 'separate', '--tokenizer', data / 'patch.safetensors', '--data', data / 'train',
            '--test', data / 'test', '--steps', 4, '--batch-size', 8, '--out', out)
    assert p.returncode == 0, p.stderr
    assert 'teacher-forced CE' in p.stdout and 'tokens/s' in p.stdout
    return out


def test_cli_sample_prompt_and_prompts_file(prior_run, tmp_path):
    p = cli('sample', '--prior', prior_run, '--prompt', '7 30 r up 2 20 w down 9 40 g middle', '--n', 3,
            '--out', tmp_path / 'grid.png', '--top-k', 5, '--guidance', 3, '--temperature', 0.9)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'grid.png').stat().st_size > 1000 and 'images/s' in p.stdout
    f = tmp_path / 'prompts.txt'
    f.write_text('7 30 r up 2 20 w down 9 40 g middle\n\n1 20 b down 3 30 g up 5 40 w middle\n')
    p = cli('sample', '--prior', prior_run, '--prompts', f, '--n', 2, '--top-p', 0.9, '--out', tmp_path / 'g2.png')
    assert p.returncode == 0, p.stderr
    assert '4 images for 2 prompts' in p.stdout


def test_cli_sample_npz_holds_the_raw_images_and_prompts(prior_run, tmp_path):
    f = tmp_path / 'prompts.txt'
    f.write_text('7 30 r up 2 20 w down 9 40 g middle\n1 20 b down 3 30 g up 5 40 w middle\n')
    p = cli('sample', '--prior', prior_run, '--prompts', f, '--n', 3, '--top-k', 5, '--seed', 4, '--out', tmp_path / 's.npz')
    assert p.returncode == 0, p.stderr
    d = np.load(tmp_path / 's.npz')
    assert d['images'].shape == (6, 64, 64, 3) and d['images'].dtype == np.uint8
    assert list(d['prompts']) == ['7 30 r up 2 20 w down 9 40 g middle'] * 3 + ['1 20 b down 3 30 g up 5 40 w middle'] * 3
    assert json.loads(str(d['sampling']))['top_k'] == 5
    pipe = Pipeline.from_run(prior_run, device='cpu')  # the same images as the library draws
    prior, itok, ttok = pipe.prior, pipe.tokenizer, pipe.text_tokenizer
    ref = Pipeline(prior, itok, ttok)([l for l in f.read_text().splitlines()], n=3, seed=4, top_k=5).images
    assert np.array_equal(d['images'], (ref.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy())
    one_line_error(cli('sample', '--prior', prior_run, '--prompts', f, '--out', tmp_path / 's.npz'), '--overwrite')


def test_sampling_settings_are_recorded_and_used(data, tmp_path):
    from dalle_course.runs import Recipe
    out = tmp_path / 'g1'
    train_prior('joint', data / 'patch.safetensors', data / 'train', out=out, test=data / 'test', steps=2, batch_size=4,
                overrides={**SMALL, 'sampling': {'top_k': 7, 'guidance': 2.5}}, plots=False)
    rec = Recipe.load(out / 'recipe.json')
    assert rec.extra['sampling'] == {'temperature': 1.0, 'top_k': 7, 'top_p': None, 'guidance': 2.5}
    pipe = Pipeline.from_run(out)                      # the library's defaults < the run's settings < the caller's
    assert pipe.sampling == SamplingSettings(temperature=1.0, top_k=7, top_p=None, guidance=2.5)
    assert pipe.settings(guidance=1.0, top_k=None).guidance == 1.0 and pipe.settings(top_k=None).top_k == 7
    # the command without sampling options uses the run's settings: same images as top_k 7, guidance 2.5
    prompt = '7 30 r up 2 20 w down 9 40 g middle'
    for name, extra in [('a', ()), ('b', ('--top-k', 7, '--guidance', 2.5)), ('c', ('--guidance', 1))]:
        assert cli('sample', '--prior', out, '--prompt', prompt, '--n', 2, '--out', tmp_path / f'{name}.npz', *extra).returncode == 0
    a, b, c = (np.load(tmp_path / f'{n}.npz')['images'] for n in 'abc')
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize('prompt,words', [
    ('7 30 purple up 2 20 w down 9 40 g middle', ['purple', 'colour']),
    ('7 30 r up 2 20 w down', ['exactly 12 tokens']),
    ('', ['empty']),
    ('7 30 r up 2 20 w down 9 40 g middle 1', ['exactly 12 tokens'])])
def test_cli_bad_prompts_are_one_line(prior_run, tmp_path, prompt, words):
    out = tmp_path / 'grid.png'
    one_line_error(cli('sample', '--prior', prior_run, '--prompt', prompt, '--out', out), 'prompt 1', *words)
    assert not out.exists()


def test_cli_sample_errors(prior_run, data, tmp_path):
    out = tmp_path / 'g.png'
    one_line_error(cli('sample', '--prior', tmp_path, '--prompt', 'x', '--out', out), 'prior.safetensors')
    one_line_error(cli('sample', '--prior', prior_run, '--out', out), '--prompt')
    one_line_error(cli('sample', '--prior', prior_run, '--prompts', tmp_path / 'none.txt', '--out', out), 'none.txt')
    one_line_error(cli('sample', '--prior', prior_run, '--prompt', '7 30 r up 2 20 w down 9 40 g middle',
                        '--temperature', 0, '--out', out), 'temperature')
    one_line_error(cli('sample', '--prior', prior_run, '--prompt', '7 30 r up 2 20 w down 9 40 g middle',
                        '--out', tmp_path / 'grid.txt'), 'grid.png')
    assert not out.exists()


def test_cli_train_prior_errors(prior_run, data, tmp_path):
    out = tmp_path / 'run'
    base = ('train', 'prior', '--tokenizer', data / 'patch.safetensors', '--data', data / 'train', '--out', out)
    one_line_error(cli(*base, '--arch', 'g1'), '--arch')
    one_line_error(cli(*base, '--arch', 'joint', '--preset', 'huge'), '--preset')
    one_line_error(cli('train', 'prior', '--arch', 'joint', '--tokenizer', tmp_path / 'nothing', '--data', data / 'train',
                        '--out', out), 'no tokenizer')
    one_line_error(cli('train', 'prior', '--arch', 'joint', '--tokenizer', data / 'patch.safetensors', '--data',
                        data / 'big', '--out', out), '64 px')
    assert not out.exists()
    one_line_error(cli('train', 'prior', '--arch', 'separate', '--tokenizer', data / 'patch.safetensors', '--data',
                        data / 'train', '--out', prior_run), '--resume')
    one_line_error(cli('train', 'prior', '--arch', 'joint', '--tokenizer', data / 'patch.safetensors', '--data',
                        data / 'train', '--out', prior_run, '--resume'), '--arch separate')


def test_cli_help_lists_archs_presets_and_demo():
    p = cli('train', 'prior', '--help')
    assert p.returncode == 0 and all(w in p.stdout for w in ['joint', 'separate', *PRIOR_PRESETS])
    p = cli('sample', '--help')
    assert p.returncode == 0 and all(w in p.stdout for w in ['--guidance', '--top-k', '--top-p', '--prompts'])
    p = cli('demo', '--help')
    assert p.returncode == 0 and 'cpu' in p.stdout and 'gpu' in p.stdout


def test_cli_demo_refuses_a_used_folder_and_unknown_preset(tmp_path):
    (tmp_path / 'keep.txt').write_text('mine')
    one_line_error(cli('demo', '--out', tmp_path), 'did not write')
    one_line_error(cli('demo', '--out', tmp_path, '--overwrite'), 'did not write')  # never deleted, even so
    one_line_error(cli('demo', '--preset', 'huge', '--out', tmp_path / 'x'), '--preset')
    assert (tmp_path / 'keep.txt').read_text() == 'mine' and not (tmp_path / 'x').exists()


def test_demo_presets_resolve_to_buildable_recipes():
    "Without training: each demo preset's tokenizer and prior recipes resolve and build for its data size."
    from dalle_course.demo import DEMO_PRESETS
    from dalle_course.tokenizer_training import build_tokenizer, resolve_recipe
    for name, p in DEMO_PRESETS.items():
        tk, pr = p['tokenizer'], p['prior']
        rt = resolve_recipe(tk['kind'], tk['preset'], p['size'], p['n_train'], tk.get('steps'), tk.get('batch_size'),
                            overrides=tk.get('overrides'))
        tok = build_tokenizer(rt)
        h, w = tok.grid
        rp = resolve_prior_recipe(pr['arch'], pr['preset'], p['n_train'], 21, 12, tok.vocab_size, h, w, pr.get('steps'),
                                  pr.get('batch_size'), overrides=pr.get('overrides'))
        prior = model_class('prior', pr['arch'])(**rp['model'])
        text = torch.randint(1, 21, (1, 12)); z = torch.randint(0, tok.vocab_size, (1, h * w))
        with torch.no_grad(): out = prior(text, z)['image_logits']
        assert out.shape == (1, h * w, tok.vocab_size) and torch.isfinite(out).all(), name
