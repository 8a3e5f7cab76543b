"""Learner copies run anywhere: written by the package into a folder outside the repository, run cell by cell.

With the stubs left in, the only cells that fail are the exercise cells, each with its check's "not written yet"
message, so a skipped exercise costs only itself. With the reference solutions injected back, every cell passes:
this is also the test that every lesson runs (91_checks, which is not copied, runs in place in test_notebooks)."""
import json, os, sys
from pathlib import Path

import pytest

from dalle_course.exercises import COURSE_NBS, NOT_COPIED, STUB, learner_copy, write_learner_copies
from dalle_course.exercises import run_cells as lib_run_cells
from test_notebooks import _flags

ROOT = Path(__file__).resolve().parent.parent
LESSONS = [p for p in sorted((ROOT / 'nbs').glob('*.ipynb')) if p.name not in NOT_COPIED]
WITH_EXERCISES = [p for p in LESSONS if learner_copy(json.loads(p.read_text(encoding='utf-8')))[1]]


def run_cells(path: Path):
    "The library's runner (a learner pressing Shift-Enter down the page), with the tst_flags of settings.ini skipped."
    skip, force = _flags()
    old_env = os.environ.get('IN_TEST'); os.environ['IN_TEST'] = '1'
    try: r = lib_run_cells(path, skip=set(skip) - set(force))
    finally:
        if old_env is None: os.environ.pop('IN_TEST', None)
        else: os.environ['IN_TEST'] = old_env
    return r['errors'], r['cells']


@pytest.fixture(scope='module')
def course(tmp_path_factory):
    "Learner copies written by the package into a temporary folder outside the repository."
    d = tmp_path_factory.mktemp('learner') / 'my_course'
    assert ROOT not in d.resolve().parents
    counts = write_learner_copies(out_dir=d)  # no --nbs: the package finds its own notebooks
    assert COURSE_NBS == ROOT / 'nbs'
    return d, counts


def _with_solutions(copy: Path, original: Path) -> Path:
    "The learner copy with every stubbed cell's source put back from the repository's notebook (matched by cell id)."
    nb, orig = json.loads(copy.read_text()), json.loads(original.read_text())
    src = {c['id']: c['source'] for c in orig['cells']}
    n = 0
    for c in nb['cells']:
        if c['cell_type'] == 'code' and STUB in ''.join(c['source']):
            c['source'] = src[c['id']]; n += 1
    out = copy.with_name(copy.stem + '_solved.ipynb')
    out.write_text(json.dumps(nb))
    return out


@pytest.mark.parametrize('nb', LESSONS, ids=[p.stem for p in LESSONS])
def test_copy_with_solutions_runs_clean(course, nb):
    d, counts = course
    solved = _with_solutions(d / nb.name, nb)
    errors, ran = run_cells(solved)
    assert not errors, f"{nb.name} (solutions injected, run from {d}): " + '\n'.join(
        f"cell {i}: {e}: {v}" for i, _, e, v in errors[:3])
    assert ran > 0 or nb.name == 'index.ipynb'


@pytest.mark.parametrize('nb', WITH_EXERCISES, ids=[p.stem for p in WITH_EXERCISES])
def test_copy_with_stubs_fails_only_in_exercises(course, nb):
    d, counts = course
    errors, ran = run_cells(d / nb.name)
    stubbed = sum(STUB in c for c in [''.join(x['source']) for x in json.loads((d / nb.name).read_text())['cells']])
    wrong = [(i, e, v) for i, src, e, v in errors if STUB not in src]
    assert not wrong, f"{nb.name}: cells without an exercise failed (they must not depend on the learner's function): {wrong[:3]}"
    bad_msg = [(i, e, v[:200]) for i, src, e, v in errors if not (e == 'CheckFailure' and 'not written yet' in v)]
    assert not bad_msg, f"{nb.name}: an exercise cell failed without its check's message: {bad_msg[:3]}"
    assert len(errors) == stubbed and counts[nb.name] >= stubbed > 0, (nb.name, len(errors), stubbed, counts[nb.name])
