"""The attribute ruler (lesson 07) and the caption-following scores it feeds (lesson 25)."""
import json
import math

import numpy as np
import pytest
import torch
from helpers import cli, one_line_error

from dalle_course.core import InputError, read_checkpoint_meta
from dalle_course.evaluation import (CHANCE, background_level, caption_following, digit_box_mask, failure_reasons,
                                     following_table, score_images, score_reconstructions)
from dalle_course.mdmnist import CANVAS_SIZES, FIELDS, POSITIONS, SIZES, digit_px, generate_mdmnist, slot_box, write_mdmnist
from dalle_course.ruler import (RULER_PRESETS, SHIPPED_RULERS, AttributeRuler, attribute_accuracy, jitter, load_ruler,
                                resolve_ruler_recipe, slot_strips, strip_half_width, train_ruler)

RULER_TARGET = 0.99  # issue 9: >= 99% per attribute type on the real test split, at 64 and 128 px


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _real(n, size, seed=11):
    d = generate_mdmnist(n, seed=seed, size=size, split='test')
    return torch.from_numpy(d['images']).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(d['attributes']), d


# ---- geometry
@pytest.mark.parametrize('S', CANVAS_SIZES)
def test_every_digit_box_lies_inside_its_strip_with_the_margin(S):
    h = strip_half_width(S)
    for slot in range(3):
        c = round((2 * slot + 1) * S / 6)
        for size in SIZES:
            px = digit_px(size, S)
            for pos in POSITIONS:
                top, left = slot_box(slot, pos, px, S)
                assert c - h + S // 32 <= left and left + px <= c + h - S // 32 + 1, (slot, size, pos)


def test_strips_hold_each_slots_own_pixels():
    x, a, _ = _real(4, 64)
    st = slot_strips(x)                                                     # (4, 3, 3, 64, 26)
    h = strip_half_width(64)
    for s in range(3):  # the ink of digit s (inside its box) is all inside strip s, none of it in the others
        c = round((2 * s + 1) * 64 / 6)
        only = torch.zeros_like(x); only[..., max(0, c - h):c + h] = x[..., max(0, c - h):c + h]
        assert torch.isclose(st[:, s].sum(), only.sum())
    assert torch.isclose(st.sum(), x.sum())                                  # every ink pixel in exactly one strip


def test_jitter_is_identity_at_zero_and_keeps_the_ink_near():
    x, _, _ = _real(3, 64)
    s = slot_strips(x).flatten(0, 1)
    torch.testing.assert_close(jitter(s, 0, 0, 0, 0, 0, 0, 0, 0, 0), s, atol=1e-5, rtol=0)
    j = jitter(s, generator=torch.Generator().manual_seed(0))
    assert j.shape == s.shape and float(j.min()) >= 0 and float(j.max()) <= 1
    k = jitter(s, haze=0, noise=0, generator=torch.Generator().manual_seed(1))   # geometric + gains only
    assert 0.4 < float(k.sum() / s.sum()) < 1.1
    assert not torch.allclose(j, s)


# ---- the network
def test_ruler_shapes_bad_sizes_and_round_trip(tmp_path):
    r = AttributeRuler(64, width=4, hidden=8)
    x = torch.rand(5, 3, 64, 64)
    assert r(x).shape == (5, 3, 20) and r.read(x).shape == (5, 3, 4) and r.read(x).dtype == torch.long
    with pytest.raises(InputError, match='64'): r(torch.rand(2, 3, 128, 128))
    with pytest.raises(InputError, match='32'): AttributeRuler(32)
    r.save(tmp_path / 'r.safetensors')
    r2 = load_ruler(tmp_path / 'r.safetensors')
    assert torch.equal(r2.read(x), r.read(x))
    with pytest.raises(InputError, match='128 px'): load_ruler(tmp_path / 'r.safetensors', image_size=128)
    with pytest.raises(InputError, match='no attribute classifier'): load_ruler(tmp_path / 'none.safetensors')
    big = AttributeRuler(128, width=4, hidden=8)                            # reads 128 px images average-pooled to 64
    big.load_state_dict(r.state_dict())
    x2 = torch.rand(2, 3, 128, 128)
    big.eval(); r.eval()
    torch.testing.assert_close(big(x2), r(torch.nn.functional.avg_pool2d(x2, 2)))


def test_attribute_accuracy_counts_per_type():
    a = torch.zeros(2, 3, 4, dtype=torch.long)
    b = a.clone(); b[0, 0, 0] = 1; b[1, 2, 2] = 3; b[1, 1, 2] = 2
    acc = attribute_accuracy(b, a)
    assert acc == {'value': 5 / 6, 'size': 1.0, 'colour': 4 / 6, 'position': 1.0}
    with pytest.raises(InputError): attribute_accuracy(a[:, :2], a[:, :2])


