"""CUB-200-2011 with AttnGAN captions (lesson 33): the layout reader and its errors, the official split, the caption
drawn per step, the thesis's two preprocessing recipes, the text length from a percentile, the Table 5 and 7 presets
against numbers typed from the thesis, free-text CTRS, and every command on a fixture generated here."""
import json, shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_course.core import InputError
from dalle_course.cub import (CUB, LEXICON, ROLE, ctrs_text, fit_prompts, perturb_caption, read_cub, role_words,
                              square_pad, type1, type2, write_cub_fixture)
from dalle_course.datasets import all_captions, open_dataset, split_train_test, text_spec
from helpers import cli, one_line_error


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return write_cub_fixture(tmp_path_factory.mktemp('cub') / 'root', n_per_class=5, n_test_per_class=2, seed=1)


def _broken(root, tmp_path, how):
    bad = tmp_path / 'bad'; shutil.copytree(root, bad)
    cub, idx = bad / 'CUB_200_2011', read_cub(root)
    first = idx['paths'][0]
    if how == 'no CUB_200_2011': shutil.rmtree(cub)                       # only text/ left
    if how == 'empty CUB_200_2011': shutil.rmtree(cub); cub.mkdir()
    if how == 'no text folder': shutil.rmtree(bad / 'text')
    if how == 'no images.txt': (cub / 'images.txt').unlink()
    if how == 'bad images.txt line': (cub / 'images.txt').write_text('1 a/b.jpg\nx y\n')
    if how == 'duplicate image id': (cub / 'images.txt').write_text(f'1 {first}\n1 {first}\n')
    if how == 'no split file': (cub / 'train_test_split.txt').unlink()
    if how == 'bad split value': (cub / 'train_test_split.txt').write_text('1 1\n2 2\n')
    if how == 'split misses an image':
        lines = (cub / 'train_test_split.txt').read_text().splitlines(); (cub / 'train_test_split.txt').write_text('\n'.join(lines[:-1]))
    if how == 'bad box': (cub / 'bounding_boxes.txt').write_text('1 1 2 three 4\n')
    if how == 'box for an unknown image': (cub / 'bounding_boxes.txt').write_text('999 1 2 3 4\n')
    if how == 'two split lines for one image':
        (cub / 'train_test_split.txt').write_text('1 1\n1 0\n' + (cub / 'train_test_split.txt').read_text())
    if how == 'split incomplete and boxes missing':
        lines = (cub / 'train_test_split.txt').read_text().splitlines(); (cub / 'train_test_split.txt').write_text('\n'.join(lines[:-1]))
        (cub / 'bounding_boxes.txt').unlink()
    if how == 'nine captions':
        f = bad / 'text' / Path(idx['paths'][2]).with_suffix('.txt'); f.write_text('\n'.join(f.read_text().splitlines()[:9]))
    if how == 'no image file': (cub / 'images' / idx['paths'][3]).unlink()
    if how == 'no caption file': (bad / 'text' / Path(idx['paths'][4]).with_suffix('.txt')).unlink()
    if how == 'empty caption file': (bad / 'text' / Path(idx['paths'][4]).with_suffix('.txt')).write_text('\n\n')
    return bad, idx


BREAKAGES = {  # how -> words the one-line error must name
    'no CUB_200_2011': ['CUB_200_2011/images.txt', 'missing'], 'empty CUB_200_2011': ['CUB_200_2011/images.txt', 'missing'],
    'no text folder': ['text', 'missing', 'AttnGAN'], 'box for an unknown image': ['bounding_boxes.txt', 'line 1', '999'],
    'two split lines for one image': ['train_test_split.txt', 'line 2', 'second line'],
    'split incomplete and boxes missing': ['train_test_split.txt', 'no line for image'],
    'nine captions': ['.txt', 'has 9 captions', 'hold 10'],
    'no images.txt': ['images.txt', 'missing'], 'bad images.txt line': ['images.txt', 'line 2', "'x y'"],
    'duplicate image id': ['images.txt', 'line 2'], 'no split file': ['train_test_split.txt', 'missing'],
    'bad split value': ['train_test_split.txt', 'line 2'], 'split misses an image': ['train_test_split.txt', 'no line for image'],
    'bad box': ['bounding_boxes.txt', 'line 1'], 'no image file': ['.jpg', 'is missing', 'image 4'],
    'no caption file': ['.txt', 'is missing', 'captions of image 5'], 'empty caption file': ['.txt', 'has 0 captions'],
}


