"Tests of dalle_course.mdmnist against independent references: geometry, pixels, determinism, files, Dataset."
import json, os, pickle, struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dalle_course.mdmnist as md
from dalle_course.core import InputError
from dalle_course.mdmnist import (CANVAS_SIZES, COLOURS, MDMNIST, POSITIONS, SIZES, VALUES, caption, colorize,
                                  generate_mdmnist, parse_caption, plot_attribute_histograms, slot_box, write_mdmnist)
from dalle_course.mnist import load_mnist

SHIPPED = Path(__file__).resolve().parent.parent / 'data' / 'mnist_5k.npz'
CHANNELS = {0: (0, 1, 2), 1: (0,), 2: (1,), 3: (2,)}  # colour index -> RGB channels: w, r, g, b


@pytest.fixture(scope='module')
def digits():
    with np.load(SHIPPED) as f: return f['images'], f['labels'].astype(np.int64)


def ref_box(slot, pos_i, p, S):
    "Top-left corner from the centres (2k+1)S/6 with exact fractions, rounding halves up."
    top = Fraction((2 * pos_i + 1) * S, 6) - Fraction(p, 2)
    left = Fraction((2 * slot + 1) * S, 6) - Fraction(p, 2)
    r = lambda v: int((v + Fraction(1, 2)).__floor__())
    return r(top), r(left)


def ref_resize(digit, p):
    x = torch.from_numpy(digit).float()[None, None]
    return F.interpolate(x, size=(p, p), mode='bilinear', antialias=True).round().clamp(0, 255).to(torch.uint8)[0, 0].numpy()


# ---- vocabulary and captions ----

def test_constants():
    assert [str(v) for v in VALUES] == [str(i) for i in range(10)] and SIZES == (20, 30, 40)
    assert COLOURS == ('w', 'r', 'g', 'b') and POSITIONS == ('up', 'middle', 'down') and CANVAS_SIZES == (64, 128)


def test_caption_thesis_example_and_round_trip():
    a = np.array([[7, 1, 1, 0], [2, 0, 0, 2], [9, 2, 2, 1]])
    assert caption(a) == '7 30 r up 2 20 w down 9 40 g middle'
    p = parse_caption('7 30 r up 2 20 w down 9 40 g middle')
    assert p.dtype == np.int64 and p.shape == (3, 4) and np.array_equal(p, a)
    rng = np.random.default_rng(1)
    for _ in range(300):
        a = np.stack([rng.integers(0, n, 3) for n in (10, 3, 4, 3)], -1)
        text = caption(a)
        words = text.split()
        assert len(words) == 12
        for slot in range(3):  # independent: order value, size, colour, position per slot
            assert words[4 * slot:4 * slot + 4] == [str(a[slot, 0]), str(SIZES[a[slot, 1]]), 'wrgb'[a[slot, 2]],
                                                     ['up', 'middle', 'down'][a[slot, 3]]]
        assert np.array_equal(parse_caption(text), a) and np.array_equal(parse_caption('  ' + text.replace(' ', '   ')), a)


@pytest.mark.parametrize('text,allowed', [('7 30 r up 2 20 w down 9 40 g', '12'), ('', '12'),
                                          ('7 30 r up 2 20 w down 9 40 g middle x', '12'),
                                          ('7 30 red up 2 20 w down 9 40 g middle', 'w r g b'),
                                          ('7 25 r up 2 20 w down 9 40 g middle', '20 30 40'),
                                          ('7 30 r top 2 20 w down 9 40 g middle', 'up middle down'),
                                          ('7 30 r up 12 20 w down 9 40 g middle', '0 1 2 3 4 5 6 7 8 9'),
                                          ('r 30 7 up 2 20 w down 9 40 g middle', '0 1 2')])
def test_parse_caption_errors(text, allowed):
    with pytest.raises(InputError) as e: parse_caption(text)
    assert allowed in str(e.value)


# ---- exercise functions (library versions) ----