# ---- the shipped rulers: the course's measuring stick
@pytest.mark.parametrize('S', CANVAS_SIZES)
def test_shipped_ruler_reads_real_test_images(S):
    assert SHIPPED_RULERS[S].is_file(), SHIPPED_RULERS[S]
    r = load_ruler(image_size=S)
    x, a, _ = _real(600, S, seed=21)                                      # a fresh draw from the test digits
    acc = attribute_accuracy(r.read(x), a)
    for f in ('size', 'colour', 'position'): assert acc[f] >= RULER_TARGET, (f, acc)
    assert acc['value'] >= 0.96, acc  # a floor against regressions; the 99% target itself is the test below


@pytest.mark.xfail(strict=True, reason="issue 9 asks >= 99% value accuracy; the shipped rulers read about 97% of "
                   "the unseen test digits (4500 training digits, 10-20 px): a reported miss, see data/README.md")
@pytest.mark.parametrize('S', CANVAS_SIZES)
def test_shipped_ruler_meets_the_99_percent_value_target(S):
    x, a, _ = _real(600, S, seed=21)
    assert attribute_accuracy(load_ruler(image_size=S).read(x), a)['value'] >= RULER_TARGET


@pytest.mark.parametrize('change', ['haze 0.02', 'speckle 0.03', 'ink x0.7', 'blur'])
def test_shipped_ruler_reads_through_the_artefacts_of_model_outputs(change):
    "A haze of 1% of full ink once made a ruler call every digit size 40: model outputs always carry some."
    r = load_ruler(image_size=64)
    x, a, _ = _real(300, 64, seed=31)
    g = torch.Generator().manual_seed(0)
    y = {'haze 0.02': lambda: x + 0.02, 'speckle 0.03': lambda: x + 0.03 * torch.randn(x.shape, generator=g).abs(),
         'ink x0.7': lambda: x * 0.7, 'blur': lambda: torch.nn.functional.avg_pool2d(x, 3, 1, 1)}[change]().clamp(0, 1)
    acc = attribute_accuracy(r.read(y), a)
    assert min(acc['size'], acc['colour'], acc['position']) >= 0.97 and acc['value'] >= 0.85, acc


def test_ruler_is_not_fooled_by_planted_changes():
    "Colours rotated: colour accuracy falls to the share of white digits; digits of two slots swapped: bindings fail."
    r = load_ruler(image_size=64)
    x, a, _ = _real(300, 64)
    res = score_images(r, x[:, [1, 2, 0]], a)
    white = float((a[..., 2] == 0).float().mean())
    assert abs(res['colour'] - white) < 0.05 and res['size'] > 0.98
    flipped = score_images(r, x.flip(-1), a)                              # mirror: slots 0 and 2 exchange their digits
    assert flipped['binding'] < 0.2


# ---- caption-following scores
def test_caption_following_by_hand_and_chance():
    said = torch.tensor([[[7, 1, 1, 0], [2, 0, 2, 2], [9, 2, 3, 1]]] * 2)
    seen = said.clone(); seen[1, 0, 2], seen[1, 1, 2] = 2, 1               # a colour swap between two digits
    r = caption_following(said, seen)
    assert r['colour'] == pytest.approx(4 / 6) and r['binding'] == pytest.approx(4 / 6) and r['exact'] == 0.5
    assert r['reasons'][1] == ['slot 0 colour: said r, seen g', 'slot 1 colour: said g, seen r']
    assert CHANCE['value'] == 0.1 and CHANCE['binding'] == pytest.approx(1 / 360) and CHANCE['exact'] == pytest.approx(360 ** -3)
    with pytest.raises(InputError, match='shape'): caption_following(said[:, :2], seen[:, :2])
    with pytest.raises(InputError, match='at least one'): caption_following(said[:0], seen[:0])
    assert 'chance' in following_table({'x': r}) and '33.3%' in following_table({'x': r})


def test_failure_reasons_name_slot_field_and_tokens():
    said = np.array([[[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]]]); seen = said.copy(); seen[0, 2, 3] = 0
    assert failure_reasons(said, seen) == [['slot 2 position: said down, seen up']]


def test_background_level_is_zero_on_real_images_and_sees_haze():
    x, a, _ = _real(20, 64)
    assert background_level(x, a) == 0.0
    assert background_level((x + 0.05).clamp(0, 1), a) == pytest.approx(0.05, abs=1e-6)
    m = digit_box_mask(a, 64)
    assert bool((x.sum(1)[~m] == 0).all())                                  # no ink outside the boxes
    assert float(m.float().mean()) < 0.3


