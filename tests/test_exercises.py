"""Learner copies: solutions are really gone, every exercise becomes a stub that raises, nothing else changes."""
import json, os
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # aliased so pytest does not collect it

from dalle_course.exercises import BEGIN, END, strip_solutions, write_learner_copies
from dalle_course.core import InputError

ROOT = Path(__file__).resolve().parent.parent
LESSONS_WITH_EXERCISES = {'03_mdmnist.ipynb': 2, '05_schedules.ipynb': 1, '06_learner.ipynb': 1, '10_gumbel.ipynb': 3, '12_dvae.ipynb': 3,
                          '13_vqvae.ipynb': 3, '20_text.ipynb': 3, '21_masks.ipynb': 3, '22_transformer.ipynb': 3, '23_prior.ipynb': 3, '24_sampling.ipynb': 3,
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
    os.symlink(ROOT / 'data', d / 'data')  # notebooks read ../data like the repository's
    return d / 'nbs', counts


def test_counts_and_required_exercises(copies):
    out, counts = copies
    assert set(counts) == {p.name for p in (ROOT / 'nbs').glob('*.ipynb')}
    for name, n in LESSONS_WITH_EXERCISES.items():
        assert counts.get(name, 0) >= n, f'{name} has {counts.get(name, 0)} exercises, wants at least {n}'


def test_solutions_removed_and_stubbed(copies):
    out, counts = copies
    for name, n in counts.items():
        orig = json.loads((ROOT / 'nbs' / name).read_text())
        new = json.loads((out / name).read_text())
        assert len(orig['cells']) == len(new['cells']), name
        stubs = 0
        for a, b in zip(_code(orig), _code(new)):
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


def test_learner_copy_stops_at_first_exercise(copies, capsys):
    "Running a learner copy fails with NotImplementedError: the stubs really replace the solutions."
    out, counts = copies
    name = next(n for n in sorted(counts) if counts[n])
    ok, _ = run_notebook(out / name, skip_flags=['slow', 'cuda'], showerr=True)
    err = capsys.readouterr().err
    assert not ok and 'NotImplementedError' in err and 'Exercise: replace this line' in err, err[-2000:]


def test_overwrite_rules(tmp_path):
    (tmp_path / 'x.txt').write_text('keep')
    with pytest.raises(InputError, match='overwrite'):
        write_learner_copies(ROOT / 'nbs', tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.txt']
    with pytest.raises(InputError, match='no notebooks'):
        write_learner_copies(tmp_path, tmp_path / 'out')


def test_strip_keeps_indentation_and_code_around():
    src = f"def f(x):\n    y = 1\n        {BEGIN}\n        return x\n        {END}\nf"
    assert strip_solutions(src) == ("def f(x):\n    y = 1\n        raise NotImplementedError("
                                    "\"Exercise: replace this line with your solution\")\nf")
