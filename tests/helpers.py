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
