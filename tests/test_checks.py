"""Every exercise check accepts the reference answer and rejects at least two planted wrong answers.

Planted answers live in tests/planted_<topic>.py as `PLANTED = {'check_name': (right_fn, [wrong_fn, ...])}`; a wrong
answer may come as `(wrong_fn, 'part of the hint')`, and the check's message must then contain that hint. Every failure
message is short: the case, the first mismatch and the largest difference, not pages of tensor."""
import importlib.util, inspect
from pathlib import Path

import pytest

from dalle_course import checks
from dalle_course.exercises import CheckFailure

HERE = Path(__file__).resolve().parent


def _planted():
    out = {}
    for p in sorted(HERE.glob('planted_*.py')):
        spec = importlib.util.spec_from_file_location(p.stem, p); mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        dup = set(out) & set(mod.PLANTED)
        assert not dup, f'{p.name} plants answers for checks already planted elsewhere: {dup}'
        out.update(mod.PLANTED)
    return out


PLANTED = _planted()
CHECKS = {n: f for n, f in inspect.getmembers(checks, inspect.isfunction)
          if n.startswith('check_') and f.__module__ == checks.__name__}
WRONG = [(name, i) for name, (_, wrongs) in PLANTED.items() for i in range(len(wrongs))]


def test_every_check_has_planted_answers():
    assert CHECKS, 'dalle_course.checks defines no check'
    assert set(CHECKS) == set(PLANTED), (f'checks without planted answers: {set(CHECKS) - set(PLANTED)}; '
                                         f'planted for unknown checks: {set(PLANTED) - set(CHECKS)}')
    few = {n: len(w) for n, (_, w) in PLANTED.items() if len(w) < 2}
    assert not few, f'fewer than two wrong answers planted: {few}'


@pytest.mark.parametrize('name', sorted(PLANTED))
def test_check_accepts_reference(name, capsys):
    CHECKS[name](PLANTED[name][0])
    assert '✓' in capsys.readouterr().out


@pytest.mark.parametrize('name,i', WRONG, ids=[f'{n}-wrong{i}' for n, i in WRONG])
def test_check_rejects_wrong_answer(name, i):
    wrong = PLANTED[name][1][i]
    fn, hint = wrong if isinstance(wrong, tuple) else (wrong, None)
    with pytest.raises(CheckFailure) as err:
        CHECKS[name](fn)
    msg = str(err.value)
    assert len(msg) < 1200, f'{name}: a {len(msg)}-character failure message: {msg[:300]}'
    if hint: assert hint in msg, f'{name} rejected {fn.__name__} without the hint {hint!r}: {msg}'


def test_whole_piece_exercises_have_hints():
    "Every build-the-whole-piece check names a hint for each planted mistake."
    for name in ('check_dalle_elb', 'check_vq_forward', 'check_mha', 'check_g1_forward', 'check_sample_loop'):
        wrongs = PLANTED[name][1]
        assert len(wrongs) >= 2 and all(isinstance(w, tuple) and w[1] for w in wrongs), name


def test_unwritten_exercise_is_named():
    def my_answer(*a, **k): raise NotImplementedError('Exercise: replace this line with your solution')
    for name, check in CHECKS.items():
        with pytest.raises(CheckFailure, match='`my_answer` is not written yet'):
            check(my_answer)


def test_contrastive_check_takes_the_librarys_answer_in_float32_and_float64():
    "The check compares at 1e-5: an answer computed in float32 (as the library's own is) passes, as does float64."
    from dalle_course.clip import contrastive_loss
    checks.check_contrastive_loss(lambda logits: contrastive_loss(logits.float()))
    checks.check_contrastive_loss(lambda logits: contrastive_loss(logits.double()))


def test_checks_take_right_answers_in_other_styles(capsys):
    "Planted files may list right answers in other styles (`RIGHT_TOO`): every check accepts each of them."
    seen = 0
    for p in sorted(HERE.glob('planted_*.py')):
        spec = importlib.util.spec_from_file_location(p.stem, p); mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name, fns in getattr(mod, 'RIGHT_TOO', {}).items():
            for fn in fns:
                CHECKS[name](fn); seen += 1
                assert '✓' in capsys.readouterr().out, (name, fn.__name__)
    assert seen >= 4
