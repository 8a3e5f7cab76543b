"Stage 1 as a user runs it: presets, `train_tokenizer`, and `dalle-course train tokenizer`."
import json, math

import pytest
import torch
from helpers import StopAt, cli, one_line_error, write_splits

from dalle_course.core import InputError, load_checkpoint
from dalle_course.image_tokenizer import load_tokenizer
from dalle_course.mdmnist import MDMNIST
from dalle_course.tokenizer_training import KINDS, PRESETS, resolve_recipe, train_tokenizer


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp('stage1'), 96, 24, 8)



# ---- presets against the thesis tables (numbers typed from the thesis, not from the module)

def test_thesis_mdmnist_preset_is_table6():
    r = resolve_recipe('dvae-thesis', 'thesis-mdmnist', image_size=128, n_train=6400)
    per_epoch = 6400 // 32
    assert r['train']['steps'] == 30 * per_epoch and r['train']['batch_size'] == 32 and r['train']['lr'] == 0.01
    assert r['train']['lr_schedule'] == 'multistep' and r['train']['gamma'] == 0.1
    assert r['train']['milestones'] == [5 * per_epoch, 10 * per_epoch]
    m = r['model']
    # Table 6 gives no codebook size; 256 is the thesis's MD-MNIST code (512 is Table 5's, for CUB)
    assert (m['style'], m['vocab_size'], m['hidden'], m['n_down'], m['n_res_down'], m['n_res_bottleneck']) == \
        ('thesis', 256, 256, 2, 4, 4)
    tau, kl = r['hparams']['tau'], r['hparams']['kl_weight']
    assert (tau['kind'], tau['start'], tau['end'], tau['steps']) == ('linear', 5.0, 0.01, 3000)
    assert kl == {'kind': 'constant', 'v': 0.01}


@pytest.mark.parametrize('preset,size,epochs,batch,miles,tau,kl', [
    ('thesis-cub64', 64, 500, 64, (20, 120), (8.0, 0.01, 80000), (0.0, 0.001, 70000)),
    ('thesis-cub128', 128, 250, 16, (5, 100), (5.0, 0.01, 140000), (0.0, 0.001, 100000)),
])
def test_thesis_cub_presets_are_table7(preset, size, epochs, batch, miles, tau, kl):
    n = 11788 // 2                                      # about CUB's train split
    r = resolve_recipe('dvae-thesis', preset, image_size=size, n_train=n)
    per_epoch = n // batch  # one epoch = the sampler's full batches
    assert r['train']['steps'] == epochs * per_epoch and r['train']['lr'] == 0.001
    assert r['train']['milestones'] == [e * per_epoch for e in miles]
    assert (r['model']['hidden'], r['model']['n_res_down'], r['model']['n_res_bottleneck']) == (512, 6, 4)
    t, k = r['hparams']['tau'], r['hparams']['kl_weight']
    assert (t['start'], t['end'], t['steps']) == tau and (k['start'], k['end'], k['steps']) == kl