@pytest.mark.parametrize('how', list(BREAKAGES))
def test_a_broken_root_names_the_first_bad_file(root, tmp_path, how):
    bad, _ = _broken(root, tmp_path, how)
    with pytest.raises(InputError) as e: read_cub(bad)
    msg = str(e.value)
    assert '\n' not in msg
    for w in BREAKAGES[how]: assert w in msg, (w, msg)
    with pytest.raises(InputError) as e2: open_dataset(bad)  # the protocol's entry point says the same
    assert str(e2.value) == msg


def test_layout_split_and_captions(root):
    idx = read_cub(root)
    lines = dict(l.split() for l in (root / 'CUB_200_2011' / 'train_test_split.txt').read_text().split('\n') if l)
    assert idx['train'] == [lines[str(i)] == '1' for i in idx['ids']]
    tr, te = open_dataset(root), open_dataset(root).test_split()
    assert type(tr).__name__ == 'CUB' and (len(tr), len(te)) == (12, 8)
    names = lambda d: {d.index['paths'][k] for k in d.rows}  # noqa: E731
    assert not names(tr) & names(te) and len(names(tr) | names(te)) == 20
    for d in (tr, te):  # every item carries all ten captions of its own caption file
        for i in range(len(d)):
            f = root / 'text' / Path(d.index['paths'][d.rows[i]]).with_suffix('.txt')
            assert all_captions(d)[i] == f.read_text().strip().split('\n') and len(all_captions(d)[i]) == 10
    it = te[3]
    assert it['image'].shape == (3, 64, 64) and it['image'].dtype == torch.float32 and it['caption'] == it['captions'][0]
    assert it['class'] == te.index['paths'][te.rows[3]].split('/')[0]
    with pytest.raises(IndexError): tr[len(tr)]


def test_split_train_test_uses_the_official_split_and_the_stage(root):
    tr, te = split_train_test(root, None, 256, stage='tokenizer', size=128)
    assert (tr.split, te.split, tr.preprocessing, te.preprocessing, tr.size, te.size) == ('train', 'test', 'type1', 'type1', 128, 128)
    tr, te = split_train_test(root, None, 3, stage='prior', size=64)
    assert tr.preprocessing == 'type2' and len(te) == 3 and te.dataset.split == 'test'
    assert te.indices == [0, 4, 7]  # spread evenly over the 8 test images, first and last included


def test_the_prior_draws_one_of_the_ten_captions_each_read(root):
    from dalle_course.prior_training import CaptionTokens
    from dalle_course.text import fit_text_tokenizer
    ds = open_dataset(root)
    tok, spec = fit_text_tokenizer(text_spec(ds), all_captions(ds))
    caps = all_captions(ds)
    z = torch.zeros(len(ds), 4, dtype=torch.long)
    data = CaptionTokens(tok, spec['length'], z, caps)
    torch.manual_seed(0)
    want = {tuple(tok.encode_batch([c], length=spec['length'], truncate=True)[0].tolist()): k for k, c in enumerate(caps[2])}
    seen = Counter(want[tuple(data[2][0].tolist())] for _ in range(2000))
    assert set(seen) == set(range(10)) and max(seen.values()) < 2.0 * min(seen.values())  # all ten, about equally


