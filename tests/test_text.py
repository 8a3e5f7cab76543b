"""Text tokenizers as a user calls them: round trips, strict errors, determinism, saving, padding, BPE vs brute force."""
import json, random, re
from collections import Counter

import numpy as np
import pytest
import torch

from dalle_course.core import InputError
from dalle_course.mdmnist import captions, parse_caption, VALUES, SIZES, COLOURS, POSITIONS
from dalle_course.text import (AttributeTokenizer, BPETokenizer, TextTokenizer, WordTokenizer, EOW,
                               load_text_tokenizer, text_tokenizer_from_dict)


@pytest.fixture(autouse=True, scope='module')
def _threads():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)


def _corpus(n=600, seed=0):
    r = random.Random(seed)
    adj = ['red', 'reddish', 'brown', 'brownish', 'speckled', 'spotted', 'striped', 'tiny', 'small', 'grey', 'greyish']
    noun = ['wing', 'wings', 'wingbar', 'wingbars', 'belly', 'bellies', 'crown', 'crowns', 'beak', 'tail', 'tails']
    return [' '.join(f"{r.choice(adj)} {r.choice(noun)}" for _ in range(r.randint(1, 4))) + r.choice(['.', ',', '!', ''])
            for _ in range(n)]


CORPUS = _corpus()


def _attrs(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, (n, 3)) for k in (10, 3, 4, 3)], -1)  # (n, 3, 4)


# ---------------- attribute tokenizer
def test_attribute_vocab_and_round_trip():
    tok = AttributeTokenizer()
    assert tok.vocab_size == 21 and tok.pad_id == 0
    assert tok.vocab == ['<pad>', *VALUES, *map(str, SIZES), *COLOURS, *POSITIONS]
    A = _attrs(3000)
    caps = captions(A)
    ids = tok.encode_batch(caps)
    assert ids.shape == (3000, 12) and ids.dtype == torch.long and int(ids.min()) >= 1
    # independent: id of a token = 1 + offset of its field + index inside the field
    offs = np.cumsum([1, 10, 3, 4])  # value, size, colour, position start ids
    ref = (A + offs).reshape(3000, 12)
    assert np.array_equal(ids.numpy(), ref)
    back = tok.decode_batch(ids)
    assert back == caps
    assert all(np.array_equal(parse_caption(c), a) for c, a in zip(back, A))


@pytest.mark.parametrize('text, words', [
    ('', ['empty', '12 tokens']),
    ('7 30 r up 2 20 w down 9 40 g', ['exactly 12 tokens', 'got 11']),
    ('7 30 r up 2 20 w down 9 40 g middle up', ['exactly 12 tokens', 'got 13']),
    ('7 30 x up 2 20 w down 9 40 g middle', ["token 3 'x'", 'colour', 'w, r, g, b']),
    ('7 r 30 up 2 20 w down 9 40 g middle', ["token 2 'r'", 'size', '20, 30, 40']),
    ('7 30 r up 2 20 w down 9 40 g centre', ["token 12 'centre'", 'position', 'up, middle, down']),
    ('7 30 R up 2 20 w down 9 40 g middle', ["token 3 'R'", 'colour']),
    ('x7 30 r up 2 20 w down 9 40 g middle', ["token 1 'x7'", 'value', '0, 1, 2']),
])
def test_attribute_errors_are_one_sentence(text, words):
    with pytest.raises(InputError) as e:
        AttributeTokenizer().encode(text)
    msg = str(e.value)
    assert '\n' not in msg and all(w in msg for w in words), msg


def test_decode_refuses_bad_ids():
    tok = AttributeTokenizer()
    with pytest.raises(InputError, match=r'outside .*\[0, 21\)'):
        tok.decode([3, 21])
    assert tok.decode([8, 12, 15, 18, 0, 0]) == '7 30 r up'  # pads dropped


# ---------------- word tokenizer
def test_words_regex_and_unknown():
    tok = WordTokenizer.fit(['A red bird.', "The bird's wing, RED!"])
    assert tok.vocab[:2] == ['<pad>', '<unk>'] and tok.unk_id == 1
    x = 'The Blue bird_2 has red wings!'
    assert tok.normalize(x) == ' '.join(re.findall(r'\b\w+\b', x.lower()))
    assert tok.decode(tok.encode(x)) == 'the <unk> <unk> <unk> red <unk>'


