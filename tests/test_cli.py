"""The `dalle-course` command as a user types it."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def dc(*args, cwd=None):
    exe = Path(sys.executable).parent / 'dalle-course'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'dalle_course.cli']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd or ROOT, env=env,
                          timeout=300)


def test_help_lists_subcommands():
    r = dc('--help')
    assert r.returncode == 0 and 'data' in r.stdout and 'exercises' in r.stdout
    assert 'eval' in r.stdout
    for sub in (['data', '--help'], ['data', 'mdmnist', '--help'], ['exercises', '--help'], ['eval', '--help'],
                ['train', 'clip', '--help']):
        r = dc(*sub)
        assert r.returncode == 0 and 'usage' in r.stdout, sub
    assert '--overwrite' in dc('data', 'mdmnist', '--help').stdout


def test_data_mdmnist_writes_a_split(tmp_path):
    out = tmp_path / 'md'
    r = dc('data', 'mdmnist', '--n', 40, '--seed', 1, '--size', 64, '--split', 'test', '--out', out)
    assert r.returncode == 0, r.stderr
    assert 'images/s' in r.stdout
    assert {p.name for p in out.iterdir()} >= {'images.npy', 'captions.txt', 'attributes.npy', 'meta.json'}
    imgs = np.load(out / 'images.npy', mmap_mode='r')
    assert imgs.shape == (40, 64, 64, 3) and imgs.dtype == np.uint8
    caps = (out / 'captions.txt').read_text().splitlines()
    assert len(caps) == 40 and all(len(c.split()) == 12 for c in caps)
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['split'] == 'test' and meta['seed'] == 1 and meta['size'] == 64
    # same command, same seed: identical bytes; --overwrite replaces
    r = dc('data', 'mdmnist', '--n', 40, '--seed', 1, '--size', 64, '--split', 'test', '--out', tmp_path / 'md2')
    assert r.returncode == 0 and (tmp_path / 'md2' / 'images.npy').read_bytes() == (out / 'images.npy').read_bytes()
    r = dc('data', 'mdmnist', '--n', 10, '--size', 64, '--out', out, '--overwrite')
    assert r.returncode == 0 and np.load(out / 'images.npy').shape[0] == 10


BAD = {
    'n zero': (['--n', '0'], '--n'),
    'n negative': (['--n', '-3'], '--n'),
    'n not a number': (['--n', 'ten'], '--n'),
    'size unsupported': (['--size', '100'], '64 or 128'),
    'split unknown': (['--split', 'val'], '--split'),
    'mnist unreadable': (['--mnist', '/nonexistent/mnist'], '/nonexistent/mnist'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case):
    extra, needle = BAD[case]
    out = tmp_path / 'out'
    r = dc('data', 'mdmnist', '--n', 5, '--out', out, *extra)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('dalle-course') and needle in lines[0], r.stderr
    assert 'Traceback' not in r.stderr and not out.exists() and os.listdir(tmp_path) == []


def test_non_empty_output_refused_and_left_alone(tmp_path):
    (tmp_path / 'keep.txt').write_text('mine')
    r = dc('data', 'mdmnist', '--n', 5, '--out', tmp_path)
    # a folder of the user's is never replaced, so the one line does not suggest --overwrite (it would be refused)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'never replaced' in r.stderr
    assert '--overwrite' not in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ['keep.txt']


def test_missing_subcommand_and_unknown_command():
    for args in ([], ['data'], ['frobnicate']):
        r = dc(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_exercises_command(tmp_path):
    r = dc('exercises', '--out', tmp_path / 'course', '--nbs', ROOT / 'nbs')
    assert r.returncode == 0, r.stderr
    from dalle_course.exercises import NOT_COPIED
    assert {p.name for p in (tmp_path / 'course').glob('*.ipynb')} == {p.name for p in (ROOT / 'nbs').glob('*.ipynb')} - set(NOT_COPIED)
    assert 'exercises' in r.stdout
    r = dc('exercises', '--out', tmp_path / 'course', '--nbs', ROOT / 'nbs')
    assert r.returncode == 2 and '--overwrite' in r.stderr
    r = dc('exercises', '--out', tmp_path / 'x', '--nbs', tmp_path / 'empty')
    assert r.returncode == 2 and 'no notebooks' in r.stderr


def test_train_command_under_torchrun_with_gradient_accumulation(tmp_path):
    "A training command as typed under torchrun (2 Gloo processes on the CPU): rank 0 writes the run, the other rank nothing."
    import os, subprocess, sys
    from dalle_course.cli import main
    assert main(['data', 'mdmnist', '--n', '48', '--seed', '0', '--size', '64', '--split', 'train', '--out', str(tmp_path / 'train')]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', TMPDIR=str(tmp_path / 'tmp'))
    (tmp_path / 'tmp').mkdir()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', '-m', 'dalle_course.cli',
           'train', 'tokenizer', '--kind', 'vqvae', '--data', str(tmp_path / 'train'), '--preset', 'tiny', '--steps', '3',
           '--batch-size', '8', '--grad-accum', '2', '--out', str(tmp_path / 'run')]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('codebook usage') == 1  # one report
    recipe = json.loads((tmp_path / 'run' / 'recipe.json').read_text())
    assert recipe['train']['grad_accum'] == 2 and recipe['train']['batch_size'] == 8
    steps = [json.loads(l)['step'] for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines() if '"train"' in l]
    assert steps and steps == sorted(set(steps)) and steps[-1] == 3  # one writer: each logged step once
    assert (tmp_path / 'run' / 'tokenizer.safetensors').is_file() and not list((tmp_path / 'tmp').glob('dalle-course-rank-*'))  # scratch removed
    # a batch that does not split over 2 processes x 3 micro-batches: one line, exit 2, nothing written
    r = subprocess.run(cmd[:-6] + ['--batch-size', '8', '--grad-accum', '3', '--out', str(tmp_path / 'bad')], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and 'multiple of 6' in r.stderr and not (tmp_path / 'bad').exists()
