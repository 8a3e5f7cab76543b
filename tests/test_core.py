"""dalle_course.core as a user calls it."""
import os, random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dalle_course import core
from dalle_course.core import (InputError, get_device, image_grid, load_checkpoint, pack_state, read_checkpoint_meta,
                               save_checkpoint, seed_everything, to_uint8_hwc, unpack_state)


def test_seed_everything_repeats_all_generators():
    seed_everything(3); a = (random.random(), np.random.rand(), torch.rand(2), torch.randn(2))
    seed_everything(3); b = (random.random(), np.random.rand(), torch.rand(2), torch.randn(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_device_choice_on_cpu():
    assert get_device('cpu').type == 'cpu'
    if not torch.cuda.is_available():
        assert get_device().type in ('cpu', 'mps')
        with pytest.raises(ValueError, match='CUDA is not available'):
            get_device('cuda')


def test_autocast_is_off_on_cpu():
    with core.autocast('cpu'):
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.float32


def test_checkpoint_round_trip_full_training_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(2):
        opt.zero_grad(); model(torch.randn(5, 4)).pow(2).mean().backward(); opt.step()
    state = {'model': model.state_dict(), 'optim': opt.state_dict(),
             'rng': {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}}
    p = save_checkpoint(tmp_path / 'run' / 'ck.safetensors', state, config={'depth': 2, 'name': 'x'}, step=2)
    ck = load_checkpoint(p)
    assert ck['step'] == 2 and ck['config'] == {'depth': 2, 'name': 'x'}
    assert read_checkpoint_meta(p) == {'config': {'depth': 2, 'name': 'x'}, 'step': 2}
    for k, v in model.state_dict().items(): assert torch.equal(ck['state']['model'][k], v)
    # the optimizer state loads into a fresh optimizer and continues identically
    m2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    m2.load_state_dict(ck['state']['model']); o2 = torch.optim.AdamW(m2.parameters(), lr=3e-4)
    o2.load_state_dict(ck['state']['optim'])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (m2, o2)):
        o.zero_grad(); m(x).pow(2).mean().backward(); o.step()
    for a, b in zip(model.parameters(), m2.parameters()): assert torch.equal(a, b)
    assert torch.equal(ck['state']['rng']['torch'], state['rng']['torch'])
    assert ck['state']['rng']['python'] == random.getstate()
    assert set(load_file(p)) >= {f'model/{k}' for k in model.state_dict()}


def test_checkpoint_shared_tensors_and_bad_values(tmp_path):
    w = torch.randn(3, 3)
    p = save_checkpoint(tmp_path / 'c.safetensors', {'a': w, 'b': w, 'view': w[1]})
    st = load_checkpoint(p)['state']
    assert torch.equal(st['a'], w) and torch.equal(st['b'], w) and torch.equal(st['view'], w[1])
    with pytest.raises(TypeError, match='cannot store'):
        save_checkpoint(tmp_path / 'd.safetensors', {'f': object()})
    assert not (tmp_path / 'd.safetensors').exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    p = save_checkpoint(tmp_path / 'c.safetensors', {'x': torch.ones(3)}, step=1)
    before = p.read_bytes()
    def crash(tensors, filename, metadata=None):
        with open(filename, 'wb') as f: f.write(b'half')
        raise OSError('simulated crash')
    monkeypatch.setattr(core, 'save_file', crash)
    with pytest.raises(OSError):
        save_checkpoint(p, {'x': torch.zeros(3)}, step=2)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ['c.safetensors']
    assert load_checkpoint(p)['step'] == 1


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / 'none.safetensors')
    from safetensors.torch import save_file
    save_file({'w': torch.ones(1)}, str(tmp_path / 'foreign.safetensors'))
    with pytest.raises(ValueError, match='not a dalle_course checkpoint'):
        load_checkpoint(tmp_path / 'foreign.safetensors')


