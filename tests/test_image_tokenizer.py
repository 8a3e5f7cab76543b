"Tokenizer interface, save/load and the tokenizer metrics, against brute-force references."
import math

import pytest
import torch

from dalle_course.core import InputError, save_checkpoint
from dalle_course.image_tokenizer import (TOKENIZER_FILE, ImageTokenizer, PatchColourTokenizer, code_counts,
                                   codebook_usage, evaluate_tokenizer, load_tokenizer, perplexity, psnr)


def _brute_encode(img, patch, levels):
    B, _, H, W = img.shape
    out = torch.zeros(B, H // patch, W // patch, dtype=torch.long)
    for b in range(B):
        for i in range(H // patch):
            for j in range(W // patch):
                m = img[b, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].mean((1, 2)).tolist()
                lv = [min(int(c * levels), levels - 1) for c in m]
                out[b, i, j] = lv[0] * levels ** 2 + lv[1] * levels + lv[2]
    return out


@pytest.mark.parametrize('patch,levels', [(4, 4), (8, 3), (2, 2)])
def test_patch_tokenizer_matches_brute_force(patch, levels):
    torch.manual_seed(0)
    img = torch.rand(2, 3, 16, 16)
    tok = PatchColourTokenizer(image_size=16, patch=patch, levels=levels)
    t = tok.encode(img)
    assert t.dtype == torch.long and t.shape == (2, *tok.grid) and tok.vocab_size == levels ** 3
    assert torch.equal(t, _brute_encode(img, patch, levels))
    rec = tok.decode(t)
    assert rec.shape == img.shape and rec.min() >= 0 and rec.max() <= 1
    # decoding paints each patch with its level centres: re-encoding gives the same tokens
    assert torch.equal(tok.encode(rec), t)


def test_save_load_round_trip_any_folder(tmp_path):
    tok = PatchColourTokenizer(image_size=32, patch=8, levels=3)
    tok.save(tmp_path / TOKENIZER_FILE)
    for where in (tmp_path, tmp_path / TOKENIZER_FILE, str(tmp_path)):
        t2 = load_tokenizer(where)
        assert type(t2) is PatchColourTokenizer and t2.config == tok.config and t2.vocab_size == 27
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(load_tokenizer(tmp_path).encode(x), tok.encode(x))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(InputError, match='no tokenizer'):
        load_tokenizer(tmp_path)
    save_checkpoint(tmp_path / 'other.safetensors', {'model': {'w': torch.zeros(2)}}, config={'x': 1})
    with pytest.raises(InputError, match='not a dalle_course tokenizer'):
        load_tokenizer(tmp_path / 'other.safetensors')


def test_bad_images_and_tokens_are_refused():
    tok = PatchColourTokenizer(image_size=16, patch=4, levels=2)
    for bad in (torch.rand(1, 3, 8, 8), torch.rand(3, 16, 16), torch.rand(1, 1, 16, 16)):
        with pytest.raises(InputError, match='16'):
            tok.encode(bad)
    with pytest.raises(InputError, match=r'\[0, 8\)'):
        tok.decode(torch.full((1, 4, 4), 8))
    with pytest.raises(InputError):
        tok.decode(torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(InputError):
        tok.decode(torch.zeros(1, 4, 4))            # float ids


def test_metrics_against_formulas():
    torch.manual_seed(1)
    t = torch.randint(0, 7, (5, 4, 4))
    c = code_counts(t, 10)
    assert c.tolist() == [int((t == k).sum()) for k in range(10)]
    assert math.isclose(codebook_usage(c), sum(int((t == k).any()) for k in range(10)) / 10, rel_tol=1e-6)
    p = [float((t == k).sum()) / t.numel() for k in range(10)]
    assert math.isclose(perplexity(c), math.exp(-sum(q * math.log(q) for q in p if q > 0)), rel_tol=1e-9)
    assert math.isclose(perplexity(torch.tensor([1, 1, 1, 1])), 4.0, rel_tol=1e-12)
    x, y = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    ref = torch.tensor([10 * math.log10(1 / float(((x[i] - y[i]) ** 2).mean())) for i in range(3)])
    torch.testing.assert_close(psnr(x, y), ref)


def test_evaluate_tokenizer_brute_force():
    torch.manual_seed(2)
    ds = [{'image': torch.rand(3, 16, 16)} for _ in range(7)]
    tok = PatchColourTokenizer(image_size=16, patch=4, levels=3)
    res = evaluate_tokenizer(tok, ds, batch_size=3)          # batches of 3, 3, 1
    x = torch.stack([d['image'] for d in ds]); t = tok.encode(x); r = tok.decode(t)
    assert res['n_images'] == 7
    assert math.isclose(res['mse'], float(((r - x) ** 2).mean()), rel_tol=1e-5)
    assert math.isclose(res['psnr'], float(psnr(r, x).mean()), rel_tol=1e-5)
    assert torch.equal(res['counts'], code_counts(t, 27))
    assert res['usage'] == codebook_usage(res['counts'])
    assert evaluate_tokenizer(tok, ds, max_images=2)['n_images'] == 2


def test_subclass_from_elsewhere_round_trips(tmp_path):
    "A subclass defined outside the library (as in a notebook) is restored by class name."
    class Tiny(ImageTokenizer):
        kind = 'tiny-test'
        def __init__(self, image_size=8, k=5):
            super().__init__(image_size=image_size, k=k)
            self.image_size, self.downsample, self.vocab_size = image_size, 8, k
            self.w = torch.nn.Parameter(torch.randn(3))
    a = Tiny(k=6); a.save(tmp_path / 'x.safetensors')
    b = load_tokenizer(tmp_path / 'x.safetensors')
    assert type(b) is Tiny and b.vocab_size == 6 and torch.equal(a.w, b.w) and not b.training


def test_same_named_class_elsewhere_does_not_hijack_loading(tmp_path):
    "A notebook re-defining PatchColourTokenizer (module __main__) must not change what library files load as."
    ns = {'ImageTokenizer': ImageTokenizer, '__name__': '__main__'}
    exec("class PatchColourTokenizer(ImageTokenizer):\n    kind = 'patch-colour'\n"
         "    def __init__(self, **kw): super().__init__(**kw)\n", ns)
    PatchColourTokenizer(image_size=16, patch=4, levels=2).save(tmp_path / 'lib.safetensors')
    assert type(load_tokenizer(tmp_path / 'lib.safetensors')) is PatchColourTokenizer
    assert ns['PatchColourTokenizer'] is not PatchColourTokenizer