def test_word_fit_is_frequency_then_alphabetical_and_deterministic():
    tok = WordTokenizer.fit(CORPUS)
    counts = Counter(w for t in CORPUS for w in re.findall(r'\b\w+\b', t.lower()))
    ref = sorted(counts, key=lambda w: (-counts[w], w))   # independent reference
    assert tok.vocab[2:] == ref
    sh = CORPUS[:]; random.Random(5).shuffle(sh)
    assert WordTokenizer.fit(sh).vocab == tok.vocab
    small = WordTokenizer.fit(CORPUS, min_freq=40, max_size=10)
    assert small.vocab_size <= 10 and small.vocab[2:] == [w for w in ref if counts[w] >= 40][:8]
    for t in CORPUS[:50]:
        assert tok.decode(tok.encode(t)) == tok.normalize(t)


# ---------------- BPE
def _brute(word, merges):
    syms = list(word) + [EOW]
    for a, b in merges:   # replay every merge in rank order
        i, out = 0, []
        while i < len(syms):
            if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b: out.append(a + b); i += 2
            else: out.append(syms[i]); i += 1
        syms = out
    return syms


def _brute_train(texts, vocab_size):
    "Independent trainer: counts recomputed from scratch with explicit loops."
    freqs = Counter(w for t in texts for w in re.findall(r'\w+|[^\w\s]', t.lower()))
    table = [[list(w) + [EOW], f] for w, f in freqs.items()]
    n_base = 3 + len({c for w in freqs for c in w})
    merges = []
    while n_base + len(merges) < vocab_size:
        c = {}
        for s, f in table:
            for i in range(len(s) - 1): c[(s[i], s[i + 1])] = c.get((s[i], s[i + 1]), 0) + f
        if not c: break
        best = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        if best[1] < 2: break
        merges.append(best[0])
        for row in table: row[0] = _brute(''.join(row[0])[:-len(EOW)], merges)  # re-segment from scratch
    return merges


def test_bpe_train_matches_brute_force_trainer_and_is_deterministic():
    tok = BPETokenizer.train(CORPUS, vocab_size=80)
    assert tok.merges == _brute_train(CORPUS, 80)
    assert tok.vocab_size == 80 and tok.vocab[:3] == ['<pad>', '<unk>', EOW]
    assert len(set(tok.vocab)) == tok.vocab_size
    sh = CORPUS[:]; random.Random(3).shuffle(sh)
    assert BPETokenizer.train(sh, vocab_size=80).merges == tok.merges


def test_bpe_encode_equals_brute_force():
    tok = BPETokenizer.train(CORPUS, vocab_size=70)
    r = random.Random(0)
    ws = sorted({w for t in CORPUS for w in tok.pre_tokenize(t)})
    ws += [''.join(r.choice('abdeilnprstwgy') for _ in range(r.randint(1, 14))) for _ in range(300)]
    for w in ws:
        assert [tok.vocab[i] for i in tok.encode(w)] == _brute(w, tok.merges), w


def test_bpe_round_trip_and_unknown_characters():
    tok = BPETokenizer.train(CORPUS, vocab_size=90)
    for t in CORPUS[:100]:
        assert tok.decode(tok.encode(t)) == tok.normalize(t)
    x = 'Red Wingbars, never seen: zebra!'
    assert tok.normalize(x) == 'red wingbars , never seen : zebra !'
    ids = tok.encode(x)
    assert tok.unk_id in ids and tok.decode(ids).startswith('red wingbars , ')
    assert tok.decode(ids).count('<unk>') == sum(c not in tok.index for c in 'neverseen:zebra')  # one per unknown char