def test_pack_state_int_keys_and_tuples():
    obj = {'s': {0: {'step': torch.tensor(3.0)}, 1: {}}, 't': (1, 'a', [2.5, None])}
    t, sk = pack_state(obj)
    back = unpack_state(t, sk)
    assert back['t'] == (1, 'a', [2.5, None]) and list(back['s']) == [0, 1]
    assert torch.equal(back['s'][0]['step'], torch.tensor(3.0))


def test_image_layouts_and_grid():
    f = torch.rand(3, 3, 5, 7)
    u = to_uint8_hwc(f)
    assert u.shape == (3, 5, 7, 3) and u.dtype == np.uint8
    expect = np.round(f.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    assert np.abs(u.astype(int) - expect.astype(int)).max() <= 1
    fig = image_grid(f, ['a', 'b', 'c'], ncols=2)
    assert len([ax for ax in fig.axes if ax.images]) == 3 and fig.axes[0].get_title() == 'a'


def test_input_error_is_value_error():
    assert issubclass(InputError, ValueError)


# ---- the one model registry
def test_registry_names_every_library_class_and_imports_it_on_first_use():
    import importlib, subprocess, sys
    from dalle_course.core import MODELS, model_class
    # every entry names a real class of the package whose role and kind agree with the table
    for role, kinds in MODELS.items():
        for kind, c in kinds.items():
            cls = model_class(role, kind)
            assert isinstance(cls, type) and cls.__module__.startswith('dalle_course.') and cls.role == role, (role, kind)
    with pytest.raises(InputError, match="unknown prior kind 'gpt'"): model_class('prior', 'gpt')
    # importing the core imports no model module: nothing registers itself as a side effect of an import
    code = ("import sys, dalle_course.core as c; assert not any(m in sys.modules for m in "
            "('dalle_course.prior', 'dalle_course.paella', 'dalle_course.clip')); "
            "assert c.model_class('prior', 'maskgit').__name__ == 'MaskGITPrior'; print('ok')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr


def test_files_of_unregistered_classes_load_only_where_the_class_is_known(tmp_path):
    import subprocess, sys
    from dalle_course.core import MODELS, load_model, save_model, model_class
    from dalle_course.image_tokenizer import PatchColourTokenizer

    class MyTokenizer(PatchColourTokenizer):  # a learner's own class, defined in a notebook or a script
        pass

    p = save_model(MyTokenizer(image_size=16, patch=8, levels=2), tmp_path / 'mine.safetensors')
    assert type(load_model(p, 'image_tokenizer')) is MyTokenizer                     # this session: loads back
    assert model_class('image_tokenizer', 'patch-colour') is PatchColourTokenizer     # the library's kind is untouched
    with pytest.raises(InputError, match='holds an image tokenizer, not a prior'): load_model(p, 'prior')
    code = f"from dalle_course.core import load_model; load_model({str(p)!r}, 'image_tokenizer')"  # another session
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode != 0 and 'is not a dalle_course image tokenizer' in r.stderr


@pytest.mark.parametrize('bad', [-1, 2 ** 63, 10 ** 30, 1.5, '3', True, None])
def test_seeds_out_of_the_generators_range_are_one_line(bad):
    with pytest.raises(InputError, match='seed must be a whole number from 0 to'): seed_everything(bad)
    for ok in (0, 2 ** 63 - 1, np.int64(7)): seed_everything(ok)


def test_abbrev_keeps_a_quoted_input_short():
    assert core.abbrev('7 30 r up') == "'7 30 r up'"
    long = core.abbrev('x' * 100_000, 40)
    assert len(long) < 80 and long.endswith('(100000 characters)')


def test_a_failed_safetensors_write_is_an_oserror_naming_the_file(tmp_path):
    "A run folder that vanishes or cannot be written mid-run: the CLI turns OSError into one line (safetensors raises its own type)."
    from safetensors import SafetensorError
    target = tmp_path / 'gone' / 'x.safetensors'  # its folder does not exist: safetensors itself cannot write there
    with pytest.raises(SafetensorError): __import__('safetensors.torch', fromlist=['save_file']).save_file({'a': torch.zeros(1)}, str(target))
    with pytest.raises(OSError) as e: core.save_safetensors({'a': torch.zeros(1)}, target)
    assert e.value.filename == str(target) and not target.exists()


# ---- bf16 on the CPU, and threads on a shared machine

def test_cpu_bf16_turns_autocast_on_and_off(monkeypatch):
    monkeypatch.setattr(core, 'cpu_bf16_supported', lambda: True)
    try:
        core.set_cpu_bf16(True)
        assert core.cpu_bf16()
        with core.autocast('cpu'):
            assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.bfloat16
        with core.autocast('cpu', enabled=False):  # a Learner with amp=False stays fp32
            assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.float32
    finally: core.set_cpu_bf16(False)
    with core.autocast('cpu'):
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.float32


def test_cpu_bf16_refused_without_bf16_arithmetic(monkeypatch):
    monkeypatch.setattr(core, 'cpu_bf16_supported', lambda: False)
    with pytest.raises(InputError, match='no bf16 arithmetic.*drop --bf16'): core.set_cpu_bf16(True)
    assert not core.cpu_bf16()
    core.set_cpu_bf16(False)  # turning it off is always fine


def test_cli_bf16_is_refused_in_one_line_and_left_as_found(monkeypatch, tmp_path, capsys):
    from dalle_course.cli import main
    monkeypatch.setattr(core, 'cpu_bf16_supported', lambda: False)
    out = tmp_path / 'g.png'
    assert main(['sample', '--prior', 'demo_64', '--prompt', '7 30 r up 2 20 w down 9 40 g middle', '--n', '1',
                 '--out', str(out), '--device', 'cpu', '--bf16']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'drop --bf16' in err and not out.exists()
    monkeypatch.setattr(core, 'cpu_bf16_supported', lambda: True)
    seen = []
    import dalle_course.pipeline as pl
    real = pl.Pipeline.__call__
    monkeypatch.setattr(pl.Pipeline, '__call__', lambda self, *a, **k: (seen.append(core.cpu_bf16()), real(self, *a, **k))[1])
    assert main(['sample', '--prior', 'demo_64', '--prompt', '7 30 r up 2 20 w down 9 40 g middle', '--n', '1',
                 '--out', str(out), '--device', 'cpu', '--bf16']) == 0
    assert seen == [True] and not core.cpu_bf16()  # on while the command ran, off again after it


def test_usable_cores_reads_cgroup_quotas(tmp_path):
    n = len(os.sched_getaffinity(0))
    assert core.usable_cores(tmp_path) == n                       # no cgroup files: the affinity
    (tmp_path / 'cpu.max').write_text('max 100000\n')
    assert core.usable_cores(tmp_path) == n                       # v2, no quota
    (tmp_path / 'cpu.max').write_text('50000 100000\n')
    assert core.usable_cores(tmp_path) == 1                       # half a core: still one thread
    (tmp_path / 'cpu.max').unlink(); (tmp_path / 'cpu').mkdir()
    (tmp_path / 'cpu/cpu.cfs_quota_us').write_text('100000\n'); (tmp_path / 'cpu/cpu.cfs_period_us').write_text('100000\n')
    assert core.usable_cores(tmp_path) == 1                       # v1: one core's worth
    (tmp_path / 'cpu/cpu.cfs_quota_us').write_text('-1\n')
    assert core.usable_cores(tmp_path) == n


def test_free_cores_counts_this_process_as_free():
    free = core.free_cores(0.2)
    if free is None: pytest.skip('no /proc/stat here')
    n = len(os.sched_getaffinity(0))
    assert 0 <= free <= n
    import threading
    stop = None
    def spin():
        while not stop: pass
    stop = False; t = threading.Thread(target=spin); t.start()
    try: busy_self = core.free_cores(0.3)   # our own busy thread is ours, not someone else's
    finally: stop = True; t.join()
    assert busy_self >= min(free, 1.0) - 0.35, (free, busy_self)


def test_set_threads_follows_free_cores_and_says_so_once(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False); monkeypatch.delenv('DALLE_COURSE_THREADS', raising=False)
    monkeypatch.setattr(core, '_TORCH_THREADS', 4); monkeypatch.setattr(core, '_THREADS_SAID', None)
    monkeypatch.setattr(core, '_THREADS_SET', None); monkeypatch.setattr(core, 'usable_cores', lambda: 4)
    torch.set_num_threads(4)  # as PyTorch would start on four cores
    try:
        monkeypatch.setattr(core, 'free_cores', lambda window=0.1: 1.1)   # three of four cores busy elsewhere
        assert core.set_threads() == 1 == torch.get_num_threads()
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and 'using 1 CPU thread: 3 of 4 cores busy' in err and 'OMP_NUM_THREADS' in err
        assert core.set_threads() == 1 and capsys.readouterr().err == ''  # said once
        monkeypatch.setattr(core, 'free_cores', lambda window=0.1: 2.8)   # a core counts when 3/4 of it is free
        assert core.set_threads() == 3 and 'using 3 CPU threads: 1 of 4' in capsys.readouterr().err  # a new count: said
        monkeypatch.setattr(core, 'free_cores', lambda window=0.1: 3.7)
        assert core.set_threads(max_age=60) == 3                        # measured a moment ago: kept
        assert core.set_threads() == 3                                  # 0.7 of the fourth core free: not enough
        monkeypatch.setattr(core, 'free_cores', lambda window=0.1: 3.8)
        assert core.set_threads() == 4 and capsys.readouterr().err == ''  # all free again: PyTorch's default, nothing to say
        torch.set_num_threads(3)                                          # the user's own choice
        assert core.set_threads() == 3 and torch.get_num_threads() == 3  # stands
        torch.set_num_threads(4)
        monkeypatch.setattr(core, 'free_cores', lambda window=0.1: None)  # cannot tell (not Linux): PyTorch's default
        assert core.set_threads() == 4
        monkeypatch.setattr(core, 'usable_cores', lambda: 2)              # a container of 2 CPUs
        assert core.set_threads(say=False) == 2 and capsys.readouterr().err == ''
        monkeypatch.setenv('OMP_NUM_THREADS', '3'); torch.set_num_threads(3)
        monkeypatch.setattr(core, 'free_cores', lambda window=0.1: 1.0)
        assert core.set_threads() == 3                                  # the user's count stands
        monkeypatch.setenv('DALLE_COURSE_THREADS', '2')
        assert core.set_threads() == 2
        monkeypatch.setenv('DALLE_COURSE_THREADS', 'two')
        with pytest.raises(InputError, match='DALLE_COURSE_THREADS'): core.set_threads()
    finally: torch.set_num_threads(before)


def test_a_bad_thread_count_never_breaks_an_import(tmp_path):
    import subprocess, sys
    env = {**os.environ, 'DALLE_COURSE_THREADS': 'abc'}; env.pop('OMP_NUM_THREADS', None)
    r = subprocess.run([sys.executable, '-c', 'import dalle_course.pipeline, dalle_course.core as c; print(c.torch.get_num_threads())'],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == '', r.stderr


def test_threads_measured_silently_on_import_are_said_by_the_next_caller(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False); monkeypatch.delenv('DALLE_COURSE_THREADS', raising=False)
    monkeypatch.setattr(core, '_TORCH_THREADS', 2); monkeypatch.setattr(core, '_THREADS_SAID', None)
    monkeypatch.setattr(core, '_THREADS_SET', None); torch.set_num_threads(2)
    monkeypatch.setattr(core, 'usable_cores', lambda: 2); monkeypatch.setattr(core, 'free_cores', lambda window=0.1: 1.0)
    try:
        assert core.set_threads(say=False) == 1 and capsys.readouterr().err == ''   # as on import
        monkeypatch.setattr(core, 'free_cores', lambda window=0.1: 2.0)            # would say 2 if it measured again
        assert core.set_threads(max_age=60) == 1                                   # as a pipeline draws, moments later
        assert 'using 1 CPU thread: 1 of 2 cores busy' in capsys.readouterr().err
    finally: torch.set_num_threads(before)