def test_square_pad_against_a_brute_force_copy():
    for w, h in [(9, 4), (4, 9), (8, 5), (6, 6)]:
        a = np.random.default_rng(w * h).integers(1, 256, (h, w, 3), dtype=np.uint8)
        out = np.asarray(square_pad(Image.fromarray(a)))
        s = max(w, h); ref = np.zeros((s, s, 3), np.uint8)
        ref[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = a
        assert np.array_equal(out, ref)


def _photo(w=120, h=80, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_type2_test_split_is_pad_resize_centre_crop_and_type1_resize_centre_crop():
    im = _photo()
    ref2 = Image.fromarray(np.asarray(square_pad(im))).resize((84, 84), Image.BILINEAR).crop((10, 10, 74, 74))
    assert np.array_equal(np.asarray(type2(im, 64, train=False)), np.asarray(ref2))
    ref1 = im.resize((74, 74), Image.BILINEAR).crop((5, 5, 69, 69))
    assert np.array_equal(np.asarray(type1(im, 64, train=False)), np.asarray(ref1))
    big = np.asarray(type2(_photo(60, 30), 64, train=False))  # a wide photo: black bars top and bottom, none at the sides
    assert big[:8].max() == 0 and big[-8:].max() == 0 and (big[32] > 0).any(-1).all()


def test_the_random_steps_draw_what_the_thesis_says(monkeypatch):
    import dalle_course.cub as cub
    angles, crops, flips = [], [], 0
    rotate, crop = cub._rotate, Image.Image.crop
    sizes = []  # what each rotation sees: type 1 rotates the (N+10)^2 resize, type 2 the padded square photo
    monkeypatch.setattr(cub, '_rotate', lambda img, deg: (angles.append(deg), sizes.append(img.size), rotate(img, deg))[2])
    monkeypatch.setattr(Image.Image, 'crop', lambda self, box: (crops.append(box[:2]), crop(self, box))[1])
    g = torch.Generator().manual_seed(0)
    im = _photo()
    n = 600
    for _ in range(n): type1(im, 16, generator=g)
    assert len(angles) == n and max(abs(a) for a in angles) <= 2 and min(angles) < -1.8 and max(angles) > 1.8
    xs = Counter(x for x, _ in crops); ys = Counter(y for _, y in crops)
    assert set(xs) == set(ys) == set(range(11))  # (N+10) -> N random crop: offsets 0..10
    assert set(sizes) == {(26, 26)}              # rotated after the resize, before the crop
    angles.clear(); crops.clear(); sizes.clear()
    for _ in range(n): type2(im, 16, generator=g)
    assert set(crops) == {(10, 10)} and len(angles) == n  # type 2: centre crop after the rotation
    assert set(sizes) == {(120, 120)}            # rotated after the square padding, before the resize
    # flips: a photo and its mirror come out equally often
    a = np.asarray(type2(im, 16, train=False))
    for _ in range(400):
        out = np.asarray(cub.type2(im, 16, train=True, generator=g))
        flips += int(np.abs(out.astype(int) - a[:, ::-1]).mean() < np.abs(out.astype(int) - a).mean())
    assert 150 < flips < 250


def test_training_reads_vary_and_test_reads_do_not(root):
    tr, te = split_train_test(root, None, 256, stage='prior', size=32)
    torch.manual_seed(0)
    assert not torch.equal(tr[0]['image'], tr[0]['image']) and torch.equal(te[0]['image'], te[0]['image'])


def test_text_length_from_the_99th_percentile():
    from dalle_course.text import fit_text_tokenizer, length_at_percentile
    caps = [[' '.join(['w'] * k)] for k in [3] * 150 + [4] * 48 + [20, 30]]  # 200 captions: 99% have <= 4 words
    tok, spec = fit_text_tokenizer({'kind': 'words', 'percentile': 99}, caps)
    assert spec['length'] == 4
    assert fit_text_tokenizer({'kind': 'words'}, caps)[1]['length'] == 30              # without: the longest
    assert fit_text_tokenizer({'kind': 'words', 'percentile': 100}, caps)[1]['length'] == 30
    assert [length_at_percentile(range(1, 101), p) for p in (1, 50, 99, 100)] == [1, 50, 99, 100]
    with pytest.raises(InputError): length_at_percentile([1], 0)
    long = tok.encode_batch([caps[-1][0]], length=4, truncate=True)
    assert long.tolist() == [tok.encode(caps[-1][0])[:4]]
    with pytest.raises(InputError): tok.encode_batch([caps[-1][0]], length=4)
    # BPE with dropout: the lengths are measured as training reads them, so the percentile is not below dropout-free
    birds = [["this bird has a red crown and black wings"], ["a small bird with a pointed bill"]] * 50
    _, b0 = fit_text_tokenizer({'kind': 'bpe', 'vocab_size': 60, 'dropout': 0.0, 'percentile': 99}, birds)
    _, b1 = fit_text_tokenizer({'kind': 'bpe', 'vocab_size': 60, 'dropout': 0.5, 'percentile': 99}, birds)
    assert b1['length'] > b0['length']


def test_fit_prompts_cuts_to_what_the_prior_reads(root):
    from dalle_course.text import WordTokenizer
    tok = WordTokenizer.fit(["a b c d e", "a b"])
    assert fit_prompts(tok, ["a b c d e", "a b"], 3) == ["a b c", "a b"]


# ---- presets, against numbers typed from the thesis's Tables 5 and 7 ----
TABLE5 = {  # column: epochs, batch, lr, LR vocabulary, gamma, milestones, vocab, tau start/end/iters, KL start/end/iters, beta, EMA, NRD, NRB, hidden
    'thesis-t5-dvae': (150, 16, 0.001, None, 0.1, (5, 100), 512, (5, 0.01, 80000), (0, 0, None), None, None, 6, 4, 512, 128),
    'thesis-t5-dvae-growing-kl': (150, 16, 0.001, None, 0.1, (5, 100), 512, (5, 0.01, 80000), (0, 0.001, 70000), None, None, 6, 4, 512, 128),
    'thesis-t5-vqvae': (150, 16, 0.001, 0.001, 0.1, (5, 100), 512, None, None, 0.25, 0.99, 6, 4, 512, 128),
    'thesis-t5-vqvae-sep-vocab': (150, 16, 0.001, 0.01, 0.1, (5, 100), 512, None, None, 0.25, 0.99, 6, 4, 512, 128),
    'thesis-t5-dvae-64': (500, 64, 0.001, None, 0.1, (20, 120), 512, (8, 0.01, 80000), (0, 0.0001, 70000), None, None, 6, 4, 512, 64),
}


@pytest.mark.parametrize('preset', list(TABLE5))
def test_table5_tokenizer_presets(preset):
    from dalle_course.tokenizer_training import PRESETS, resolve_recipe
    ep, bs, lr, lr_vocab, gamma, ms, K, tau, kl, beta, ema, nrd, nrb, hidden, S = TABLE5[preset]
    p = PRESETS[preset]
    assert (p['epochs'], p['batch_size'], p['lr'], p['gamma'], tuple(p['milestone_epochs']), p['image_size']) == (ep, bs, lr, gamma, ms, S)
    assert p['net'] == dict(vocab_size=K, hidden=hidden, n_down=2, n_res_down=nrd, n_res_bottleneck=nrb)
    n = 5994  # CUB's training photos: one epoch is n // batch steps
    kinds = ('vqvae', 'vqvae-ema') if beta else ('dvae-thesis',)
    assert tuple(p['kinds']) == kinds
    for kind in kinds:
        r = resolve_recipe(kind, preset, S, n)
        per = n // bs
        assert r.train['steps'] == ep * per and r.train['lr'] == lr and r.train['batch_size'] == bs
        assert r.train['milestones'] == [m * per for m in ms]
        if beta:
            assert r.model['beta'] == beta and r.model['decay'] == ema
            assert r['codebook_lr_mult'] == (1.0 if kind == 'vqvae-ema' else lr_vocab / lr)
        else:
            t, k = r.hparams['tau'], r.hparams['kl_weight']
            assert (t['start'], t['end'], t['steps']) == tau
            assert (k.get('start', k.get('v')), k.get('end', k.get('v'))) == kl[:2]
            if kl[2]: assert k['steps'] == kl[2]
    with pytest.raises(InputError): resolve_recipe('dvae-dalle', preset, S, n)


TABLE7 = {  # column: epochs, batch, lr, gamma, milestones, image blocks, text blocks, heads, dropout, hidden
    'thesis-cub64': (1000, 120, 0.001, 0.1, (100, 500), 14, 8, 8, 0.1, 512, 16),
    'thesis-cub128': (400, 32, 0.001, 0.1, (20,), 12, 16, 8, 0.1, 512, 32),
}


@pytest.mark.parametrize('preset', list(TABLE7))
def test_table7_prior_presets(preset):
    from dalle_course.prior_training import PRIOR_PRESETS, resolve_prior_recipe
    ep, bs, lr, gamma, ms, depth, enc, heads, drop, hidden, grid = TABLE7[preset]
    n = 5994
    r = resolve_prior_recipe('separate', preset, n, 3000, 18, 512, grid, grid)
    per = n // bs
    assert (r.train['steps'], r.train['batch_size'], r.train['lr']) == (ep * per, bs, lr)
    assert r.train['milestones'] == [m * per for m in ms] and r.train['gamma'] == gamma
    m = r.model
    assert (m['depth'], m['enc_depth'], m['n_heads'], m['dropout'], m['dim'] * m['mlp_ratio']) == (depth, enc, heads, drop, hidden)
    assert m['dim'] == 512  # not in Table 7: Table 6's rule, the width is the image vocabulary (512 codes, Tables 5 and 7)
    assert m['p_uncond'] == 0.0 and r.hparams == {'w_text': 0.0, 'w_img': 1.0}
    for arch in ('joint', 'paella', 'maskgit'):
        with pytest.raises(InputError, match='--arch separate'): resolve_prior_recipe(arch, preset, n, 3000, 18, 512, grid, grid)


def test_table7_tokenizer_presets_stay_typed():
    from dalle_course.tokenizer_training import PRESETS, resolve_recipe
    for preset, (ep, bs, ms, tau, kl, S) in {'thesis-cub64': (500, 64, (20, 120), (8, 0.01, 80000), (0, 0.001, 70000), 64),
                                             'thesis-cub128': (250, 16, (5, 100), (5, 0.01, 140000), (0, 0.001, 100000), 128)}.items():
        r = resolve_recipe('dvae-thesis', preset, S, 5994)
        assert r.train['steps'] == ep * (5994 // bs) and r.train['milestones'] == [m * (5994 // bs) for m in ms]
        t, k = r.hparams['tau'], r.hparams['kl_weight']
        assert (t['start'], t['end'], t['steps']) == tau and (k['start'], k['end'], k['steps']) == kl


# ---- CTRS for free text ----
CAPTIONS = ["this bird has a red crown, a white belly and brown wings.", "An orange bill and a grey nape.",
            "a small bird with long black legs and a pointed bill."]


def test_perturb_caption_changes_m_words_within_their_roles():
    for c in CAPTIONS:
        slots = role_words(c)
        for m in range(len(slots) + 1):
            for seed in range(20):
                out = perturb_caption(c, m, np.random.default_rng(seed))
                new = role_words(out)
                assert [r for _, _, r in new] == [r for _, _, r in slots]                      # same roles, same places
                diff = [(c[a:b].lower(), out[x:y].lower()) for (a, b, _), (x, y, _) in zip(slots, new) if c[a:b].lower() != out[x:y].lower()]
                assert len(diff) == m                                                           # m distinct changes
                assert not any({u, v} <= s for u, v in diff for s in [{'grey', 'gray'}, {'bill', 'beak'}, {'small', 'tiny'}])
                # outside the changed words (and a/an) nothing moves
                strip = lambda s: [w for w in s.replace(',', ' ,').replace('.', ' .').split() if w.lower() not in ('a', 'an') and w.lower() not in ROLE]  # noqa: E731
                assert strip(out) == strip(c)
    rng = np.random.default_rng(3)
    outs = {perturb_caption("An orange bill.", 1, rng) for _ in range(60)}
    assert all(o.split()[0] == ('An' if o.split()[1][0] in 'aeiou' else 'A') for o in outs)   # the article follows
    assert any(o.startswith('A ') for o in outs) and all(o.endswith('.') for o in outs)
    with pytest.raises(InputError, match='fewer than m'): perturb_caption("a bird.", 1, rng)


def test_ctrs_text_with_known_answer_scorers():
    caps = ["a red bird with black wings.", "a blue bird with grey wings."]
    imgs = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4).clone()
    shown = {0: {'red', 'black', 'wings', 'bird'}, 1: {'blue', 'grey', 'wings', 'bird'}}
    def score(images, texts):  # counts the words of the text that image shows
        return torch.tensor([float(sum(w.strip('.') in shown[int(x[0, 0, 0])] for w in t.split())) for x, t in zip(images, texts)])
    r = ctrs_text(score, imgs, caps, max_m=3, seed=0)
    assert r['true_first'] == 1.0 and r['counts'] == [2, 0, 0, 0] and r['beats'][1:] == [1.0, 1.0, 1.0]
    assert r['n_with_m'] == [2, 2, 2, 2] and r['scores'].shape == (2, 4)
    inverse = ctrs_text(lambda i, t: -score(i, t), imgs, caps, max_m=3, seed=0)  # a scorer that prefers wrong captions
    assert inverse['true_first'] == 0.0 and inverse['beats'][1:] == [0.0, 0.0, 0.0]
    short = ctrs_text(score, imgs, ["a red bird.", "a blue bird with grey wings."], max_m=3)
    assert short['n_with_m'] == [2, 2, 1, 1] and torch.isinf(short['scores'][0, 2:]).all()
    with pytest.raises(InputError): ctrs_text(score, imgs, caps[:1])


def test_ctrs_text_splits_ties_constant_and_two_valued_scorers():
    caps = ["a red bird with black wings.", "a blue bird with grey wings."]      # three changeable words each
    imgs = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4).clone()
    const = lambda i, t: torch.zeros(len(t))                                    # noqa: E731
    flat = ctrs_text(const, imgs, caps, max_m=3)                               # four captions tie: a quarter each, chance
    assert flat['true_first'] == 0.25 and flat['counts'] == [0.5] * 4 and flat['beats'][1:] == [0.5] * 3
    assert flat['ties'] == 1.0 and flat['beats_ties'][1:] == [1.0] * 3
    short = ctrs_text(const, imgs, ["a red bird.", caps[1]], max_m=3)          # one changeable word: two captions tie
    assert short['counts'] == [0.75, 0.75, 0.25, 0.25] and short['true_first'] == 0.375   # absent versions never tie
    assert short['beats'][1:] == [0.5] * 3 and short['n_with_m'] == [2, 2, 1, 1]
    roles = lambda s: [s[a:b].lower() for a, b, _ in role_words(s)]             # noqa: E731
    def two(images, texts):  # 1 when at most one lexicon word differs from the image's caption, else 0
        return torch.tensor([float(sum(a != b for a, b in zip(roles(t), roles(caps[int(x[0, 0, 0])]))) <= 1)
                             for x, t in zip(images, texts)])
    r = ctrs_text(two, imgs, caps, max_m=3)
    # by hand: the true caption and the one with one change tie at the top (1/2 each); two and three changes score 0
    assert r['counts'] == [1.0, 1.0, 0.0, 0.0] and r['true_first'] == 0.5 and r['beats'][1:] == [0.5, 1.0, 1.0]
    assert r['ties'] == 1.0 and r['beats_ties'][1:] == [1.0, 0.0, 0.0]


# ---- the commands, on the fixture, as typed ----
def test_the_commands_on_the_fixture(tmp_path):
    r = tmp_path / 'cub'
    p = cli('data', 'cub-fixture', '--out', r)  # the README's commands, as typed (6 photos per class)
    assert p.returncode == 0, p.stderr
    assert 'CUB-200 fixture of 24 images (16 train) in 4 classes' in p.stdout
    one_line_error(cli('data', 'cub-fixture', '--out', r), 'not empty')
    p = cli('train', 'tokenizer', '--data', r, '--kind', 'dvae-thesis', '--steps', 8, '--out', tmp_path / 'tok')
    assert p.returncode == 0, p.stderr
    p = cli('train', 'prior', '--data', r, '--arch', 'separate', '--tokenizer', tmp_path / 'tok', '--steps', 8, '--out', tmp_path / 'prior')
    assert p.returncode == 0, p.stderr
    recipe = json.loads((tmp_path / 'prior' / 'recipe.json').read_text())
    assert recipe['extra']['text']['kind'] == 'words' and recipe['extra']['text']['percentile'] == 99
    p = cli('train', 'clip', '--data', r, '--kind', 'vit', '--tokenizer', tmp_path / 'tok', '--steps', 8, '--out', tmp_path / 'clip')
    assert p.returncode == 0, p.stderr
    p = cli('sample', '--prior', tmp_path / 'prior', '--data', r, '--n-prompts', 3, '--n', 2, '--out', tmp_path / 's.npz')
    assert p.returncode == 0, p.stderr
    z = np.load(tmp_path / 's.npz')
    assert z['images'].shape == (6, 64, 64, 3)
    test_caps = {c for cs in all_captions(open_dataset(r).test_split()) for c in cs}
    assert set(z['prompts']) <= {c.lower().rstrip('.').replace(',', '') for c in test_caps} | test_caps
    p = cli('eval', '--prior', tmp_path / 'prior', '--data', r, '--clip', tmp_path / 'clip', '--n', 6, '--out', tmp_path / 'ev')
    assert p.returncode == 0, p.stderr
    ev = json.loads((tmp_path / 'ev' / 'eval.json').read_text())
    m = ev['models']['prior']
    assert ev['n'] == 6 and 'teacher_forced_ce' in m and m['ctrs']['n_images'] == 6 and (tmp_path / 'ev' / 'samples_prior.png').is_file()
    one_line_error(cli('eval', '--prior', tmp_path / 'prior', '--data', r, '--out', tmp_path / 'ev2'), '--clip')
    assert not (tmp_path / 'ev2').exists()
    one_line_error(cli('train', 'prior', '--data', r, '--arch', 'joint', '--tokenizer', tmp_path / 'tok', '--preset',
                       'thesis-cub64', '--out', tmp_path / 'p2'), '--arch separate')
    assert not (tmp_path / 'p2').exists()


def test_a_missing_or_broken_root_is_one_line_and_writes_nothing(root, tmp_path):
    bad, idx = _broken(root, tmp_path, 'no caption file')
    one_line_error(cli('train', 'tokenizer', '--kind', 'dvae-thesis', '--data', bad, '--out', tmp_path / 'o'), '.txt is missing')
    one_line_error(cli('train', 'tokenizer', '--kind', 'dvae-thesis', '--data', tmp_path / 'nowhere', '--out', tmp_path / 'o'), 'does not exist')
    assert not (tmp_path / 'o').exists()
    shutil.rmtree(bad / 'CUB_200_2011')
    for args in (('sample', '--prior', 'data/demo_64', '--data', bad, '--out', tmp_path / 's.png'),
                 ('eval', '--prior', 'data/demo_64', '--data', bad, '--clip', 'data/demo_64/clip', '--out', tmp_path / 'e')):
        one_line_error(cli(*args), 'CUB_200_2011/images.txt is missing')
    assert not (tmp_path / 's.png').exists() and not (tmp_path / 'e').exists()


def test_the_prior_caches_several_preprocessing_draws_and_reads_one(root, tmp_path):
    from dalle_course.prior_training import CaptionTokens, train_prior
    from dalle_course.tokenizer_training import train_tokenizer
    from safetensors.torch import load_file
    train_tokenizer('dvae-thesis', root, 'tiny', out=tmp_path / 'tok', steps=4, plots=False)
    res = train_prior('separate', tmp_path / 'tok', root, 'tiny', out=tmp_path / 'prior', steps=2, plots=False, batch_size=4)
    t = load_file(tmp_path / 'prior' / 'tokens.safetensors')
    assert t['train'].shape == (12, CUB.token_views, 256) and t['test'].shape == (8, 256)
    assert (t['train'][:, 0] != t['train'][:, 1]).any()          # the draws differ (random rotation and flip)
    again = train_prior('separate', tmp_path / 'tok', root, 'tiny', out=tmp_path / 'prior2', steps=2, plots=False, batch_size=4)
    assert torch.equal(load_file(tmp_path / 'prior2' / 'tokens.safetensors')['train'], t['train'])  # the draws follow the seed
    ds = CaptionTokens(res.extra['text_tokenizer'], 14, t['train'], [['a b']] * 12)
    torch.manual_seed(0)
    got = {tuple(ds[5][1].tolist()) for _ in range(200)}
    assert got == {tuple(t['train'][5, k].long().tolist()) for k in range(CUB.token_views)}  # every draw is read