def test_colorize():
    rng = np.random.default_rng(0)
    d = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    for ci, c in enumerate(COLOURS):
        out = colorize(d.copy(), c)
        assert out.shape == (6, 9, 3) and out.dtype == np.uint8
        for ch in range(3):
            assert np.array_equal(out[..., ch], d if ch in CHANNELS[ci] else np.zeros_like(d)), (c, ch)


def test_slot_box_against_fractions():
    for S in CANVAS_SIZES:
        for s in SIZES:
            p = s * S // 128
            for slot in range(3):
                for k, pos in enumerate(POSITIONS):
                    top, left = slot_box(slot, pos, p, S)
                    assert (top, left) == ref_box(slot, k, p, S)
                    assert 0 <= top and top + p <= S and slot * S / 3 <= left and left + p <= (slot + 1) * S / 3


def test_digit_px():
    assert [md.digit_px(s, 128) for s in SIZES] == [20, 30, 40] and [md.digit_px(s, 64) for s in SIZES] == [10, 15, 20]


# ---- generation ----

@pytest.mark.parametrize('S', CANVAS_SIZES)
def test_generate_pixels_match_attributes(S, digits):
    "Rebuild every image from its attributes and sources with independent code: exact equality."
    imgs, labels = digits
    d = generate_mdmnist(60, seed=11, size=S)
    x, a, s = d['images'], d['attributes'], d['sources']
    assert x.shape == (60, S, S, 3) and x.dtype == np.uint8
    assert a.shape == (60, 3, 4) and a.dtype == np.int64 and s.shape == (60, 3) and s.dtype == np.int64
    assert (a.min((0, 1)) >= 0).all() and (a.max((0, 1)) < [10, 3, 4, 3]).all()
    assert d['captions'] == [caption(r) for r in a] and isinstance(d['captions'][0], str)
    assert np.array_equal(labels[s], a[..., 0])  # each source digit has the described value
    for i in range(60):
        ref = np.zeros((S, S, 3), np.uint8)
        for slot in range(3):
            value, size_i, colour_i, pos_i = a[i, slot]
            p = round(SIZES[size_i] * S / 128)
            t, l = ref_box(slot, pos_i, p, S)
            for ch in CHANNELS[colour_i]: ref[t:t + p, l:l + p, ch] = ref_resize(imgs[s[i, slot]], p)
        assert np.array_equal(x[i], ref), i