def test_steps_override_scales_ramps_and_milestones():
    full = resolve_recipe('dvae-thesis', 'thesis-mdmnist', image_size=128, n_train=3200)   # 3000 steps
    half = resolve_recipe('dvae-thesis', 'thesis-mdmnist', image_size=128, n_train=3200, steps=1500)
    assert full['train']['steps'] == 3000 and half['train']['steps'] == 1500
    assert half['hparams']['tau']['steps'] == full['hparams']['tau']['steps'] // 2
    assert half['train']['milestones'] == [m // 2 for m in full['train']['milestones']]


def test_vqvae_recipes_give_the_codebook_its_own_lr():
    assert resolve_recipe('vqvae', 'thesis-mdmnist', 128, 100)['codebook_lr_mult'] == 10.0   # 0.01 / 0.001
    r = resolve_recipe('vqvae-ema', 'thesis-mdmnist', 128, 100)
    assert r['model']['ema'] is True and r['model']['beta'] == 0.25 and r['model']['decay'] == 0.99


@pytest.mark.parametrize('kw,msg', [
    (dict(kind='dvae', preset='tiny', image_size=64), 'unknown tokenizer kind'),
    (dict(kind='dvae-dalle', preset='huge', image_size=64), 'unknown preset'),
    (dict(kind='dvae-dalle', preset='thesis-mdmnist', image_size=128), 'no settings for'),
    (dict(kind='dvae-thesis', preset='thesis-cub64', image_size=128), 'for 64x64 images'),
    (dict(kind='dvae-thesis', preset='tiny', image_size=66), 'not divisible'),
])
def test_bad_recipes(kw, msg):
    with pytest.raises(InputError, match=msg):
        resolve_recipe(**kw, n_train=10)


# ---- training

def _indep_mse(tok, folder):
    ds = MDMNIST(folder)
    x = torch.stack([ds[i]['image'] for i in range(len(ds))])
    return ((tok.decode(tok.encode(x)) - x) ** 2).mean().item()


@pytest.mark.parametrize('kind', KINDS)
def test_cli_trains_every_kind(kind, data, tmp_path):
    out = tmp_path / 'run'
    p = cli('train', 'tokenizer', '--kind', kind, '--data', data / 'train', '--test', data / 'test',
            '--preset', 'tiny', '--steps', 6, '--out', out)
    assert p.returncode == 0, p.stderr
    assert 'test MSE' in p.stdout and 'codebook usage' in p.stdout
    for f in ('recipe.json', 'checkpoint.safetensors', 'metrics.jsonl', 'metrics.png', 'tokenizer.safetensors',
              'eval.json', 'usage.png', 'codes.png', 'recon.png'):
        assert (out / f).is_file(), f
    tok = load_tokenizer(out)
    assert tok.kind == kind and tok.grid == (16, 16)
    ev = json.loads((out / 'eval.json').read_text())
    assert ev['steps'] == 6 and abs(ev['mse'] - _indep_mse(tok, data / 'test')) < 1e-5
    evals = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if '"eval"' in l]
    assert evals and all(0 < r['metrics']['usage'] <= 1 for r in evals)


def test_training_reduces_reconstruction_error(data):
    res = train_tokenizer('dvae-thesis', data / 'train', 'tiny', test=data / 'test', steps=40, eval_every=40)
    tok0 = resolve_recipe('dvae-thesis', 'tiny', 64, 96)
    from dalle_course.tokenizer_training import build_tokenizer
    torch.manual_seed(0)
    untrained = build_tokenizer(tok0).eval()
    assert res['test']['mse'] < 0.8 * _indep_mse(untrained, data / 'test')




@pytest.mark.parametrize('kind', ['dvae-dalle', 'vqvae-ema'])
def test_interrupted_then_resumed_equals_uninterrupted(kind, data, tmp_path):
    kw = dict(test=data / 'test', steps=20, eval_every=5, plots=False)
    a = train_tokenizer(kind, data / 'train', 'tiny', out=tmp_path / 'a', **kw)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(kind, data / 'train', 'tiny', out=tmp_path / 'b', callbacks=[StopAt(13)], **kw)
    assert load_checkpoint(tmp_path / 'b' / 'checkpoint.safetensors')['step'] == 12
    b = train_tokenizer(kind, data / 'train', 'tiny', out=tmp_path / 'b', resume=True, **kw)
    assert b['summary']['step'] == 20
    sa, sb = a['tokenizer'].state_dict(), b['tokenizer'].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a['test'] == b['test']


