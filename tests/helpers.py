"""Small helpers shared by the tests that run training commands."""
import subprocess, sys


def cli(*args):
    "Run `python -m dalle_course.cli ARGS` and return the CompletedProcess."
    return subprocess.run([sys.executable, '-m', 'dalle_course.cli', *map(str, args)], capture_output=True, text=True)


def one_line_error(p, *words):
    "Assert the command failed with status 2 and exactly one stderr line that contains every word."
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'error' in lines[0], p.stderr
    for w in words: assert w in lines[0], (w, lines[0])


class StopAt:
    "A Learner callback that stands in for Ctrl-C right after step `at`."
    def __init__(self, at): self.at = at
    def after_step(self, learner, step, rec):
        if step == self.at: raise KeyboardInterrupt


def write_splits(root, n_train: int, n_test: int, n_big: int):
    "MD-MNIST under `root`: 64-px `train` (seed 0) and `test` (seed 1) splits and a 128-px `big` one for size errors."
    from dalle_course.mdmnist import write_mdmnist
    write_mdmnist(root / 'train', n=n_train, seed=0, size=64, split='train')
    write_mdmnist(root / 'test', n=n_test, seed=1, size=64, split='test')
    write_mdmnist(root / 'big', n=n_big, seed=2, size=128, split='train')
    return root