def read_back(image, S):
    "(size, colour, position) per slot from the pixels alone."
    out = []
    for slot in range(3):
        col = image[:, slot * S // 3:(slot + 1) * S // 3].astype(int)
        chans = tuple(c for c in range(3) if col[..., c].max() > 0)
        colour = {(0, 1, 2): 0, (0,): 1, (1,): 2, (2,): 3}[chans]
        ys, xs = np.nonzero(col.max(-1) > 30)
        cy = (ys.min() + ys.max() + 1) / 2
        position = int(np.argmin([abs(cy - f * S) for f in (1 / 6, 1 / 2, 5 / 6)]))
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        size = int(np.argmin([abs(extent - 20 / 28 * s * S / 128) for s in (20, 30, 40)]))
        out.append((size, colour, position))
    return np.array(out)


@pytest.mark.parametrize('S', CANVAS_SIZES)
def test_attributes_readable_from_pixels(S):
    d = generate_mdmnist(300, seed=2, size=S, split='test')
    got = np.stack([read_back(im, S) for im in d['images']])
    acc = (got == d['attributes'][..., 1:]).mean((0, 1))
    assert acc[1] == 1.0 and acc[2] == 1.0 and acc[0] > 0.97, acc


def test_determinism_and_splits():
    a, b = generate_mdmnist(40, seed=5), generate_mdmnist(40, seed=5)
    assert a['images'].tobytes() == b['images'].tobytes() and a['captions'] == b['captions']
    assert np.array_equal(a['sources'], b['sources'])
    c = generate_mdmnist(40, seed=6)
    t = generate_mdmnist(40, seed=5, split='test')
    assert not np.array_equal(a['attributes'], c['attributes']) and not np.array_equal(a['attributes'], t['attributes'])
    assert a['images'].tobytes() != t['images'].tobytes()
    small = generate_mdmnist(40, seed=5, size=64)  # same draws, smaller canvas
    assert small['images'].shape == (40, 64, 64, 3) and small['captions'] == a['captions']
    assert np.array_equal(small['sources'], a['sources'])
    assert generate_mdmnist(10, seed=5)['captions'] == a['captions'][:10]  # a prefix of a longer run


def test_split_sources_disjoint():
    _, _, itr = load_mnist('train'); _, _, ite = load_mnist('test')
    tr = generate_mdmnist(2000, seed=0, size=64)['sources']
    te = generate_mdmnist(1000, seed=0, size=64, split='test')['sources']
    assert set(tr.ravel().tolist()) <= set(itr.tolist()) and set(te.ravel().tolist()) <= set(ite.tolist())
    assert set(tr.ravel().tolist()).isdisjoint(te.ravel().tolist())
    assert len(set(te.ravel().tolist())) > 400  # the test split really uses its many digits


def test_attributes_uniform():
    a = generate_mdmnist(6000, seed=0, size=64)['attributes']
    for f, n in enumerate((10, 3, 4, 3)):
        for slot in range(3):
            freq = np.bincount(a[:, slot, f], minlength=n) / 6000
            assert np.abs(freq - 1 / n).max() < 0.03, (f, slot)
    assert len({tuple(r.ravel()) for r in a}) > 5990  # independent slots: almost no repeated descriptions


@pytest.mark.parametrize('kw,word', [(dict(n=0), '--n'), (dict(n=-3), '--n'), (dict(n=2.5), '--n'), (dict(n=True), '--n'),
                                     (dict(n=5, size=96), '--size'), (dict(n=5, size=256), '--size'),
                                     (dict(n=5, split='valid'), '--split'), (dict(n=5, seed=-1), '--seed')])
def test_generate_bad_arguments(kw, word):
    with pytest.raises(InputError, match=word): generate_mdmnist(**kw)


def write_idx(path, arr):
    arr = np.asarray(arr, np.uint8)
    Path(path).write_bytes(bytes([0, 0, 8, arr.ndim]) + b''.join(struct.pack('>I', n) for n in arr.shape) + arr.tobytes())


def test_generate_from_idx_folder(tmp_path, digits):
    imgs, labels = digits
    tr, te = np.arange(0, 5000, 50), np.arange(7, 5000, 100)  # 100 and 50 digits, every class present
    write_idx(tmp_path / 'train-images-idx3-ubyte', imgs[tr]); write_idx(tmp_path / 'train-labels-idx1-ubyte', labels[tr])
    write_idx(tmp_path / 't10k-images-idx3-ubyte', imgs[te]); write_idx(tmp_path / 't10k-labels-idx1-ubyte', labels[te])
    d = generate_mdmnist(30, seed=1, size=64, split='test', mnist=tmp_path)
    assert d['sources'].min() >= 60000 and d['sources'].max() < 60050
    assert np.array_equal(labels[te][d['sources'] - 60000], d['attributes'][..., 0])
    with pytest.raises(InputError, match='--mnist'): generate_mdmnist(5, mnist=tmp_path / 'missing')


# ---- writing to disk ----

def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))