def test_resume_extends_a_finished_run(data, tmp_path):
    out = tmp_path / 'run'
    assert cli('train', 'tokenizer', '--kind', 'vqvae', '--data', data / 'train', '--steps', 4, '--out', out).returncode == 0
    p = cli('train', 'tokenizer', '--kind', 'vqvae', '--data', data / 'train', '--steps', 7, '--out', out, '--resume')
    assert p.returncode == 0, p.stderr
    assert json.loads((out / 'eval.json').read_text())['steps'] == 7
    steps = [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert max(steps) == 7 and steps == sorted(steps)




def test_cli_errors_are_one_line_and_write_nothing(data, tmp_path):
    out = tmp_path / 'run'
    base = ('train', 'tokenizer', '--data', data / 'train', '--out', out)
    one_line_error(cli(*base, '--kind', 'dvae'), '--kind', 'dvae-dalle')
    one_line_error(cli(*base, '--kind', 'dvae-dalle', '--preset', 'huge'), '--preset')
    one_line_error(cli(*base, '--kind', 'dvae-dalle', '--preset', 'thesis-mdmnist'), 'no settings for')
    one_line_error(cli('train', 'tokenizer', '--kind', 'dvae-thesis', '--data', data / 'big', '--preset',
                        'thesis-cub64', '--out', out), '64x64', '128x128')
    one_line_error(cli('train', 'tokenizer', '--kind', 'vqvae', '--data', tmp_path / 'missing', '--out', out),
                    'not an MD-MNIST folder')
    one_line_error(cli(*base, '--kind', 'vqvae', '--test', data / 'big'), 'test images')
    assert not out.exists()


def test_cli_refuses_to_overwrite_or_mix_runs(data, tmp_path):
    out = tmp_path / 'run'
    assert cli('train', 'tokenizer', '--kind', 'dvae-dalle', '--data', data / 'train', '--steps', 2, '--out', out).returncode == 0
    one_line_error(cli('train', 'tokenizer', '--kind', 'dvae-dalle', '--data', data / 'train', '--out', out), '--resume')
    one_line_error(cli('train', 'tokenizer', '--kind', 'vqvae', '--data', data / 'train', '--out', out, '--resume'),
                    '--kind dvae-dalle')


def test_help_lists_kinds_and_presets():
    p = cli('train', 'tokenizer', '--help')
    assert p.returncode == 0
    for word in list(KINDS) + list(PRESETS): assert word in p.stdout


def test_bench_tokenizers_cli(data, tmp_path):
    out = tmp_path / 'bench'
    p = cli('bench', 'tokenizers', '--data', data / 'train', '--test', data / 'test', '--steps', 3, '--out', out)
    assert p.returncode == 0, p.stderr
    table = (out / 'comparison.md').read_text().splitlines()
    assert len(table) == 2 + 8 and 'VQ-VAE plain' in table[5] and 'ruler: value' in table[0]
    res = json.loads((out / 'comparison.json').read_text())
    assert set(res) == {'dVAE DALL-E', 'dVAE thesis', 'dVAE thesis, no KL', 'VQ-VAE plain', 'VQ-VAE sep. LR',
                        'VQ-VAE EMA + tricks', 'VQ-VAE + rotation', 'FSQ'}
    assert all(0 <= r['test']['ruler']['value'] <= 1 and r['test']['ruler']['background'] >= 0 for r in res.values())
    assert all(r['summary']['step'] == 3 and 0 < r['test']['usage'] <= 1 for r in res.values())
    # each variant's run folder restores its tokenizer, and the plain VQ-VAE really has its tricks off
    plain = load_tokenizer(out / 'runs' / 'vq-vae-plain')
    assert plain.kind == 'vqvae' and plain.config['bn'] is False and plain.config['kmeans_init'] is False
    for f in ('usage.png', 'codes.png', 'recon.png'): assert (out / f).is_file()
    one_line_error(cli('bench', 'tokenizers', '--data', data / 'train', '--out', out), 'not empty')


@pytest.mark.parametrize('preset', [p for p in PRESETS if p != 'tiny'])
def test_every_full_size_preset_builds(preset):
    "The GPU/thesis presets are never trained in CI; at least their models build with the tables' sizes."
    from dalle_course.tokenizer_training import build_tokenizer
    for kind in PRESETS[preset]['kinds']:
        size = PRESETS[preset]['image_size']
        model = build_tokenizer(resolve_recipe(kind, preset, image_size=size, n_train=1000))
        assert model.kind == kind and model.grid == (size // 4, size // 4)
        assert model.vocab_size == (256 if preset == 'thesis-mdmnist' else 512)   # Table 6 vs Tables 5/7 and ours


@pytest.mark.parametrize('kind', KINDS)
def test_gpu_preset_computes_a_finite_loss(kind):
    from dalle_course.tokenizer_training import build_tokenizer, tokenizer_hparams, tokenizer_loss
    torch.manual_seed(0)
    r = resolve_recipe(kind, 'gpu-mdmnist', image_size=128, n_train=1000)
    model = build_tokenizer(r).train()
    hp = {k: s(0) for k, s in tokenizer_hparams(r).items()}
    loss, logs = tokenizer_loss(kind)(model, {'image': torch.rand(1, 3, 128, 128)}, hp)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
