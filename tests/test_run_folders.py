"""The run-folder and bad-input policy of every `dalle-course` command, as one table of cases.

Each case prepares files in a fresh `tmp_path`, runs one command, and checks: the exit status; for a failure,
exactly one stderr line (no traceback) holding the expected words; and what is left on disk (by default: nothing
changed at all, in `tmp_path` and in the shared fixtures). Kills, Ctrl-C and concurrent writers follow the table."""
import hashlib, json, os, pickle, random, re, shutil, signal, subprocess, sys, time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import cli, one_line_error, write_splits
from safetensors.torch import load as load_bytes, load_file, save_file

from dalle_course.core import read_checkpoint_meta
from dalle_course.image_tokenizer import PatchColourTokenizer

PROMPT = '7 30 r up 2 20 w down 9 40 g middle'
N_TRAIN = 40            # images in the shared train split (the batch-size cases name this number)
LONG_STEPS = 100        # the interrupted / killed runs: long enough to signal, short enough to redo
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')




# ---------------------------------------------------------------- shared, expensive inputs (built once)
class Shared:
    "Datasets, tokenizer files and finished runs, made once per module; cases copy what they mutate."
    def __init__(self, root: Path):
        self.root = root
        write_splits(root, N_TRAIN, 8, 4)
        PatchColourTokenizer(image_size=64, patch=8, levels=4).save(root / 'patch.safetensors')   # grid 8x8, K 64
        PatchColourTokenizer(image_size=64, patch=8, levels=2).save(root / 'patch2.safetensors')  # another tokenizer
        data = ('--data', root / 'train', '--test', root / 'test', '--steps', 2)
        self.tok = self._run('tok', 'train', 'tokenizer', '--kind', 'vqvae', *data)
        self.prior = self._run('prior', 'train', 'prior', '--arch', 'joint', '--tokenizer', root / 'patch.safetensors',
                               *data, '--batch-size', 4)

    def _run(self, name, *args):
        p = cli(*args, '--out', self.root / name)
        assert p.returncode == 0, p.stderr
        return self.root / name

    @cached_property
    def bench(self) -> Path:  # a finished `bench tokenizers` run (only the case that overwrites one needs it)
        return self._run('bench', 'bench', 'tokenizers', '--data', self.root / 'train', '--test', self.root / 'test',
                         '--steps', 2)

    @cached_property
    def cub(self) -> Path:  # a miniature CUB-200 root (synthetic birds), for the dataset-kind cases
        p = cli('data', 'cub-fixture', '--out', self.root / 'cub')
        assert p.returncode == 0, p.stderr
        return self.root / 'cub'

    @cached_property
    def cubprior(self) -> Path:  # a prior of free text (CUB captions)
        return self._run('cubprior', 'train', 'prior', '--arch', 'joint', '--tokenizer', self.root / 'patch.safetensors',
                         '--data', self.cub, '--steps', 2, '--batch-size', 4)

    @cached_property
    def clip(self) -> Path:  # a CLIP trained on the patch tokenizer's reconstructions (the prior's), for `eval`
        return self._run('clip', 'train', 'clip', '--kind', 'vit', '--tokenizer', self.root / 'patch.safetensors',
                         '--data', self.root / 'train', '--test', self.root / 'test', '--steps', 2, '--batch-size', 8)

    @cached_property
    def demo(self) -> Path:  # a finished demo, tiny (the library's run_demo with small stages: seconds, not minutes)
        from dalle_course.demo import run_demo
        run_demo(self.root / 'demo', n_train=N_TRAIN, n_test=8, n_prompts=4, n_samples=1, quiet=True,
                 tokenizer=dict(kind='vqvae', preset='tiny', steps=2, batch_size=4),
                 prior=dict(arch='joint', preset='tiny', steps=2, batch_size=4))
        return self.root / 'demo'

    @cached_property
    def ref(self) -> Path:  # the uninterrupted twin of the interrupted and killed runs
        return self._run('ref', *long_tokenizer_args(self))

    def names(self) -> dict:
        r = self.root
        return dict(train=r / 'train', test=r / 'test', big=r / 'big', patch=r / 'patch.safetensors',
                    patch2=r / 'patch2.safetensors', tok=r / 'tok', prior=r / 'prior', cub=r / 'cub', cubprior=r / 'cubprior',
                    clip=r / 'clip')


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('OMP_NUM_THREADS', '1')  # every `cli` subprocess inherits it
        yield Shared(tmp_path_factory.mktemp('shared'))


# ---------------------------------------------------------------- what is on disk
STRAY = ('.tmp', '.partial-', '.old-', '.lock')


def digest(p: Path) -> str:
    """sha256 of a file's content; for a readable .safetensors file, of its metadata and tensors (safetensors writes
    its metadata in a random order, so the same content can come out as other bytes)."""
    b = p.read_bytes()
    if p.suffix == '.safetensors':
        try:
            n = int.from_bytes(b[:8], 'little')
            meta = json.loads(b[8:8 + n]).get('__metadata__', {})
            tensors = load_bytes(b)
        except Exception: pass  # damaged: its bytes are its content
        else:
            h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
            for k in sorted(tensors):
                t = tensors[k]
                h.update(f'{k} {t.dtype} {tuple(t.shape)}'.encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            return h.hexdigest()
    return hashlib.sha256(b).hexdigest()


def snapshot(*roots) -> dict:
    "{path: ('dir',) | ('file', digest) | ('link', target)} of everything under `roots`."
    snap = {}
    for root in roots:
        for p in sorted(Path(root).rglob('*')):
            if p.is_symlink(): snap[str(p)] = ('link', os.readlink(p))
            elif p.is_dir(): snap[str(p)] = ('dir',)
            else: snap[str(p)] = ('file', digest(p))
    return snap


def diff(before: dict, after: dict) -> dict:
    return dict(new=sorted(set(after) - set(before)), gone=sorted(set(before) - set(after)),
                changed=sorted(k for k in set(before) & set(after) if before[k] != after[k]))


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


# checks: (ctx, before, after) -> None
def unchanged(c, before, after):
    "Nothing was created, deleted or modified anywhere."
    d = diff(before, after)
    assert not any(d.values()), d


def _content_differs(a: Path, b_digest: str) -> bool:
    return digest(a) != b_digest


def tokenizer_run_replaced(c, before, after):
    "`--overwrite` of a finished run: the user's canary survives, every old file is the new run's."
    out = c['out']
    assert (out / 'canary.txt').read_text() == 'mine'
    assert json.loads((out / 'eval.json').read_text())['steps'] == 3  # the new run's, not the old 2 steps
    assert _content_differs(out / 'tokenizer.safetensors', before[str(out / 'tokenizer.safetensors')][1])
    m = json.loads((out / 'run.json').read_text())
    assert files_of(out) == sorted(m['files'] + ['run.json', 'canary.txt'])


def bench_run_replaced(c, before, after):
    out = c['out']
    assert (out / 'canary.txt').read_text() == 'mine' and (out / 'runs' / 'notes.txt').read_text() == 'notes'
    res = json.loads((out / 'comparison.json').read_text())
    from dalle_course.tokenizer_training import COMPARISON
    assert len(res) == len(COMPARISON) == 8 and all(r['summary']['step'] == 3 for r in res.values())
    assert _content_differs(out / 'comparison.json', before[str(out / 'comparison.json')][1])


def dataset_replaced(c, before, after):
    out = c['out']
    extra = ['foreign.txt'] if c.get('foreign') else []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ['images.npy', 'captions.txt', 'attributes.npy', 'sources.npy', 'meta.json'] + extra)
    assert len((out / 'captions.txt').read_text().splitlines()) == 5
    assert not [p for p in out.parent.iterdir() if p.name.startswith('.')]
    if extra: assert (out / 'foreign.txt').read_text() == 'mine'  # the user's file survives the overwrite