def test_bpe_dropout_statistics_and_determinism():
    tok = BPETokenizer.train(CORPUS, vocab_size=90)
    texts = CORPUS[:200]
    g = torch.Generator().manual_seed(0)
    base = [len(tok.encode(t)) for t in texts]
    for t in texts:
        assert tok.decode(tok.encode(t, dropout=0.1, generator=g)) == tok.normalize(t)
    l1 = [len(tok.encode(t, dropout=0.1, generator=g)) for t in texts]
    l3 = [len(tok.encode(t, dropout=0.3, generator=g)) for t in texts]
    assert all(a >= b for a, b in zip(l1, base))   # dropout can only skip merges
    assert np.mean(base) < np.mean(l1) < np.mean(l3)
    assert sum(a != b for a, b in zip(l1, base)) > 20  # dropout really acts at p = 0.1
    a = [tok.encode(t, dropout=0.1, generator=torch.Generator().manual_seed(7)) for t in texts[:20]]
    b = [tok.encode(t, dropout=0.1, generator=torch.Generator().manual_seed(7)) for t in texts[:20]]
    assert a == b
    assert [tok.encode(t) for t in texts[:20]] == [tok.encode(t, dropout=0.0, generator=g) for t in texts[:20]]
    with pytest.raises(InputError, match='dropout'):
        tok.encode('red', dropout=1.5)


def test_bpe_dropout_probability_of_one_merge():
    "A word whose only merge sequence is one step is left unmerged with probability p."
    tok = BPETokenizer(['<pad>', '<unk>', EOW, 'a', 'a' + EOW], [('a', EOW)])
    g = torch.Generator().manual_seed(0)
    n = 4000
    split = sum(len(tok.encode('a', dropout=0.25, generator=g)) == 2 for _ in range(n)) / n
    assert abs(split - 0.25) < 0.03


def test_train_errors():
    with pytest.raises(InputError, match='vocab_size>='):
        BPETokenizer.train(['abc'], vocab_size=4)
    with pytest.raises(InputError, match='list of texts'):
        BPETokenizer.train('abc', vocab_size=40)
    with pytest.raises(InputError, match='list of texts'):
        WordTokenizer.fit('abc')


# ---------------- shared interface
def _all():
    return [AttributeTokenizer(), WordTokenizer.fit(CORPUS), BPETokenizer.train(CORPUS, vocab_size=80)]


def _texts(tok):
    return captions(_attrs(40, 1)) if isinstance(tok, AttributeTokenizer) else CORPUS[:40]


@pytest.mark.parametrize('i', range(3))
def test_save_load_every_kind(tmp_path, i):
    tok = _all()[i]
    p = tok.save(tmp_path / 'tok.json')
    d = json.loads(p.read_text())
    assert d['kind'] == tok.kind
    tok2 = load_text_tokenizer(p)
    assert type(tok2) is type(tok) and tok2.vocab == tok.vocab
    assert torch.equal(tok2.encode_batch(_texts(tok)), tok.encode_batch(_texts(tok)))
    tok.save(tmp_path)   # a folder gets text_tokenizer.json
    assert load_text_tokenizer(tmp_path).vocab == tok.vocab
    assert text_tokenizer_from_dict(tok.to_dict()).vocab == tok.vocab


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match='no text tokenizer'):
        load_text_tokenizer(tmp_path / 'nope.json')
    (tmp_path / 'x.json').write_text('{"a": 1}')
    with pytest.raises(InputError, match='not a dalle_course text tokenizer'):
        load_text_tokenizer(tmp_path / 'x.json')
    (tmp_path / 'y.json').write_text('not json')
    with pytest.raises(InputError, match='not JSON'):
        load_text_tokenizer(tmp_path / 'y.json')


@pytest.mark.parametrize('i', range(3))
def test_encode_batch_padding_and_overflow(i):
    tok = _all()[i]
    texts = _texts(tok)[:7]
    seqs = [tok.encode(t) for t in texts]
    L = max(map(len, seqs))
    B = tok.encode_batch(texts)
    assert B.shape == (7, L) and B.dtype == torch.long
    for row, s in zip(B, seqs):
        assert row[:len(s)].tolist() == s and (row[len(s):] == tok.pad_id).all()
    B2 = tok.encode_batch(texts, length=L + 5)
    assert B2.shape == (7, L + 5) and torch.equal(B2[:, :L], B) and (B2[:, L:] == 0).all()
    assert tok.decode_batch(B2) == [tok.normalize(t) for t in texts]
    with pytest.raises(InputError) as e:
        tok.encode_batch(texts, length=L - 1)
    assert f'length={L - 1}' in str(e.value) and f'length>={L}' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(InputError, match='list of texts'):
        tok.encode_batch(texts[0])
    assert tok.encode_batch([]).shape == (0, 0)