def test_write_layout_and_meta(tmp_path):
    stats = write_mdmnist(tmp_path / 'md', 37, seed=4, size=64, split='test', chunk=8, show_progress=False)
    out = tmp_path / 'md'
    assert listing(tmp_path) == ['md'] + [f'md/{f}' for f in sorted(['images.npy', 'captions.txt', 'attributes.npy',
                                                                      'sources.npy', 'meta.json'])]
    ref = generate_mdmnist(37, seed=4, size=64, split='test')
    x = np.load(out / 'images.npy')
    assert x.dtype == np.uint8 and x.shape == (37, 64, 64, 3) and np.array_equal(x, ref['images'])
    assert np.array_equal(np.load(out / 'attributes.npy'), ref['attributes']) and np.load(out / 'attributes.npy').dtype == np.int64
    assert np.array_equal(np.load(out / 'sources.npy'), ref['sources']) and np.load(out / 'sources.npy').dtype == np.int64
    lines = (out / 'captions.txt').read_text().split('\n')
    assert lines[-1] == '' and lines[:-1] == ref['captions']
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['n'] == 37 and meta['size'] == 64 and meta['seed'] == 4 and meta['split'] == 'test'
    assert 'mnist_5k.npz' in meta['mnist'] and meta['format'].startswith('dalle_course/mdmnist/')
    assert meta['sizes'] == [20, 30, 40] and meta['colours'] == ['w', 'r', 'g', 'b'] and meta['positions'] == ['up', 'middle', 'down']
    assert meta['values'] == [str(v) for v in range(10)] and meta['digit_px'] == [10, 15, 20]
    assert meta['fields'] == ['value', 'size', 'colour', 'position']
    assert stats['n'] == 37 and stats['out'] == str(out) and stats['seconds'] > 0
    assert stats['images_per_s'] == pytest.approx(37 / stats['seconds'])


def test_write_chunking_does_not_change_bytes(tmp_path):
    write_mdmnist(tmp_path / 'a', 50, seed=9, chunk=7, show_progress=False)
    write_mdmnist(tmp_path / 'b', 50, seed=9, chunk=2000, show_progress=False)
    assert (tmp_path / 'a' / 'images.npy').read_bytes() == (tmp_path / 'b' / 'images.npy').read_bytes()


@pytest.mark.parametrize('kw', [dict(n=0), dict(n=-1), dict(n=5, size=32), dict(n=5, split='val'),
                                dict(n=5, mnist='/nonexistent/mnist'), dict(n=5, chunk=0)])
def test_write_refuses_before_writing(tmp_path, kw):
    with pytest.raises(InputError): write_mdmnist(tmp_path / 'out' / 'md', **kw)
    assert listing(tmp_path) == []


def test_write_out_rules(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(InputError, match='file'): write_mdmnist(tmp_path / 'file', 5)
    (tmp_path / 'empty').mkdir()
    write_mdmnist(tmp_path / 'empty', 5, show_progress=False)  # an empty folder is fine
    assert len(np.load(tmp_path / 'empty' / 'images.npy')) == 5
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'notes.txt').write_text('precious')
    before = listing(tmp_path)
    # not an MD-MNIST folder: refused with or without --overwrite, and the message does not suggest it
    with pytest.raises(InputError, match='never replaced; choose another --out$'): write_mdmnist(tmp_path / 'mine', 5)
    with pytest.raises(InputError, match='never replaced'): write_mdmnist(tmp_path / 'mine', 5, overwrite=True)
    assert listing(tmp_path) == before and (tmp_path / 'mine' / 'notes.txt').read_text() == 'precious'


