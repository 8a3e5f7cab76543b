"""The attribute ruler (lesson 07) and the caption-following scores it feeds (lesson 25)."""
import json

import numpy as np
import pytest
import torch
from helpers import cli, one_line_error

from dalle_course.core import InputError
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


def test_retraining_the_shipped_64px_ruler_reads_as_well(tmp_path):
    """The recipe in data/README.md, run again: the ruler it makes reads the test split as well as the shipped one.
    (About 12 minutes on two CPU cores: the one long test of the suite.)"""
    write_mdmnist(tmp_path / 'train', n=20000, seed=0, size=64, split='train', show_progress=False)
    write_mdmnist(tmp_path / 'test', n=2000, seed=1, size=64, split='test', show_progress=False)
    torch.set_num_threads(max(1, min(2, __import__('os').cpu_count() or 1)))
    res = train_ruler('cnn', tmp_path / 'train', 'ruler', test=tmp_path / 'test')
    from dalle_course.mdmnist import MDMNIST
    shipped = attribute_accuracy(load_ruler(image_size=64).read(torch.stack([MDMNIST(tmp_path / 'test')[i]['image'] for i in range(2000)])),
                                 torch.from_numpy(MDMNIST(tmp_path / 'test').attributes))
    for f in FIELDS:
        assert abs(res['test'][f] - shipped[f]) <= (0.01 if f == 'value' else 0.005), (f, res['test'][f], shipped[f])