def test_score_reconstructions_of_an_identity_tokenizer_is_the_rulers_own():
    class Identity(torch.nn.Module):   # a 'tokenizer' whose tokens are the image: the ceiling is the ruler's accuracy
        def __init__(self): super().__init__(); self.p = torch.nn.Parameter(torch.zeros(1))
        def encode(self, x): return x
        def decode(self, z): return z
    from dalle_course.mdmnist import MDMNIST
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        write_mdmnist(pathlib.Path(d) / 't', n=40, seed=3, size=64, split='test', show_progress=False)
        ds = MDMNIST(pathlib.Path(d) / 't')
        res = score_reconstructions(Identity(), load_ruler(image_size=64), ds)
    assert all(res[f] == res['real'][f] for f in FIELDS) and res['background'] == 0 and res['n_images'] == 40


# ---- training: recipe, run folder, the command
def test_recipes_and_bad_kinds():
    r = resolve_ruler_recipe('cnn', 'ruler', 64, 20000)
    assert r.model['width'] == RULER_PRESETS['ruler']['model']['width'] and r.train['steps'] == RULER_PRESETS['ruler']['steps']
    with pytest.raises(InputError, match='kind'): resolve_ruler_recipe('mlp', 'ruler', 64, 10)
    with pytest.raises(InputError, match='preset'): resolve_ruler_recipe('cnn', 'huge', 64, 10)


def test_tiny_training_learns_and_writes_a_run_folder(tmp_path):
    write_mdmnist(tmp_path / 'train', n=400, seed=0, size=64, split='train', show_progress=False)
    write_mdmnist(tmp_path / 'test', n=100, seed=1, size=64, split='test', show_progress=False)
    res = train_ruler('cnn', tmp_path / 'train', 'tiny', out=tmp_path / 'run', test=tmp_path / 'test', steps=60)
    t = res['test']
    assert t['colour'] > 0.9 and t['size'] > 0.6 and t['n_images'] == 100   # far above chance after 60 steps
    ev = json.loads((tmp_path / 'run' / 'eval.json').read_text())
    assert ev['colour'] == t['colour'] and ev['steps'] == 60
    r = load_ruler(tmp_path / 'run', image_size=64)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(r.read(x), res['ruler'].read(x))                      # the saved ruler is the trained one
    p = cli('train', 'classifier', '--kind', 'cnn', '--data', tmp_path / 'train', '--test', tmp_path / 'test',
            '--steps', 3, '--out', tmp_path / 'run2')
    assert p.returncode == 0, p.stderr
    assert 'test accuracy' in p.stdout and (tmp_path / 'run2' / 'ruler.safetensors').is_file()
    one_line_error(cli('train', 'classifier', '--kind', 'cnn', '--data', tmp_path / 'train', '--steps', 3,
                       '--out', tmp_path / 'run2'), '--resume')
    one_line_error(cli('train', 'classifier', '--kind', 'mlp', '--data', tmp_path / 'train', '--out', tmp_path / 'x'), '--kind')
    one_line_error(cli('train', 'classifier', '--kind', 'cnn', '--data', tmp_path / 'nothing', '--out', tmp_path / 'x'), 'nothing')
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('S', CANVAS_SIZES)
def test_the_shipped_rulers_were_trained_with_the_ruler_preset(S):
    """Each shipped checkpoint records the recipe it was trained with: it must be what the `ruler` preset resolves to
    today, with the numbers data/README.md documents. A changed preset no longer makes the shipped rulers."""
    rec = read_checkpoint_meta(SHIPPED_RULERS[S])['config']['recipe']
    assert rec == resolve_ruler_recipe('cnn', 'ruler', S, 20000).to_dict()
    t = rec['train']
    assert (rec['kind'], rec['preset'], rec['n_train']) == ('cnn', 'ruler', 20000)
    assert rec['model'] == dict(image_size=S, width=24, hidden=128, dropout=0.2)
    assert (t['steps'], t['batch_size'], t['lr'], t['lr_schedule'], t['warmup'], t['seed']) == (3000, 64, 3e-3, 'warmup_cosine', 150, 0)
    assert rec['hparams']['jitter'] == {'kind': 'constant', 'v': 1.0}                   # jitter on for the whole run