def victim_survives(c, before, after):
    assert (c['t'] / 'victim.txt').read_text() == 'precious'


def metrics_recovered_or_refused(c, before, after):
    if c['proc'].returncode == 2: return unchanged(c, before, after)
    out = c['out']
    recs = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert max(r['step'] for r in recs) == 4 and json.loads((out / 'eval.json').read_text())['steps'] == 4


def writer_untouched(c, before, after):
    "The first writer still runs and still has every file it wrote (a refused --overwrite deleted nothing)."
    assert c['writer'].poll() is None, 'the first writer ended before the second one ran: nothing was tested'
    for f in ('run.json', 'recipe.json', 'checkpoint.safetensors'): assert (c['out'] / f).is_file(), f


def folder_locked(path) -> bool:
    "Whether some process holds the run folder's lock (an flock on the folder itself)."
    import fcntl
    fd = os.open(path, os.O_RDONLY)
    try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.flock(fd, fcntl.LOCK_UN); return False
    except OSError: return True
    finally: os.close(fd)


# ---------------------------------------------------------------- setups: (ctx, shared) -> None, fill ctx
def nothing(c, s): pass


def copy_run(name, **edits):
    "Copy the shared run `name` to t/run (--out); `edits`: {file: function(path)} applied to the copy."
    def setup(c, s):
        out = c['out'] = c['t'] / 'run'
        shutil.copytree(getattr(s, name), out)
        for f, edit in edits.items(): edit(out / f.replace('__', '.'))
    return setup


def unlisted(name):
    "The run's manifest forgets `name`, as if the run had been killed before writing it and the user had put it there."
    def edit(p: Path):
        m = json.loads(p.read_text()); m['files'].remove(name); p.write_text(json.dumps(m))
    return edit