def test_overwrite_replaces_the_dataset_and_keeps_other_files(tmp_path):
    out = tmp_path / 'md'
    write_mdmnist(out, 30, seed=1, show_progress=False)
    (out / 'extra.txt').write_text('mine')
    with pytest.raises(InputError, match='overwrite'): write_mdmnist(out, 10, seed=2)
    assert len(np.load(out / 'images.npy')) == 30
    # every dataset file is replaced; a file the tool did not write is never deleted
    write_mdmnist(out, 10, seed=2, size=64, overwrite=True, show_progress=False)
    assert listing(tmp_path) == ['md'] + [f'md/{f}' for f in sorted(['images.npy', 'captions.txt', 'attributes.npy',
                                                                      'sources.npy', 'meta.json', 'extra.txt'])]
    assert np.load(out / 'images.npy').shape == (10, 64, 64, 3) and json.loads((out / 'meta.json').read_text())['seed'] == 2
    assert (out / 'extra.txt').read_text() == 'mine'


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / 'md'
    write_mdmnist(out, 12, seed=1, show_progress=False)
    old = {f: (out / f).read_bytes() for f in os.listdir(out)}
    calls = []
    real = md._render
    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt  # the user presses Ctrl-C after the first chunk
        return real(*args, **kwargs)
    monkeypatch.setattr(md, '_render', crash)
    with pytest.raises(KeyboardInterrupt): write_mdmnist(out, 20, seed=2, chunk=5, overwrite=True, show_progress=False)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == old and os.listdir(tmp_path) == ['md']
    # a failure after the user's file moved into the new folder (the last rename fails): it comes back
    (out / 'notes.txt').write_text('mine'); old['notes.txt'] = b'mine'
    monkeypatch.setattr(md, '_render', real)
    real_rename = os.rename
    def fail_swap(a, b):
        if Path(a).name.startswith('.md.partial-') and Path(b) == out: raise OSError('simulated failure of the swap')
        return real_rename(a, b)
    monkeypatch.setattr(md.os, 'rename', fail_swap)
    with pytest.raises(OSError, match='simulated'): write_mdmnist(out, 20, seed=2, chunk=5, overwrite=True, show_progress=False)
    monkeypatch.setattr(md.os, 'rename', real_rename)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == old and os.listdir(tmp_path) == ['md']
    monkeypatch.setattr(md, '_render', crash)
    calls.clear()
    with pytest.raises(KeyboardInterrupt): write_mdmnist(tmp_path / 'new', 20, chunk=5, show_progress=False)
    assert os.listdir(tmp_path) == ['md']


# ---- Dataset ----

def test_dataset(tmp_path):
    write_mdmnist(tmp_path / 'md', 24, seed=3, size=64, show_progress=False)
    ds = MDMNIST(tmp_path / 'md')
    raw = np.load(tmp_path / 'md' / 'images.npy')
    assert len(ds) == 24 and ds.size == 64 and ds.meta['n'] == 24 and len(ds.captions) == 24
    assert ds.attributes.shape == (24, 3, 4)
    for i in (0, 7, 23):
        it = ds[i]
        assert set(it) == {'image', 'attributes', 'caption', 'captions', 'index'} and it['index'] == i and it['captions'] == [it['caption']]
        assert it['image'].dtype == torch.float32 and it['image'].shape == (3, 64, 64)
        assert 0 <= it['image'].min() and it['image'].max() <= 1
        torch.testing.assert_close(it['image'], torch.from_numpy(raw[i]).permute(2, 0, 1).float() / 255)
        assert it['attributes'].dtype == torch.int64 and it['attributes'].shape == (3, 4)
        assert np.array_equal(parse_caption(it['caption']), it['attributes'].numpy())
    assert ds[-1]['index'] == 23
    with pytest.raises(IndexError): ds[24]
    it = ds[3]; it['image'][:] = 0  # items are private copies
    assert ds[3]['image'].max() > 0
    assert isinstance(ds.images, np.memmap) or isinstance(ds.images.base, np.memmap)
    assert len(pickle.dumps(ds)) < 20000
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False)))
    assert batch['image'].shape == (6, 3, 64, 64) and batch['attributes'].shape == (6, 3, 4) and len(batch['caption']) == 6
    assert batch['index'].tolist() == list(range(6))


def test_dataset_errors(tmp_path):
    with pytest.raises(InputError) as e: MDMNIST(tmp_path / 'nothing')
    assert 'images.npy' in str(e.value) and 'dalle-course data mdmnist' in str(e.value)
    write_mdmnist(tmp_path / 'md', 5, show_progress=False)
    (tmp_path / 'md' / 'captions.txt').unlink()
    with pytest.raises(InputError, match='md'): MDMNIST(tmp_path / 'md')
    write_mdmnist(tmp_path / 'md2', 5, show_progress=False)
    (tmp_path / 'md2' / 'captions.txt').write_text('1 20 w up 1 20 w up 1 20 w up\n')
    with pytest.raises(InputError): MDMNIST(tmp_path / 'md2')


