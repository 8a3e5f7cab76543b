"""The notebooks that are not copied for learners (91_checks) run here in place, through nbdev's executor; every
lesson runs as a learner copy in test_learner_copies. The library must match the notebooks and the notebooks must be
clean."""
import configparser, filecmp, os, shutil, subprocess, sys
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # aliased: pytest would collect a name starting with test_

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted((ROOT / 'nbs').glob('*.ipynb'))
IN_PLACE = [p for p in NBS if p.name in ('91_checks.ipynb',)]  # dalle_course.exercises.NOT_COPIED


def _flags():
    "Cells flagged with a tst_flag are skipped unless NBDEV_TEST_FLAGS names the flag."
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    flags = cfg['DEFAULT'].get('tst_flags', '').split()
    forced = os.environ.get('NBDEV_TEST_FLAGS', '').replace(',', ' ').split()
    return [f for f in flags if f not in forced], forced


def test_notebooks_found():
    from dalle_course.exercises import NOT_COPIED
    assert len(NBS) >= 6, NBS
    assert [p.name for p in IN_PLACE] == list(NOT_COPIED)


@pytest.mark.parametrize('nb', IN_PLACE, ids=[p.stem for p in IN_PLACE])
def test_notebook(nb):
    skip, force = _flags()
    ok, secs = run_notebook(nb, skip_flags=skip, force_flags=force, basepath=ROOT)
    assert ok, f'{nb.name} failed after {secs:.1f} s (traceback above)'


def _nbdev(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k != 'IN_TEST'}  # nbdev_export does nothing under IN_TEST
    bindir = Path(sys.executable).parent
    exe = bindir / cmd if (bindir / cmd).exists() else shutil.which(cmd)
    r = subprocess.run([str(exe)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def _copy_project(dst):
    for name in ('settings.ini', 'nbs', 'dalle_course'):
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
         if src.is_dir() else shutil.copy(src, dst / name))


def _diff(a, b):
    cmp = filecmp.dircmp(a, b, ignore=['__pycache__'])
    out = [f'only in committed: {x}' for x in cmp.left_only] + [f'only in export: {x}' for x in cmp.right_only]
    out += [f'differs: {x}' for x in cmp.diff_files]
    for sub, c in cmp.subdirs.items(): out += [f'{sub}/{x}' for x in _diff(a / sub, b / sub)]
    return out


def test_library_in_sync_with_notebooks(tmp_path):
    _copy_project(tmp_path)
    _nbdev('nbdev_export', tmp_path)
    d = _diff(ROOT / 'dalle_course', tmp_path / 'dalle_course')
    assert not d, f'run nbdev_export and commit: {d}'


def test_notebooks_clean(tmp_path):
    _copy_project(tmp_path)
    _nbdev('nbdev_clean', tmp_path)
    d = _diff(ROOT / 'nbs', tmp_path / 'nbs')
    assert not d, f'run nbdev_clean and commit: {d}'