def truncate(n=None):
    "Keep the first `n` bytes (default: half) of the file."
    def edit(p: Path):
        b = p.read_bytes(); p.write_bytes(b[:len(b) // 2 if n is None else n])
    return edit


def random_bytes(n=4096): return random.Random(0).randbytes(n)


def foreign_safetensors(p: Path):  # a valid safetensors file that dalle-course did not write (e.g. HF weights)
    save_file({'weight': torch.zeros(4, 4)}, str(p))


BAD_FILES = {
    'truncated': lambda s: (s.tok / 'tokenizer.safetensors').read_bytes()[:1000],
    'random-bytes': lambda s: random_bytes(),
    'pickle': lambda s: pickle.dumps({'model': list(range(100))}),
    'empty': lambda s: b'',
}


def bad_tokenizer_file(kind):
    def setup(c, s):
        c['bad'] = c['t'] / 'tokenizer.safetensors'
        c['bad'].write_bytes(BAD_FILES[kind](s))
    return setup


def foreign_tokenizer_file(c, s):
    c['bad'] = c['t'] / 'tokenizer.safetensors'
    foreign_safetensors(c['bad'])


def a_file(c, s):
    c['afile'] = c['t'] / 'afile'
    c['afile'].write_text('a file, not a folder')


def empty_folder(c, s):
    c['out'].mkdir()


def foreign_folder(c, s):
    c['out'].mkdir()
    (c['out'] / 'canary.txt').write_text('mine')


def foreign_folder_with_notes(c, s):
    foreign_folder(c, s)
    (c['out'] / 'notes').mkdir()
    (c['out'] / 'notes' / 'todo.txt').write_text('notes')


def no_meta_folder(c, s):
    c['data'] = c['t'] / 'images'
    c['data'].mkdir()
    (c['data'] / 'notes.txt').write_text('not a dataset')


def dataset_copy(edit=None, name='train'):
    def setup(c, s):
        c['data'] = c['t'] / 'data'
        shutil.copytree(s.names()[name], c['data'])
        if edit: edit(c['data'])
    return setup


def fewer_captions(d: Path):
    lines = (d / 'captions.txt').read_text().splitlines()
    (d / 'captions.txt').write_text('\n'.join(lines[:30]) + '\n')


def dataset_out(foreign=False):
    def setup(c, s):
        c['out'] = c['t'] / 'ds'
        shutil.copytree(s.names()['train'], c['out'])
        if foreign: (c['out'] / 'foreign.txt').write_text('mine'); c['foreign'] = True
    return setup


def tokenizer_run_with_canary(c, s):
    copy_run('tok')(c, s)
    (c['out'] / 'canary.txt').write_text('mine')


def bench_run_with_canaries(c, s):
    c['out'] = c['t'] / 'run'
    shutil.copytree(s.bench, c['out'])
    (c['out'] / 'canary.txt').write_text('mine')
    (c['out'] / 'runs' / 'notes.txt').write_text('notes')


def manifest_escaping_the_folder(c, s):
    copy_run('tok')(c, s)
    (c['t'] / 'victim.txt').write_text('precious')
    m = json.loads((c['out'] / 'run.json').read_text())
    m['files'].append('../victim.txt')
    (c['out'] / 'run.json').write_text(json.dumps(m))


def prior_with_tokenizer_of(src):
    "A prior run copy whose tokenizer.safetensors was replaced by another tokenizer's."
    def setup(c, s):
        copy_run('prior')(c, s)
        other = s.tok / 'tokenizer.safetensors' if src == 'tok-run' else s.names()['patch2']
        shutil.copyfile(other, c['out'] / 'tokenizer.safetensors')
    return setup


def long_tokenizer_args(s, out=None):
    r = s.root
    return ['train', 'tokenizer', '--kind', 'vqvae', '--data', r / 'train', '--test', r / 'test', '--steps', LONG_STEPS,
            '--batch-size', 4, '--device', 'cpu'] + ([] if out is None else ['--out', out])  # cpu: bitwise repeatable


def wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f'the process ended ({proc.returncode}) before {path.name} appeared'
        assert time.time() - t0 < timeout, f'no {path.name} after {timeout} s'
        time.sleep(0.01)


def stop(proc):
    "End a process we started: Ctrl-C first, then kill."
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def busy_writer(c, s):
    "A `train tokenizer` run writing t/run (holding its lock) while the case's command runs."
    c['out'] = c['t'] / 'run'
    args = [str(a) for a in long_tokenizer_args(s, c['out'])]
    args[args.index('--steps') + 1] = '400'
    w = c['writer'] = subprocess.Popen([sys.executable, '-m', 'dalle_course.cli', *args], preexec_fn=_default_sigint,
                                       stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS='1'))
    c['cleanup'].append(lambda: stop(w))
    wait_for(c['out'] / 'checkpoint.safetensors', w)


def needs(*names):
    "Build the shared inputs `names` (cached properties of Shared) before the case's snapshot."
    def setup(c, s):
        for n in names: getattr(s, n)
    return setup


def demo_copy(edit):
    "Copy the shared tiny demo to t/run (--out) and apply `edit(folder)`."
    def setup(c, s):
        out = c['out'] = c['t'] / 'run'
        shutil.copytree(s.demo, out)
        edit(out)
    return setup


def text_file(name, data: bytes):
    def setup(c, s): (c['t'] / name).write_bytes(data)
    return setup


def meta_edit(**fields):
    "A copy of the train split (t/data) whose meta.json has `fields` set (None: removed)."
    def edit(d: Path):
        m = json.loads((d / 'meta.json').read_text())
        for k, v in fields.items():
            if v is None: m.pop(k, None)
            else: m[k] = v
        (d / 'meta.json').write_text(json.dumps(m))
    return dataset_copy(edit)


def learner_copies(edit=None):
    "t/course: learner copies of two lessons (written by `exercises`), then `edit(folder)`."
    def setup(c, s):
        src = c['t'] / 'nbs'; src.mkdir()
        from dalle_course.exercises import COURSE_NBS
        for n in ('10_gumbel.ipynb', '20_text.ipynb'): shutil.copyfile(Path(COURSE_NBS) / n, src / n)
        c['nbs'] = src; c['out'] = c['t'] / 'course'
        p = cli('exercises', '--nbs', src, '--out', c['out'])
        assert p.returncode == 0, p.stderr
        if edit: edit(c)
    return setup


def bad_notebook(body: str):
    def setup(c, s):
        src = c['t'] / 'nbs'; src.mkdir()
        from dalle_course.exercises import COURSE_NBS
        shutil.copyfile(Path(COURSE_NBS) / '10_gumbel.ipynb', src / '10_gumbel.ipynb')
        (src / '11_broken.ipynb').write_text(body)
        c['nbs'] = src
    return setup


def linked_dataset(c, s):
    "t/link -> t/real, an MD-MNIST folder of 5 images."
    p = cli(*MD('--out', c['t'] / 'real'))
    assert p.returncode == 0, p.stderr
    (c['t'] / 'link').symlink_to(c['t'] / 'real')


def link_kept(c, before, after):
    link, real = c['t'] / 'link', c['t'] / 'real'
    assert link.is_symlink() and link.resolve() == real.resolve(), 'the link was replaced'
    assert not [p.name for p in c['t'].iterdir() if p.name.startswith('.')], 'a hidden leftover'
    assert len((real / 'captions.txt').read_text().splitlines()) == 5


def grid_written(c, before, after):
    "Exactly one new file, the grid, carrying the sample mark."
    from dalle_course.runs import written_by_mark
    d = diff(before, after)
    assert d['new'] == [str(c['t'] / 'grid.png')] and not d['gone'] and not d['changed'], d
    assert written_by_mark(c['t'] / 'grid.png') == 'dalle-course sample'


def warned(*words):
    "Status 0, and one warning line on stderr holding `words`."
    def check(c, before, after):
        lines = [l for l in c['proc'].stderr.splitlines() if 'dalle-course: warning:' in l]
        assert len(lines) == 1 and all(w in lines[0] for w in words), c['proc'].stderr[-2000:]
    return check


def short_line(c, before, after):
    "The refusal quotes a long input abbreviated: its one line stays short."
    unchanged(c, before, after)
    line = c['proc'].stderr.strip()
    assert len(line) < 600 and 'characters)' in line, len(line)


# ---------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    argv: tuple
    setup: Callable = nothing
    status: int | tuple = 2          # a tuple: any of these (2 then still means one line with the words)
    words: tuple = ()                # in the one stderr line (formatted with the case's names, like argv)
    check: Callable = unchanged
    snapshot: bool = True            # False for cases where another process writes meanwhile
    marks: tuple = ()
    interrupt: str | None = None     # Ctrl-C: 'startup' (while torch imports), 'appears:GLOB' (once GLOB exists under t), 'after:SECONDS'


def T(*a, kind='vqvae', steps=2):
    return ('train', 'tokenizer', '--kind', kind, '--data', '{train}', '--test', '{test}', '--steps', steps, *a)


def P(*a, arch='joint', tok='{patch}', data=('--data', '{train}', '--test', '{test}')):
    return ('train', 'prior', '--arch', arch, '--tokenizer', tok, *data, '--steps', 2, '--batch-size', 4, *a)


def S(*a, prior='{prior}', prompt=PROMPT, prompts=None):
    src = ('--prompts', prompts) if prompts else ('--prompt', prompt)
    return ('sample', '--prior', prior, *src, '--n', 1, *a, '--out', '{t}/grid.png')


def B(*a, steps=2):
    return ('bench', 'tokenizers', '--data', '{train}', '--test', '{test}', '--steps', steps, *a)


def MD(*a): return ('data', 'mdmnist', '--n', 5, '--size', 64, *a)


TOO_BIG = ('batch size 100', f'{N_TRAIN} examples')
CASES = [
    # ---- arguments
    Case('args-bad-kind', T('--out', '{out}', kind='foo'), words=('--kind', 'foo')),
    Case('args-bad-arch', P('--out', '{out}', arch='g9'), words=('--arch', 'g9')),
    Case('args-bad-preset', T('--preset', 'huge', '--out', '{out}'), words=('--preset', 'huge')),
    Case('args-bad-demo-preset', ('demo', '--preset', 'huge', '--out', '{out}'), words=('--preset', 'huge')),
    Case('args-steps-0', T('--out', '{out}', steps=0), words=('--steps', 'positive')),
    Case('args-batch-size-negative', T('--batch-size', -1, '--out', '{out}'), words=('--batch-size', 'positive')),
    Case('args-batch-bigger-than-data-tokenizer', T('--batch-size', 100, '--out', '{out}'), words=TOO_BIG),
    Case('args-batch-bigger-than-data-prior', P('--batch-size', 100, '--out', '{out}'), words=TOO_BIG),
    Case('args-batch-bigger-than-data-bench', B('--batch-size', 100, '--out', '{out}'), words=TOO_BIG),
    Case('args-resume-with-overwrite', T('--out', '{out}', '--resume', '--overwrite'), copy_run('tok'),
         words=('--resume', '--overwrite')),
    Case('args-resume-nonexistent', T('--out', '{out}', '--resume'), words=('no run to resume',)),
    Case('args-resume-empty-folder', T('--out', '{out}', '--resume'), empty_folder, words=('no run to resume',)),
    # ---- data
    Case('data-missing-option', ('train', 'tokenizer', '--kind', 'vqvae', '--out', '{out}'), words=('--data',)),
    Case('data-nonexistent-folder', T('--out', '{out}', '--data', '{t}/nothing'), words=('nothing', 'does not exist')),
    Case('data-folder-without-meta', T('--out', '{out}', '--data', '{data}'), no_meta_folder, words=('meta.json',)),
    Case('data-is-a-file', T('--out', '{out}', '--data', '{patch}'), words=('patch.safetensors', 'is a file, not a dataset folder')),
    Case('data-test-of-another-size', T('--out', '{out}', '--test', '{big}'), words=('128 px', '64 px')),
    Case('data-prior-data-of-another-size', P('--out', '{out}', data=('--data', '{big}')), words=('64 px', '128 px')),
    Case('data-damaged-meta', T('--out', '{out}', '--data', '{data}'), dataset_copy(lambda d: truncate(50)(d / 'meta.json')),
         words=('meta.json', 'damaged')),
    Case('data-captions-images-mismatch', T('--out', '{out}', '--data', '{data}'), dataset_copy(fewer_captions),
         words=('inconsistent', '30 captions')),
    Case('data-truncated-images', T('--out', '{out}', '--data', '{data}'),
         dataset_copy(lambda d: truncate(1000)(d / 'images.npy')), words=('damaged',)),
    # ---- output paths
    Case('out-is-a-file', T('--out', '{afile}'), a_file, words=('afile', 'is a file')),
    Case('out-under-a-file', T('--out', '{afile}/run'), a_file, words=('afile', 'Not a directory')),
    Case('out-unwritable', T('--out', '/proc/dalle_course_test/run'), words=('/proc/dalle_course_test',)),
    Case('out-foreign-files', T('--out', '{out}'), foreign_folder, words=('did not write',)),
    Case('out-foreign-files-overwrite', T('--out', '{out}', '--overwrite'), foreign_folder, words=('did not write',)),
    Case('out-prior-run-for-tokenizer', T('--out', '{out}'), copy_run('prior'), words=('train prior', 'train tokenizer')),
    Case('out-prior-run-for-tokenizer-overwrite', T('--out', '{out}', '--overwrite'), copy_run('prior'),
         words=('train prior', 'train tokenizer')),
    Case('out-tokenizer-run-for-bench-overwrite', B('--out', '{out}', '--overwrite'), copy_run('tok'),
         words=('train tokenizer', 'bench tokenizers')),
    Case('out-tokenizer-run-for-demo', ('demo', '--out', '{out}'), copy_run('tok'), words=('train tokenizer',)),
    Case('out-demo-under-a-file', ('demo', '--out', '{afile}/demo'), a_file, words=('afile',)),
    Case('out-mdmnist-is-a-file', MD('--out', '{afile}'), a_file, words=('afile', 'is a file')),
    Case('out-mdmnist-under-a-file', MD('--out', '{afile}/ds'), a_file, words=('afile',)),
    Case('out-mdmnist-unwritable', MD('--out', '/proc/dalle_course_test'), words=('/proc',)),
    Case('out-sample-under-a-file', ('sample', '--prior', '{prior}', '--prompt', PROMPT, '--n', 1, '--out', '{afile}/g.png'),
         a_file, words=('afile',)),
    Case('out-sample-unwritable', ('sample', '--prior', '{prior}', '--prompt', PROMPT, '--n', 1, '--out', '/proc/g.png'),
         words=('/proc/g.png',)),
    Case('out-sample-existing-file', S(), lambda c, s: (c['t'] / 'grid.png').write_text('my picture'),
         words=('grid.png', 'not written by dalle-course sample')),  # not "pass --overwrite": that would be refused too
    Case('out-sample-is-a-folder', S('--overwrite'), lambda c, s: (c['t'] / 'grid.png').mkdir(), words=('grid.png',)),
    # ---- overwrite
    Case('ow-demo-foreign-files-and-notes', ('demo', '--out', '{out}', '--overwrite'), foreign_folder_with_notes,
         words=('did not write',)),
    Case('ow-refused-without-flag', T('--out', '{out}'), copy_run('tok'), words=('--resume or --overwrite',)),
    Case('ow-tokenizer-run-keeps-canary', T('--out', '{out}', '--overwrite', steps=3), tokenizer_run_with_canary,
         status=0, check=tokenizer_run_replaced),
    Case('ow-bench-run-keeps-canaries', B('--out', '{out}', '--overwrite', steps=3), bench_run_with_canaries,
         status=0, check=bench_run_replaced),
    Case('ow-mdmnist-foreign-file-kept', MD('--out', '{out}', '--overwrite'), dataset_out(foreign=True),
         status=0, check=dataset_replaced),
    Case('ow-user-file-under-our-name', T('--out', '{out}', '--overwrite'),
         copy_run('tok', run__json=unlisted('tokenizer.safetensors')), words=('tokenizer.safetensors', 'not written by this run')),
    Case('ow-resume-user-file-under-our-name', T('--out', '{out}', '--resume'),
         copy_run('tok', run__json=unlisted('eval.json')), words=('eval.json', 'not written by this run')),
    Case('args-resume-steps-below-checkpoint', T('--out', '{out}', '--resume', steps=1), copy_run('tok'),
         words=('already trained 2 steps', '--steps 2')),
    Case('ow-mdmnist-needs-flag', MD('--out', '{out}'), dataset_out(), words=('--overwrite',)),
    Case('ow-mdmnist-own-dataset', MD('--out', '{out}', '--overwrite'), dataset_out(), status=0, check=dataset_replaced),
    Case('ow-damaged-manifest', T('--out', '{out}', '--overwrite'), copy_run('tok', run__json=truncate(100)),
         words=('run.json', 'damaged')),
    Case('ow-manifest-entry-outside-the-folder', T('--out', '{out}', '--overwrite'), manifest_escaping_the_folder,
         words=('outside the run folder',), check=victim_survives),
    # ---- fingerprints
    Case('fp-resume-prior-other-codebook', P('--out', '{out}', '--resume', tok='{patch2}'), copy_run('prior'),
         words=('codebook size 64', 'this call has 8')),
    Case('fp-resume-prior-other-tokenizer', P('--out', '{out}', '--resume', tok='{tok}'), copy_run('prior'),
         words=('another image tokenizer', 'fingerprint')),  # the same codebook size (64), another tokenizer
    Case('fp-sample-tokenizer-copy-of-another-run', S(prior='{out}'), prior_with_tokenizer_of('tok-run'),
         words=('tokenizer.safetensors', 'not the tokenizer this prior was trained on')),
    Case('fp-sample-tokenizer-copy-same-grid', S(prior='{out}'), prior_with_tokenizer_of('patch2'),
         words=('fingerprint', 'not the tokenizer this prior was trained on')),
    Case('fp-resume-tokenizer-other-kind', T('--out', '{out}', '--resume', kind='dvae-dalle'), copy_run('tok'),
         words=('--kind vqvae',)),
    Case('fp-resume-prior-other-arch', P('--out', '{out}', '--resume', arch='separate'), copy_run('prior'),
         words=('--arch joint',)),
    # ---- damaged files
    *[Case(f'dmg-tokenizer-{k}', P('--out', '{out}', tok='{bad}'), bad_tokenizer_file(k),
           words=('tokenizer.safetensors', 'damaged')) for k in BAD_FILES],
    Case('dmg-tokenizer-foreign-safetensors', P('--out', '{out}', tok='{bad}'), foreign_tokenizer_file,
         words=('tokenizer.safetensors',)),
    Case('dmg-tokenizer-in-run-folder', P('--out', '{out}', tok='{t}/run'),
         copy_run('tok', tokenizer__safetensors=truncate()), words=('run/tokenizer.safetensors', 'damaged')),
    Case('dmg-prior-truncated', S(prior='{out}'), copy_run('prior', prior__safetensors=truncate()),
         words=('prior.safetensors', 'damaged')),
    Case('dmg-prior-random-bytes', S(prior='{out}'), copy_run('prior', prior__safetensors=lambda p: p.write_bytes(random_bytes())),
         words=('prior.safetensors', 'damaged')),
    Case('dmg-text-tokenizer-truncated', S(prior='{out}'), copy_run('prior', text_tokenizer__json=truncate()),
         words=('text_tokenizer.json', 'damaged')),
    Case('dmg-checkpoint-truncated-resume', T('--out', '{out}', '--resume'),
         copy_run('tok', checkpoint__safetensors=truncate()), words=('checkpoint.safetensors', 'damaged')),
    Case('dmg-checkpoint-truncated-resume-longer', T('--out', '{out}', '--resume', steps=4),
         copy_run('tok', checkpoint__safetensors=truncate()), words=('checkpoint.safetensors', 'damaged')),
    Case('dmg-checkpoint-foreign-resume', T('--out', '{out}', '--resume'),
         copy_run('tok', checkpoint__safetensors=foreign_safetensors), words=('checkpoint.safetensors',)),
    Case('dmg-prior-checkpoint-truncated-resume', P('--out', '{out}', '--resume'),
         copy_run('prior', checkpoint__safetensors=truncate()), words=('checkpoint.safetensors', 'damaged')),
    Case('dmg-tokens-cache-truncated-resume', P('--out', '{out}', '--resume'),
         copy_run('prior', tokens__safetensors=truncate()), words=('tokens.safetensors', 'damaged')),
    Case('dmg-recipe-truncated-resume', T('--out', '{out}', '--resume'), copy_run('tok', recipe__json=truncate()),
         words=('recipe.json', 'damaged')),
    Case('dmg-manifest-truncated-resume', T('--out', '{out}', '--resume'), copy_run('tok', run__json=truncate()),
         words=('run.json', 'damaged')),
    Case('dmg-metrics-last-line-cut-resume', T('--out', '{out}', '--resume', steps=4),
         copy_run('tok', metrics__jsonl=lambda p: p.write_text(p.read_text()[:-40])),
         status=(0, 2), words=('metrics.jsonl',), check=metrics_recovered_or_refused),  # drop the cut line, or refuse
    # ---- devices and numbers
    Case('dev-cuda-tokenizer', T('--device', 'cuda', '--out', '{out}'), words=('cuda', 'not available'), marks=(NO_CUDA,)),
    Case('dev-cuda-sample', S('--device', 'cuda'), words=('cuda', 'not available'), marks=(NO_CUDA,)),
    Case('dev-foo-tokenizer', T('--device', 'foo', '--out', '{out}'), words=("'foo'",)),
    Case('dev-tpu-prior', P('--device', 'tpu', '--out', '{out}'), words=("'tpu'",)),
    Case('dev-tpu-sample', S('--device', 'tpu'), words=("'tpu'",)),
    Case('dev-foo-demo', ('demo', '--device', 'foo', '--out', '{out}'), words=("'foo'",)),
    Case('dev-tpu-bench', B('--device', 'tpu', '--out', '{out}'), words=("'tpu'",)),
    Case('num-temperature-nan', S('--temperature', 'nan'), words=('temperature', 'nan')),
    Case('num-temperature-inf', S('--temperature', 'inf'), words=('temperature', 'inf')),
    Case('num-guidance-inf', S('--guidance', 'inf'), words=('guidance', 'inf')),
    Case('num-guidance-nan', S('--guidance', 'nan'), words=('guidance', 'nan')),
    Case('num-top-p-nan', S('--top-p', 'nan'), words=('top_p', 'nan')),
    # ---- a pipeline's every stage checked before the first file is deleted (the demo is one run across its stages)
    Case('ow-demo-foreign-file-in-a-stage-folder', ('demo', '--out', '{out}', '--overwrite'),
         demo_copy(lambda d: (d / 'tokenizer' / 'notes.txt').write_text('mine')), words=('tokenizer/notes.txt', 'nothing has been deleted')),
    Case('ow-demo-foreign-file-in-its-data', ('demo', '--out', '{out}', '--overwrite'),
         demo_copy(lambda d: (d / 'data' / 'train' / 'notes.txt').write_text('mine')), words=('data/train/notes.txt', 'nothing has been deleted')),
    Case('ow-demo-own-name-in-a-stage-folder', ('demo', '--out', '{out}', '--overwrite'),
         demo_copy(lambda d: (d / 'prior' / 'prior.safetensors').rename(d / 'prior' / 'mine.safetensors')),
         words=('prior/mine.safetensors',)),
    Case('ow-demo-damaged-stage-manifest', ('demo', '--out', '{out}', '--overwrite'),
         demo_copy(lambda d: truncate(40)(d / 'prior' / 'run.json')), words=('prior/run.json', 'damaged')),
    # ---- late checks: the kind of dataset of --test, the prompts' source, checked before the run folder is made
    Case('late-tokenizer-test-is-cub', T('--out', '{out}', '--test', '{cub}'), needs('cub'), words=('CUB-200', 'MD-MNIST', '--test')),
    Case('late-prior-test-is-cub', P('--out', '{out}', data=('--data', '{train}', '--test', '{cub}')), needs('cub'),
         words=('CUB-200', 'MD-MNIST')),
    Case('late-cub-prior-test-is-mdmnist', P('--out', '{out}', data=('--data', '{cub}', '--test', '{test}')), needs('cub'),
         words=('MD-MNIST', 'CUB-200')),
    Case('late-classifier-test-is-cub', ('train', 'classifier', '--kind', 'cnn', '--data', '{train}', '--test', '{cub}',
                                         '--steps', 2, '--out', '{out}'), needs('cub'), words=('CUB-200',)),
    Case('late-clip-test-is-cub', ('train', 'clip', '--kind', 'vit', '--tokenizer', '{patch}', '--data', '{train}', '--test',
                                   '{cub}', '--steps', 2, '--out', '{out}'), needs('cub'), words=('CUB-200',)),
    Case('late-sample-cub-prior-mdmnist-prompt', S(prior='{cubprior}'), needs('cubprior'), words=('none of its words',)),
    Case('late-sample-cub-prior-mdmnist-data', ('sample', '--prior', '{cubprior}', '--data', '{train}', '--n', 1, '--out',
                                                '{t}/grid.png'), needs('cubprior'), words=('--data', 'MD-MNIST descriptions')),
    Case('late-sample-mdmnist-prior-cub-data', ('sample', '--prior', '{prior}', '--data', '{cub}', '--n', 1, '--out',
                                                '{t}/grid.png'), needs('cub'), words=('--data', 'free-text captions')),
    Case('late-eval-cub-prior', ('eval', '--prior', '{cubprior}', '--n', 4, '--out', '{out}'), needs('cubprior'),
         words=('cubprior',)),
    Case('fp-bench-samplers-clip-of-another-tokenizer', ('bench', 'samplers', '--prior', '{prior}', '--n', 4, '--out', '{out}'),
         words=('CLIP', 'another image tokenizer')),
    # ---- numbers
    Case('num-seed-negative-train', T('--seed', -1, '--out', '{out}'), words=('--seed', '-1')),
    Case('num-seed-beyond-the-generator-train', T('--seed', 2 ** 64, '--out', '{out}'), words=('--seed', 'from 0 to')),
    Case('num-seed-beyond-the-generator-sample', S('--seed', 10 ** 30), words=('--seed', 'from 0 to')),
    Case('num-seed-beyond-the-generator-data', MD('--seed', 2 ** 63, '--out', '{out}'), words=('--seed',)),
    Case('num-seed-not-a-number', S('--seed', 'nan'), words=('--seed', 'whole number')),
    Case('num-steps-beyond-int64', T('--out', '{out}', steps=10 ** 20), words=('--steps', 'out of range')),
    Case('num-n-images-beyond-the-disk', MD('--out', '{out}')[:2] + ('--n', 10 ** 13, '--size', 64, '--out', '{out}'),
         words=('--n', 'on disk')),
    Case('num-n-samples-beyond-memory', S('--n', 10 ** 12), words=('out of memory',)),
    Case('num-batch-beyond-memory-bench', ('bench', 'generate', '--batch-size', 10 ** 12), words=('out of memory',)),
    Case('num-temperature-zero', S('--temperature', 0), words=('temperature', 'top_k=1')),
    Case('num-temperature-negative', S('--temperature', -1), words=('temperature',)),
    Case('num-top-p-above-one', S('--top-p', 2), words=('top_p', '(0, 1]')),
    # ---- text
    Case('txt-prompts-not-utf8', S(prompts='{t}/p.txt'), text_file('p.txt', PROMPT.encode() + b'\n\xff\xfe caf\xe9\n'),
         words=('p.txt', 'not UTF-8', '0xff')),
    Case('txt-prompts-byte-order-mark-and-crlf', S(prompts='{t}/p.txt'), text_file('p.txt', b'\xef\xbb\xbf' + PROMPT.encode() + b'\r\n\r\n'),
         status=0, check=grid_written),
    Case('txt-prompts-only-empty-lines', S(prompts='{t}/p.txt'), text_file('p.txt', b'\n  \n\r\n'), words=('no prompts',)),
    Case('txt-prompts-is-a-folder', S(prompts='{t}'), words=('is a folder',)),
    Case('txt-prompt-very-long', S(prompt=PROMPT * 3000), check=short_line, words=('characters)',)),
    Case('txt-prompt-control-character', S(prompt=PROMPT.replace(' up', ' up\x07', 1)), words=("'up\\x07'",)),
    Case('txt-prompt-empty', S(prompt=''), words=('empty',)),
    # ---- files of the wrong shape
    Case('file-meta-size-not-a-number', T('--out', '{out}', '--data', '{data}'), meta_edit(size='sixty'), words=('meta.json', 'wrong type')),
    Case('file-meta-n-missing', T('--out', '{out}', '--data', '{data}'), meta_edit(n=None), words=('meta.json',)),
    Case('file-meta-not-an-object', T('--out', '{out}', '--data', '{data}'),
         dataset_copy(lambda d: (d / 'meta.json').write_text('[1, 2]')), words=('meta.json',)),
    Case('file-learner-manifest-damaged', ('exercises', '--nbs', '{nbs}', '--out', '{out}', '--overwrite'),
         learner_copies(lambda c: truncate(30)(c['out'] / '.learner_copies.json')), words=('.learner_copies.json', 'damaged')),
    Case('file-learner-manifest-not-a-table', ('exercises', '--nbs', '{nbs}', '--out', '{out}', '--overwrite'),
         learner_copies(lambda c: (c['out'] / '.learner_copies.json').write_text('[1, 2]')), words=('damaged',)),
    Case('file-notebook-not-json', ('exercises', '--nbs', '{nbs}', '--out', '{out}'), bad_notebook('{"cells": [ oops'),
         words=('11_broken.ipynb', 'not a readable notebook')),
    Case('file-notebook-without-cells', ('exercises', '--nbs', '{nbs}', '--out', '{out}'), bad_notebook('{"cells": 3}'),
         words=('11_broken.ipynb', 'not a notebook')),
    Case('ow-mdmnist-foreign-folder-no-overwrite-suggested', MD('--out', '{out}'), foreign_folder, words=('never replaced',)),
    Case('ow-exercises-foreign-folder-no-overwrite-suggested', ('exercises', '--out', '{out}'), foreign_folder,
         words=('did not write',)),
    # ---- leftovers and outputs that are not ours
    Case('left-symlinked-out-overwrite', MD('--out', '{t}/link', '--overwrite'), linked_dataset, status=0, check=link_kept),
    Case('left-sample-overwrite-of-a-user-file', S('--overwrite'), lambda c, s: (c['t'] / 'grid.png').write_text('my picture'),
         words=('grid.png', 'not written by')),
    Case('left-bench-json-of-the-user', ('bench', 'generate', '--json', '{t}/r.json', '--overwrite'),
         lambda c, s: (c['t'] / 'r.json').write_text('{"mine": 1}'), words=('r.json', 'not written by')),
    Case('late-eval-data-cub-for-an-mdmnist-prior', ('eval', '--prior', '{prior}', '--clip', '{clip}', '--data', '{cub}',
                                                     '--n', 4, '--out', '{out}'), needs('clip', 'cub'), words=('--data', 'free-text captions')),
    Case('late-eval-refused-inside-its-run-folder', ('eval', '--prior', '{prior}', '--clip', '{clip}', '--n', 1, '--out', '{out}'),
         needs('clip'), words=('--n', 'at least 2')),  # a check made after the folder opened: the folder goes again
    Case('args-grad-accum-on-a-contrastive-loss', ('train', 'clip', '--kind', 'vit', '--tokenizer', '{patch}', '--data', '{train}',
                                                   '--test', '{test}', '--steps', 2, '--batch-size', 8, '--grad-accum', 2, '--out', '{out}'),
         words=('--grad-accum 2', 'negatives')),
    # ---- warnings: the run goes on, with one line
    Case('warn-test-is-the-training-data', T('--out', '{out}', '--test', '{train}'), status=0,
         check=warned('--test is the training data'), snapshot=False),
    Case('warn-held-out-pairs-the-prior-was-trained-on', ('eval', '--prior', '{prior}', '--clip', '{clip}', '--holdout', '7r',
                                                          '--n', 4, '--out', '{out}'), needs('clip'), status=0,
         check=warned('held-out pairs', '7r'), snapshot=False),
    # ---- Ctrl-C
    Case('sig-ctrl-c-while-importing', S(), interrupt='startup', status=130),
    Case('sig-ctrl-c-while-writing-a-dataset', MD('--out', '{out}')[:2] + ('--n', 40000, '--size', 64, '--out', '{out}'),
         interrupt='appears:.out.partial-*', status=130),
    Case('sig-ctrl-c-while-timing-lessons', ('lessons', '--time', '10_gumbel', '13_vqvae', '14_tokenizer_training', '24_sampling'), interrupt='after:6',
         status=130),  # notebook cells run in-process: Ctrl-C in a cell must stop the command, not be recorded as its error
    # ---- locks: a second writer while the first holds the folder
    Case('lock-second-writer-resume', T('--out', '{out}', '--resume', steps=400), busy_writer, words=('another process',),
         check=writer_untouched, snapshot=False),
    Case('lock-second-writer-overwrite', T('--out', '{out}', '--overwrite'), busy_writer, words=('another process',),
         check=writer_untouched, snapshot=False),
]


def _importing_torch(pid: int) -> bool:
    "Whether the process has begun to load torch's libraries (it is importing the library, not yet running)."
    try: return 'libtorch' in Path(f'/proc/{pid}/maps').read_text()
    except OSError: return False


def interrupted(args, when: str, t: Path) -> subprocess.CompletedProcess:
    "Run the command and send it Ctrl-C at `when` ('startup': as torch loads; 'appears:GLOB': once GLOB exists in t)."
    proc = subprocess.Popen([sys.executable, '-m', 'dalle_course.cli', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)
    try:
        t0 = time.time()
        ready = ((lambda: _importing_torch(proc.pid)) if when == 'startup'
                 else (lambda: time.time() - t0 > float(when[6:])) if when.startswith('after:')
                 else (lambda: bool(list(t.glob(when.split(':', 1)[1])))))
        while not ready():
            assert proc.poll() is None, f'the command ended before {when}: {proc.stderr.read()[-2000:]}'
            assert time.time() - t0 < 120, f'no {when} after 120 s'
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize('case', [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_policy(case, shared, tmp_path):
    c = dict(shared.names(), t=tmp_path, out=tmp_path / 'out', cleanup=[])
    try:
        case.setup(c, shared)
        fmt = lambda a: str(a).format(**c)
        roots = (tmp_path, shared.root)
        before = snapshot(*roots) if case.snapshot else {}
        args = list(map(fmt, case.argv))
        p = c['proc'] = cli(*args) if case.interrupt is None else interrupted(args, case.interrupt, tmp_path)
        after = snapshot(*roots) if case.snapshot else {}
        assert 'Traceback' not in p.stderr, p.stderr[-3000:]
        allowed = case.status if isinstance(case.status, tuple) else (case.status,)
        assert p.returncode in allowed, (p.returncode, p.stderr[-3000:])
        if p.returncode == 2: one_line_error(p, *map(fmt, case.words))
        if p.returncode == 130: assert p.stderr.strip().splitlines()[-1] == 'dalle-course: interrupted', p.stderr[-2000:]
        if p.returncode == 2 and re.search(r'(pass|add) (--resume or )?--overwrite', p.stderr) and '--resume' not in args:
            q = cli(*args, '--overwrite')  # a fix the message suggests must work
            assert q.returncode == 0, ('the suggested --overwrite is refused', p.stderr, q.stderr[-2000:])
        stray = [k for k in diff(before, after)['new'] if any(s in Path(k).name for s in STRAY)]
        assert not stray, stray
        case.check(c, before, after)
    finally:
        for f in c['cleanup']: f()


def test_table_covers_every_group():
    groups = {}
    for c in CASES: groups[c.id.split('-')[0]] = groups.get(c.id.split('-')[0], 0) + 1
    need = dict(args=8, data=6, out=6, ow=8, fp=4, dmg=8, dev=3, num=15, lock=1, late=8, txt=6, file=6, left=3, warn=2, sig=2)
    assert all(groups.get(g, 0) >= n for g, n in need.items()), groups
    assert len(CASES) >= 127 and len({c.id for c in CASES}) == len(CASES)  # 87 before the reliability cases


# ---------------------------------------------------------------- Ctrl-C, kill -9, and a killed dataset
def _default_sigint():
    "In the child, before exec: Ctrl-C acts as in a terminal (a shell's background job inherits SIGINT ignored)."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args, err: Path):
    return subprocess.Popen([sys.executable, '-m', 'dalle_course.cli', *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=err.open('w'), env=dict(os.environ, OMP_NUM_THREADS='1'), preexec_fn=_default_sigint)


def _assert_same_tokenizer(a: Path, b: Path):
    ta, tb = load_file(str(a / 'tokenizer.safetensors')), load_file(str(b / 'tokenizer.safetensors'))
    assert ta.keys() == tb.keys()
    for k in ta: assert torch.equal(ta[k], tb[k]), k


def _no_leftovers(out: Path):
    for p in out.rglob('*'):
        assert not any(s in p.name for s in STRAY), p
        assert not p.is_file() or p.stat().st_size > 0, f'{p} is empty'


@pytest.mark.parametrize('how', ['sigint', 'kill9'])
def test_interrupted_run_resumes_to_the_uninterrupted_result(how, shared, tmp_path):
    ref, out = shared.ref, tmp_path / 'run'
    args = long_tokenizer_args(shared, out)
    proc = _popen(args, tmp_path / 'stderr.txt')
    try:
        wait_for(out / 'checkpoint.safetensors', proc)  # a few steps in: the first checkpoint is on disk
        if how == 'sigint': proc.send_signal(signal.SIGINT)
        else: proc.kill()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    err = (tmp_path / 'stderr.txt').read_text()
    if how == 'sigint':
        assert rc == 130 and 'Traceback' not in err and err.strip().splitlines()[-1] == 'dalle-course: interrupted', err
        assert not folder_locked(out)  # Ctrl-C releases the folder
    else: assert rc == -signal.SIGKILL
    step = read_checkpoint_meta(out / 'checkpoint.safetensors')['step']
    assert 0 < step < LONG_STEPS and (out / 'run.json').is_file() and not (out / 'tokenizer.safetensors').exists()
    p = cli(*args, '--resume')
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / 'eval.json').read_text())['steps'] == LONG_STEPS
    _assert_same_tokenizer(out, ref)
    _no_leftovers(out)
    assert files_of(out) == files_of(ref)


def test_killed_dataset_generation_leaves_a_hidden_folder_the_next_run_removes(shared, tmp_path):
    out = tmp_path / 'ds'
    proc = _popen(['data', 'mdmnist', '--n', 40000, '--size', 64, '--out', out], tmp_path / 'stderr.txt')
    try:
        t0 = time.time()
        while not list(tmp_path.glob('.ds.partial-*')):
            assert proc.poll() is None, 'data mdmnist ended before its work folder appeared'
            assert time.time() - t0 < 120
            time.sleep(0.005)
        proc.kill()
        assert proc.wait(60) == -signal.SIGKILL  # reaped: its pid is dead, so its folder is stale
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    partial = list(tmp_path.glob('.ds.partial-*'))
    assert len(partial) == 1 and partial[0].is_dir() and not out.exists()
    other = cli('data', 'mdmnist', '--n', 5, '--size', 64, '--out', tmp_path / 'elsewhere')  # another --out: not its job
    assert other.returncode == 0 and partial[0].exists()
    p = cli('data', 'mdmnist', '--n', 5, '--size', 64, '--out', out)
    assert p.returncode == 0, p.stderr
    assert not partial[0].exists() and not [q for q in tmp_path.iterdir() if q.name.startswith('.')]
    assert len((out / 'captions.txt').read_text().splitlines()) == 5