def test_attribute_histograms():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    a = generate_mdmnist(500, seed=0, size=64)['attributes']
    fig = plot_attribute_histograms(a)
    assert len(fig.axes) == 4
    for f, (ax, n) in enumerate(zip(fig.axes, (10, 3, 4, 3))):
        heights = [p.get_height() for p in ax.patches]
        assert len(heights) == 3 * n
        for slot in range(3):
            assert heights[slot * n:(slot + 1) * n] == np.bincount(a[:, slot, f], minlength=n).tolist()
    plt.close(fig)


# ---- the compositional split (issue 10): held-out value-colour pairs
def test_holdout_pairs_never_appear_and_nothing_else_moves(tmp_path):
    plain = md.generate_mdmnist(3000, seed=4, size=64)
    held = md.generate_mdmnist(3000, seed=4, size=64, holdout='3r,7g')
    a, b = plain['attributes'], held['attributes']
    for v, c in ((3, 1), (7, 2)): assert not ((b[..., 0] == v) & (b[..., 2] == c)).any()
    assert ((a[..., 0] == 3) & (a[..., 2] == 1)).any()                          # the plain split does show red 3s
    assert np.array_equal(a[..., [0, 1, 3]], b[..., [0, 1, 3]]) and np.array_equal(plain['sources'], held['sources'])
    moved = (a != b).any(-1)                                                       # (n, 3) digits whose colour changed
    assert np.array_equal(moved, ((a[..., 0] == 3) & (a[..., 2] == 1)) | ((a[..., 0] == 7) & (a[..., 2] == 2)))
    threes = b[..., 2][b[..., 0] == 3]                                             # the other colours share a red 3's share
    assert np.bincount(threes, minlength=4)[1] == 0 and np.bincount(threes, minlength=4)[[0, 2, 3]].min() > 0.28 * len(threes)
    assert np.array_equal(md.generate_mdmnist(50, seed=4, size=64, holdout='')['images'], md.generate_mdmnist(50, seed=4, size=64)['images'])
    md.write_mdmnist(tmp_path / 'h', 200, seed=4, size=64, holdout='7g,3r', show_progress=False)
    meta = json.loads((tmp_path / 'h' / 'meta.json').read_text())
    assert meta['holdout'] == ['3r', '7g']
    assert np.array_equal(np.load(tmp_path / 'h' / 'attributes.npy'), md.generate_mdmnist(200, seed=4, size=64, holdout='3r,7g')['attributes'])
    md.write_mdmnist(tmp_path / 'p', 10, seed=4, size=64, show_progress=False)
    assert 'holdout' not in json.loads((tmp_path / 'p' / 'meta.json').read_text())   # old folders keep their fingerprints


@pytest.mark.parametrize('spec,words', [('3x', '3x'), ('33', 'value followed by a colour'), ('3w,3r,3g,3b', 'every colour')])
def test_bad_holdout_is_one_line(tmp_path, spec, words):
    from helpers import cli, one_line_error
    one_line_error(cli('data', 'mdmnist', '--n', 5, '--size', 64, '--holdout', spec, '--out', tmp_path / 'x'), words)
    assert not (tmp_path / 'x').exists()


def test_following_by_combination_scores_the_held_out_digits_apart():
    from dalle_course.evaluation import following_by_combination
    g = np.random.default_rng(0)
    said = np.stack([g.integers(0, k, (400, 3)) for k in (10, 3, 4, 3)], -1)
    seen = said.copy()
    unseen = (said[..., 0] == 3) & (said[..., 2] == 1)
    seen[..., 2][unseen] = 0                                                       # every red 3 drawn white
    r = following_by_combination(said, seen, ((3, 1),))
    assert r['unseen']['n_digits'] == unseen.sum() > 0 and r['unseen']['colour'] == 0.0 and r['unseen']['value'] == 1.0
    assert r['seen']['n_digits'] == 1200 - unseen.sum() and r['seen']['colour'] == r['seen']['binding'] == 1.0
