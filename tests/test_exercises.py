"""Learner copies: solutions are really gone, every exercise becomes a stub that raises, the export cell and the checks' notebook
are left out, pictures travel along, nothing else changes; the command never overwrites what it did not write or what
the learner changed. (That the copies run, anywhere, is tests/test_learner_copies.py.)"""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from dalle_course.exercises import BEGIN, END, MANIFEST, NOT_COPIED, _is_export_cell, strip_solutions, write_learner_copies
from dalle_course.core import InputError

ROOT = Path(__file__).resolve().parent.parent
LESSONS_WITH_EXERCISES = {'03_mdmnist.ipynb': 2, '05_schedules.ipynb': 1, '06_learner.ipynb': 1, '10_gumbel.ipynb': 3, '12_dvae.ipynb': 4,
                          '13_vqvae.ipynb': 6, '20_text.ipynb': 3, '21_masks.ipynb': 3, '22_transformer.ipynb': 4, '23_prior.ipynb': 4, '24_sampling.ipynb': 4,
                          '07_ruler.ipynb': 1, '25_evaluation.ipynb': 2, '28_clip.ipynb': 1}  # lesson: minimum number of exercises


def _code(nb):
    return [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']


def _solutions(src):
    "The solution lines of a cell (between the markers)."
    out, inside = [], False
    for line in src.split('\n'):
        if line.strip() == BEGIN: inside = True
        elif line.strip() == END: inside = False
        elif inside and line.strip(): out.append(line)
    return out


@pytest.fixture(scope='module')
def copies(tmp_path_factory):
    d = tmp_path_factory.mktemp('course')
    counts = write_learner_copies(ROOT / 'nbs', d / 'nbs')
    return d / 'nbs', counts


def test_counts_and_required_exercises(copies):
    out, counts = copies
    assert set(counts) == {p.name for p in (ROOT / 'nbs').glob('*.ipynb')} - set(NOT_COPIED)
    assert not (out / '91_checks.ipynb').exists()
    for name, n in LESSONS_WITH_EXERCISES.items():
        assert counts.get(name, 0) >= n, f'{name} has {counts.get(name, 0)} exercises, wants at least {n}'


def test_solutions_removed_and_stubbed(copies):
    out, counts = copies
    for name, n in counts.items():
        orig = json.loads((ROOT / 'nbs' / name).read_text())
        new = json.loads((out / name).read_text())
        kept = [c for c in orig['cells'] if not (c['cell_type'] == 'code' and _is_export_cell(''.join(c['source'])))]
        assert len(kept) == len(new['cells']) and len(orig['cells']) - len(kept) <= 1, name
        assert [c['id'] for c in kept] == [c['id'] for c in new['cells']], name
        assert not any(_is_export_cell(''.join(c['source'])) for c in new['cells'] if c['cell_type'] == 'code'), name
        stubs = 0
        for a, b in zip(_code({'cells': kept}), _code(new)):
            assert BEGIN not in b.split('\n') and END not in b.split('\n')
            sol = _solutions(a)
            if sol:
                stubs += b.count('raise NotImplementedError')
                gone = [l for l in sol if l.strip() not in {x.strip() for x in a.split('\n') if x not in sol} and l in b]
                assert not gone, f'{name}: solution lines survived: {gone[:3]}'
            else:
                assert a == b, f'{name}: a cell without exercise changed'
        assert stubs == n, (name, stubs, n)
        assert all(c.get('outputs', []) == [] for c in new['cells'] if c['cell_type'] == 'code')


def test_pictures_travel_with_the_copies(copies):
    out, _ = copies
    md = ''.join(''.join(c['source']) for c in json.loads((out / '29_study.ipynb').read_text())['cells'] if c['cell_type'] == 'markdown')
    assert '../data/' not in md and '](images/study.png)' in md and (out / 'images' / 'study.png').is_file()
    assert (out / 'images' / 'demo_samples.png').read_bytes() == (ROOT / 'nbs' / 'images' / 'demo_samples.png').read_bytes()


def test_solutions_kept_on_request(tmp_path):
    counts = write_learner_copies(out_dir=tmp_path / 'c', solutions=True)
    text = (tmp_path / 'c' / '10_gumbel.ipynb').read_text()
    assert counts['10_gumbel.ipynb'] >= 3 and 'NotImplementedError' not in text and BEGIN in text


def test_overwrite_rules(tmp_path):
    (tmp_path / 'x.txt').write_text('keep')
    with pytest.raises(InputError, match='overwrite'):
        write_learner_copies(ROOT / 'nbs', tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.txt']
    with pytest.raises(InputError, match='no notebooks'):
        write_learner_copies(tmp_path, tmp_path / 'out')
    d = tmp_path / 'course'
    write_learner_copies(out_dir=d)
    write_learner_copies(out_dir=d, overwrite=True)                        # unchanged copies of ours: replaced
    nb = d / '12_dvae.ipynb'
    mine = nb.read_text().replace('NotImplementedError', 'my own answer', 1)
    nb.write_text(mine)
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    with pytest.raises(InputError, match='12_dvae.ipynb.*changed since it was written'):
        write_learner_copies(out_dir=d, overwrite=True)
    assert nb.read_text() == mine and {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before  # nothing written
    nb.unlink(); (d / '10_gumbel.ipynb').unlink()
    (d / '10_gumbel.ipynb').write_text('{}')                                # a file of the same name we did not write...
    json_manifest = json.loads((d / MANIFEST).read_text()); json_manifest.pop('10_gumbel.ipynb')
    (d / MANIFEST).write_text(json.dumps(json_manifest))
    with pytest.raises(InputError, match='did not write'):
        write_learner_copies(out_dir=d, overwrite=True)
    assert (d / '10_gumbel.ipynb').read_text() == '{}'


def test_cli_works_from_any_folder(tmp_path):
    exe = Path(sys.executable).parent / 'dalle-course'
    r = subprocess.run([str(exe), 'exercises', '--out', 'mine'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'mine' / '10_gumbel.ipynb').is_file() and 'jupyter lab mine' in r.stdout
    r = subprocess.run([str(exe), 'exercises', '--out', 'mine'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and '--overwrite' in r.stderr, r.stderr


def test_strip_keeps_indentation_and_code_around():
    src = f"def f(x):\n    y = 1\n        {BEGIN}\n        return x\n        {END}\nf"
    assert strip_solutions(src) == ("def f(x):\n    y = 1\n        raise NotImplementedError("
                                    "\"Exercise: replace this line with your solution\")\nf")


# Every check, and the library function or class that answers its exercise. A new check must name its answer here,
# and the lesson must show the exercise first: the export that answers it may only come after.
ANSWERS = {'check_colorize': 'colorize', 'check_slot_box': 'slot_box', 'check_warmup_cosine_lr': 'Schedule',
           'check_ema_update': 'update_ema', 'check_slot_strips': 'slot_strips', 'check_gumbel_noise': 'sample_gumbel',
           'check_relaxed_sample': 'relaxed_softmax', 'check_straight_through': 'straight_through',
           'check_logit_laplace_nll': 'logit_laplace_nll', 'check_kl_to_uniform': 'kl_to_uniform',
           'check_batch_usage_kl': 'batch_usage_kl', 'check_dalle_elb': 'dvae_loss', 'check_nearest_codes': 'nearest_codes',
           'check_vq_straight_through': 'VectorQuantizer', 'check_ema_codebook_step': 'ema_codebook_update',
           'check_vq_forward': 'VectorQuantizer', 'check_rotation_trick': 'rotation_trick', 'check_fsq_round': 'FSQ',
           'check_words': 'words', 'check_pair_counts': 'pair_counts', 'check_merge_pair': 'merge_pair',
           'check_causal_mask': 'causal_mask', 'check_row_mask': 'image_mask', 'check_pad_lookup': 'PadEmbedding',
           'check_attention': 'MultiHeadAttention', 'check_decode_step': 'KVCache', 'check_mha': 'MultiHeadAttention',
           'check_image_positions': 'ImagePositions', 'check_joint_shift': 'JointPrior', 'check_g1_forward': 'JointPrior',
           'check_prior_loss': 'prior_loss', 'check_null_text': 'drop_text', 'check_top_k': 'filter_logits',
           'check_top_p': 'filter_logits', 'check_guide': 'guide', 'check_sample_loop': 'sample',
           'check_caption_following': 'caption_following', 'check_ctrs_perturbation': 'perturb_attributes',
           'check_contrastive_loss': 'contrastive_loss', 'check_renoise': 'renoise', 'check_paella_weight': 'paella_loss_weight',
           'check_mask_schedule': 'mask_schedule', 'check_static_attend': 'StaticDecoder', 'check_square_pad': 'square_pad',
           'check_perturb_caption': 'perturb_caption', 'check_memory_per_gpu': 'memory_per_gpu',
           'check_scale_grad': 'scale_grad', 'check_update_scale': 'update_scale',
           'check_accept_drafts': 'accept_drafts'}


def test_every_exercise_precedes_its_answer():
    import inspect, re
    from dalle_course import checks
    names = {n for n, f in inspect.getmembers(checks, inspect.isfunction) if n.startswith('check_') and f.__module__ == checks.__name__}
    assert names == set(ANSWERS), f'checks without a named answer: {names - set(ANSWERS)}; stale entries: {set(ANSWERS) - names}'
    seen = set()
    for p in sorted((ROOT / 'nbs').glob('*.ipynb')):
        if p.name in NOT_COPIED: continue
        cells = [''.join(c['source']) for c in json.loads(p.read_text())['cells'] if c['cell_type'] == 'code']
        for i, src in enumerate(cells):
            if not any(l.strip() == BEGIN for l in src.split('\n')): continue
            for check in re.findall(r'^(check_\w+)\(', src, re.M):
                seen.add(check)
                answer = ANSWERS[check]
                defined = [j for j, s in enumerate(cells) if s.startswith('#| export') and re.search(rf'^(def|class) {answer}\b', s, re.M)]
                assert all(j > i for j in defined), f'{p.name}: {answer}, the answer to {check}, is exported before its exercise'
    assert seen == set(ANSWERS), f'checks no lesson uses in an exercise: {set(ANSWERS) - seen}'
