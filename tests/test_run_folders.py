"""The run-folder and bad-input policy of every `dalle-course` command, as one table of cases.

Each case prepares files in a fresh `tmp_path`, runs one command, and checks: the exit status; for a failure,
exactly one stderr line (no traceback) holding the expected words; and what is left on disk (by default: nothing
changed at all, in `tmp_path` and in the shared fixtures). Kills, Ctrl-C and concurrent writers follow the table."""
import hashlib, json, os, pickle, random, shutil, signal, subprocess, sys, time
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
    def ref(self) -> Path:  # the uninterrupted twin of the interrupted and killed runs
        return self._run('ref', *long_tokenizer_args(self))

    def names(self) -> dict:
        r = self.root
        return dict(train=r / 'train', test=r / 'test', big=r / 'big', patch=r / 'patch.safetensors',
                    patch2=r / 'patch2.safetensors', tok=r / 'tok', prior=r / 'prior')


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


def T(*a, kind='vqvae', steps=2):
    return ('train', 'tokenizer', '--kind', kind, '--data', '{train}', '--test', '{test}', '--steps', steps, *a)


def P(*a, arch='joint', tok='{patch}', data=('--data', '{train}', '--test', '{test}')):
    return ('train', 'prior', '--arch', arch, '--tokenizer', tok, *data, '--steps', 2, '--batch-size', 4, *a)


def S(*a, prior='{prior}'):
    return ('sample', '--prior', prior, '--prompt', PROMPT, '--n', 1, *a, '--out', '{t}/grid.png')


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
         words=('grid.png', '--overwrite')),
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
    # ---- locks: a second writer while the first holds the folder
    Case('lock-second-writer-resume', T('--out', '{out}', '--resume', steps=400), busy_writer, words=('another process',),
         check=writer_untouched, snapshot=False),
    Case('lock-second-writer-overwrite', T('--out', '{out}', '--overwrite'), busy_writer, words=('another process',),
         check=writer_untouched, snapshot=False),
]


@pytest.mark.parametrize('case', [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_policy(case, shared, tmp_path):
    c = dict(shared.names(), t=tmp_path, out=tmp_path / 'out', cleanup=[])
    try:
        case.setup(c, shared)
        fmt = lambda a: str(a).format(**c)
        roots = (tmp_path, shared.root)
        before = snapshot(*roots) if case.snapshot else {}
        p = c['proc'] = cli(*map(fmt, case.argv))
        after = snapshot(*roots) if case.snapshot else {}
        assert 'Traceback' not in p.stderr, p.stderr[-3000:]
        allowed = case.status if isinstance(case.status, tuple) else (case.status,)
        assert p.returncode in allowed, (p.returncode, p.stderr[-3000:])
        if p.returncode == 2: one_line_error(p, *map(fmt, case.words))
        stray = [k for k in diff(before, after)['new'] if any(s in Path(k).name for s in STRAY)]
        assert not stray, stray
        case.check(c, before, after)
    finally:
        for f in c['cleanup']: f()


def test_table_covers_every_group():
    groups = {}
    for c in CASES: groups[c.id.split('-')[0]] = groups.get(c.id.split('-')[0], 0) + 1
    need = dict(args=8, data=6, out=6, ow=4, fp=3, dmg=8, dev=3, num=3, lock=1)
    assert all(groups.get(g, 0) >= n for g, n in need.items()), groups
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


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