SHORT_RUN = dict(steps=200, batch_size=32, overrides={'model': {'width': 8}})
# Floors for the short run, per attribute type, on clean test images and on the same images under a haze of 0.04.
# Measured (seeds 0-3, clean and hazy): value 0.52-0.55, size 0.91-0.96, colour >= 0.999, position 1.0; majority-class
# chance on this test split: 0.11, 0.34, 0.27, 0.35. Planted breakages that train but learn nothing (labels shuffled in
# the batch, field slices of the logits rotated, slots scrambled by the jitter's reshape, lr / 100, a warmup that never
# ends) read value <= 0.12; size and position labels swapped read both at 0.34; no jitter in training reads hazy sizes
# at 0.35, geometric jitter only hazy values at 0.18. Schedule slips that still learn (no warmup, the unscaled warmup of
# 150 steps, a cosine over the preset's 3000 steps) fail the LR check; jitter at test time fails the eval-vs-read check.
SHORT_RUN_FLOOR = {'value': 0.35, 'size': 0.8, 'colour': 0.95, 'position': 0.95}


def test_a_short_run_of_the_ruler_recipe_learns_every_attribute(tmp_path):
    """The `ruler` preset (its loss, jitter, AdamW, warmup + cosine LR, hidden width, dropout) for 200 steps of 32 on
    2000 images, with a trunk of width 8 instead of 24 (about 20 s; the full 3000-step run takes ~12 min on two cores,
    see data/README.md, and its recipe is pinned by the test above). A broken recipe fails here: the held-out reading
    stays near chance, the LR leaves the preset's shape, the learner's eval disagrees with `read`, or a haze well
    inside the jitter's range (0.04 of 0.08) throws the ruler."""
    write_mdmnist(tmp_path / 'train', n=2000, seed=0, size=64, split='train', show_progress=False)
    write_mdmnist(tmp_path / 'test', n=512, seed=1, size=64, split='test', show_progress=False)
    class Keep:                                                                  # the learner's settings, for its eval set
        def after_fit(self, learner, summary): self.cfg = learner.cfg
    keep = Keep()
    res = train_ruler('cnn', tmp_path / 'train', 'ruler', test=tmp_path / 'test', callbacks=(keep,), **SHORT_RUN)
    p, steps = RULER_PRESETS['ruler'], SHORT_RUN['steps']
    # the preset's recipe, shortened: only steps, batch and trunk width differ
    assert res.recipe.model == dict(image_size=64, **{**p['model'], 'width': 8})
    assert res.recipe.hparams['jitter'] == {'kind': 'constant', 'v': 1.0}
    # LR: linear 0 -> peak over the preset's warmup share of the run, half-cosine to 0 at the last step (update s uses lr(s))
    w = round(p['warmup'] * steps / p['steps'])
    lr = lambda s: p['lr'] * s / w if s < w else p['lr'] * 0.5 * (1 + math.cos(math.pi * (s - w) / (steps - w)))  # noqa: E731
    logged = [(r['step'], r['lr']) for r in res.records if r['split'] == 'train']
    assert len(logged) >= steps // 10 and logged[-1][0] == steps
    for step, got in logged: assert got == pytest.approx(lr(step - 1), rel=1e-6, abs=1e-12), (step, got, lr(step - 1))
    # held out: far above chance, on clean images and through a haze the photometric jitter covers
    from dalle_course.mdmnist import MDMNIST
    te = MDMNIST(tmp_path / 'test')
    x, a = torch.stack([te[i]['image'] for i in range(len(te))]), torch.from_numpy(te.attributes)
    chance = {f: float(torch.bincount(a[..., i].flatten()).max()) / a[..., i].numel() for i, f in enumerate(FIELDS)}
    r = res['ruler']
    clean, hazy = attribute_accuracy(r.read(x), a), attribute_accuracy(r.read((x + 0.04).clamp(0, 1)), a)
    assert {f: clean[f] for f in FIELDS} == {f: res['test'][f] for f in FIELDS}
    for f in FIELDS:
        assert SHORT_RUN_FLOOR[f] >= chance[f] + 0.2, (f, chance)                       # the floors mean something
        assert clean[f] >= SHORT_RUN_FLOOR[f], ('clean', f, clean, chance)
        assert hazy[f] >= SHORT_RUN_FLOOR[f], ('haze 0.04', f, hazy, chance)
    # reading is deterministic (no jitter, dropout or batch statistics at test time, even from train mode) and the
    # learner's eval, which runs the loss in eval mode on its fixed first test batches, counts what read() counts there
    first = r.read(x[:64]); r.train()
    assert torch.equal(r.read(x[:64]), first) and torch.equal(r.read(x[:64]), first) and r.training
    r.eval()
    ev = [rec for rec in res.records if rec['split'] == 'eval'][-1]
    n = min(len(te), keep.cfg.eval_batches * keep.cfg.batch_size)
    sub = attribute_accuracy(r.read(x[:n]), a[:n])
    assert ev['step'] == steps
    for f in FIELDS: assert ev['metrics'][f'acc_{f}'] == pytest.approx(sub[f], abs=1e-6), (f, ev['metrics'], sub)
