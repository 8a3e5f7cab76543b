"The shared machinery: run folders, recipes and the preset->steps function, the model registry, the dataset protocol."
import json, math, os
from pathlib import Path

import pytest
import torch

from dalle_course.core import (InputError, load_model, model_fingerprint, read_json, save_checkpoint, save_model)
from dalle_course.runs import FILES, Recipe, RunFolder, merge_overrides, read_manifest, resolve_train, steps_per_epoch


def listing(p):
    return sorted(str(q.relative_to(p)) for q in p.rglob('*') if q.is_file())


# ---- run folders
def test_fresh_folder_records_every_file_written(tmp_path):
    out = tmp_path / 'run'
    import fcntl
    def locked():
        fd = os.open(out, os.O_RDONLY)
        try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.flock(fd, fcntl.LOCK_UN); return False
        except OSError: return True
        finally: os.close(fd)
    with RunFolder(out, 'train x') as rf:
        rf.file('recipe').write_text('{}'); rf.file('sub/notes.txt').write_text('n')
        assert locked()                                       # the folder itself is locked while open
    assert not locked()                                       # and released on close (no lock file is left)
    m = read_manifest(out)
    assert m['command'] == 'train x' and m['files'] == ['recipe.json', 'sub/notes.txt']


@pytest.mark.parametrize('kw,words', [({}, ['not empty', '--overwrite']), ({'resume': True, 'overwrite': True}, ['contradict'])])
def test_used_folder_refused_without_writing(tmp_path, kw, words):
    out = tmp_path / 'run'
    with RunFolder(out, 'train x') as rf: rf.file('recipe').write_text('{}')
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    with pytest.raises(InputError) as e: RunFolder(out, 'train x', **kw).open()
    assert all(w in str(e.value) for w in words), e.value
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before


def test_overwrite_deletes_only_what_the_run_wrote(tmp_path):
    out = tmp_path / 'run'
    with RunFolder(out, 'train x') as rf:
        rf.file('recipe').write_text('{}'); rf.file('sub/a.txt').write_text('a')
        (rf.child('child') / 'x').parent.mkdir(parents=True)
    with RunFolder(out / 'child', 'train y') as c: c.file('model.bin').write_text('m')
    (out / 'mine.txt').write_text('keep'); (out / 'sub' / 'mine.txt').write_text('keep too')
    with RunFolder(out, 'train x', overwrite=True):
        assert listing(out) == ['mine.txt', 'run.json', 'sub/mine.txt']  # ours (the child's too) gone, the user's kept
    assert (out / 'mine.txt').read_text() == 'keep' and (out / 'sub' / 'mine.txt').read_text() == 'keep too'


def test_foreign_files_are_never_deleted(tmp_path):
    (tmp_path / 'canary').write_text('c'); (tmp_path / 'notes').mkdir(); (tmp_path / 'notes' / 'n').write_text('n')
    for kw in ({}, {'overwrite': True}, {'resume': True}):
        with pytest.raises(InputError, match='did not write'): RunFolder(tmp_path, 'demo', **kw).open()
    assert listing(tmp_path) == ['canary', 'notes/n']


def test_other_command_and_missing_resume(tmp_path):
    with RunFolder(tmp_path / 'a', 'train x'): pass
    with pytest.raises(InputError, match='`train x` run, not a `train y`'):
        RunFolder(tmp_path / 'a', 'train y', overwrite=True).open()
    with pytest.raises(InputError, match='no run to resume'): RunFolder(tmp_path / 'b', 'train x', resume=True).open()
    assert not (tmp_path / 'b').exists()
    (tmp_path / 'f').write_text('x')
    with pytest.raises(InputError, match='is a file'): RunFolder(tmp_path / 'f', 'train x').open()


def test_a_second_writer_is_locked_out(tmp_path):
    out = tmp_path / 'run'
    with RunFolder(out, 'train x') as rf:
        rf.file('recipe').write_text('{}')
        with pytest.raises(InputError, match='another process'): RunFolder(out, 'train x', resume=True).open()
        assert read_manifest(out)['files'] == ['recipe.json']   # the refused writer wrote nothing
    with RunFolder(out, 'train x', resume=True) as rf2: assert rf2.resumed   # free again once the first closed


def test_resume_checks_input_fingerprints_and_recipe(tmp_path):
    out = tmp_path / 'run'
    r = Recipe('prior', 'joint', 'tiny', 10, {'image_vocab': 64}, {'steps': 5, 'batch_size': 2})
    with RunFolder(out, 'train prior', inputs={'image_tokenizer': 'aaaa'}) as rf: r.save(rf.file('recipe'))
    with pytest.raises(InputError, match='another image tokenizer'):
        RunFolder(out, 'train prior', resume=True, inputs={'image_tokenizer': 'bbbb'}).open()
    same = [(('kind',), '--arch'), (('model', 'image_vocab'), 'codebook size')]
    rf = RunFolder(out, 'train prior', resume=True, inputs={'image_tokenizer': 'aaaa'})
    with pytest.raises(InputError, match='--arch joint'):
        rf.prepare(Recipe('prior', 'separate', 'tiny', 10, {'image_vocab': 64}, {}), same)
    got = rf.prepare(Recipe('prior', 'joint', 'tiny', 10, {'image_vocab': 64}, {'steps': 9}), same, steps=7)
    assert got.train == {'steps': 7, 'batch_size': 2}   # the saved recipe, with only the steps changed


def test_stale_temporaries_of_our_files_go_on_resume(tmp_path):
    out = tmp_path / 'run'
    with RunFolder(out, 'train x') as rf: rf.file('checkpoint').write_bytes(b'ok')
    (out / '.checkpoint.safetensors.tmp').write_bytes(b'')   # a killed write
    (out / '.user.tmp').write_bytes(b'u')                       # not ours: stays
    with RunFolder(out, 'train x', resume=True): pass
    assert not (out / '.checkpoint.safetensors.tmp').exists() and (out / '.user.tmp').exists()


def test_damaged_manifest_is_one_line(tmp_path):
    out = tmp_path / 'run'
    with RunFolder(out, 'train x'): pass
    (out / 'run.json').write_text('{"format": "dalle')
    for kw in ({'resume': True}, {'overwrite': True}):
        with pytest.raises(InputError, match='run.json is damaged.*deletes nothing') as e: RunFolder(out, 'train x', **kw).open()
        assert '\n' not in str(e.value)


@pytest.mark.parametrize('entry', ['../victim.txt', '/tmp/abs_victim.txt', 'a/../../victim.txt'])
def test_manifest_entries_outside_the_folder_are_refused(tmp_path, entry):
    out = tmp_path / 'run'
    with RunFolder(out, 'train x') as rf: rf.file('recipe').write_text('{}')
    (tmp_path / 'victim.txt').write_text('v')
    m = json.loads((out / 'run.json').read_text()); m['files'].append(entry); (out / 'run.json').write_text(json.dumps(m))
    with pytest.raises(InputError, match='outside the run folder'): RunFolder(out, 'train x', overwrite=True).open()
    assert (tmp_path / 'victim.txt').read_text() == 'v' and (out / 'recipe.json').exists()


# ---- recipes: one epoch is the sampler's steps
@pytest.mark.parametrize('n,B', [(10_000, 12), (100, 32), (64, 8), (65, 8)])
def test_epoch_is_the_samplers_steps(n, B):
    from dalle_course.learner import StepBatchSampler
    s = StepBatchSampler(n, B, seed=0)
    assert steps_per_epoch(n, B) == s.per_epoch == n // B
    preset = dict(epochs=3, batch_size=B, lr=1e-3, lr_schedule='multistep', milestone_epochs=(1, 2))
    train, scale = resolve_train(preset, n)
    assert train['steps'] == 3 * (n // B) and scale == 1
    # milestone k is the first step of epoch k: the step at which the sampler draws a new permutation
    for k, m in zip((1, 2), train['milestones']):
        assert s.batch_indices(m) == s._slice(s.epoch_perm(k), 0) and divmod(m, s.per_epoch) == (k, 0)


def test_resolve_train_scales_and_refuses():
    preset = dict(steps=600, batch_size=8, lr=2e-3, lr_schedule='warmup_cosine', warmup=40)
    t, s = resolve_train(preset, 100, steps=1200)
    assert (t['steps'], t['warmup'], s) == (1200, 80, 2.0)
    with pytest.raises(InputError, match='fewer than the batch size 8'): resolve_train(preset, 5)
    with pytest.raises(InputError, match='empty'): resolve_train(preset, 0)


def test_overrides_merge_and_refuse():
    base = {'model': {'dim': 8, 'depth': 2}, 'train': {'lr': 1.0}, 'kind': 'x'}
    got = merge_overrides(base, {'model': {'dim': 16}, 'kind': 'y'})
    assert got == {'model': {'dim': 16, 'depth': 2}, 'train': {'lr': 1.0}, 'kind': 'y'} and base['model']['dim'] == 8
    for bad in ({'modle': {}}, {'model': 3}, {'kind': {'a': 1}}):
        with pytest.raises(InputError, match='override'): merge_overrides(base, bad)


def test_recipe_round_trip_and_damage(tmp_path):
    r = Recipe('tokenizer', 'vqvae', 'tiny', 10, {'a': 1}, {'steps': 3}, {'tau': 1.0}, {'codebook_lr_mult': 10.0})
    r.save(tmp_path / 'recipe.json')
    assert Recipe.load(tmp_path / 'recipe.json') == r and r['codebook_lr_mult'] == 10.0 and r['kind'] == 'vqvae'
    (tmp_path / 'recipe.json').write_text(json.dumps(r.to_dict())[:20])
    with pytest.raises(InputError, match='recipe.json is damaged'): Recipe.load(tmp_path / 'recipe.json')
    (tmp_path / 'recipe.json').write_text('{"kind": 1}')
    with pytest.raises(InputError, match='not written by this version'): Recipe.load(tmp_path / 'recipe.json')


# ---- the model registry
def test_one_registry_for_every_role(tmp_path):
    from dalle_course.image_tokenizer import PatchColourTokenizer, load_tokenizer
    from dalle_course.prior import JointPrior, load_prior
    from dalle_course.text import AttributeTokenizer, load_text_tokenizer
    tok, prior, text = PatchColourTokenizer(64, 8, 4), JointPrior(21, 64, 12, 8, 8, dim=16, depth=1, n_heads=2), AttributeTokenizer()
    for obj, name in [(tok, 't.safetensors'), (prior, 'p.safetensors'), (text, 'x.json')]: save_model(obj, tmp_path / name)
    assert model_fingerprint(load_tokenizer(tmp_path / 't.safetensors')) == model_fingerprint(tok)
    assert model_fingerprint(load_prior(tmp_path / 'p.safetensors')) == model_fingerprint(prior)
    assert load_text_tokenizer(tmp_path / 'x.json').vocab == text.vocab
    with pytest.raises(InputError, match='holds a prior, not a tokenizer'): load_tokenizer(tmp_path / 'p.safetensors')
    with pytest.raises(InputError, match='holds an image tokenizer, not a prior'): load_prior(tmp_path / 't.safetensors')
    other = JointPrior(21, 64, 12, 8, 8, dim=16, depth=1, n_heads=2)
    assert model_fingerprint(other) != model_fingerprint(prior)   # same config, other weights: another model


@pytest.mark.parametrize('damage', ['truncated', 'random', 'pickle', 'empty'])
def test_damaged_model_files_are_one_line(tmp_path, damage):
    from dalle_course.image_tokenizer import PatchColourTokenizer, load_tokenizer
    p = PatchColourTokenizer(64, 8, 4).save(tmp_path / 'tok.safetensors')
    data = {'truncated': p.read_bytes()[:50], 'random': os.urandom(300), 'empty': b'',
            'pickle': __import__('pickle').dumps({'model': [1, 2, 3]})}[damage]
    p.write_bytes(data)
    with pytest.raises(InputError) as e: load_tokenizer(p)
    assert 'tok.safetensors' in str(e.value) and '\n' not in str(e.value)


# ---- the dataset protocol
def test_open_dataset_dispatches_on_meta(tmp_path):
    from dalle_course.datasets import DATASET_READERS, open_dataset, register_dataset
    from dalle_course.mdmnist import MDMNIST, write_mdmnist
    write_mdmnist(tmp_path / 'md', 6, seed=0, size=64, show_progress=False)
    assert isinstance(open_dataset(tmp_path / 'md'), MDMNIST)
    class Toy(torch.utils.data.Dataset):
        def __init__(self, folder): self.folder = folder
        def __len__(self): return 1
        def __getitem__(self, i): return {'image': torch.zeros(3, 8, 8), 'captions': ['a', 'b'], 'caption': 'a'}
    (tmp_path / 'toy').mkdir(); (tmp_path / 'toy' / 'meta.json').write_text('{"format": "toy/1"}')
    with pytest.raises(InputError, match="format 'toy/1'"): open_dataset(tmp_path / 'toy')
    register_dataset('toy', Toy)
    try: assert isinstance(open_dataset(tmp_path / 'toy'), Toy)
    finally: DATASET_READERS.pop('toy')
    (tmp_path / 'toy' / 'meta.json').write_text('{"format": ')
    with pytest.raises(InputError, match='meta.json is damaged'): open_dataset(tmp_path / 'toy')


def test_captions_are_encoded_per_step_with_dropout_and_several_captions():
    from dalle_course.prior_training import CaptionTokens
    from dalle_course.text import fit_text_tokenizer
    caps = [['a small red bird with black wings', 'this red bird is small'], ['a blue bird', 'the bird is blue']]
    tok, spec = fit_text_tokenizer({'kind': 'bpe', 'vocab_size': 80, 'dropout': 0.5}, caps)
    ds = CaptionTokens(tok, spec['length'], torch.zeros(2, 4, dtype=torch.long), caps, dropout=0.5)
    torch.manual_seed(0)
    seen = [tuple(ds[0][0].tolist()) for _ in range(60)]
    decoded = {tok.decode(torch.tensor(s)) for s in seen}
    assert decoded <= {tok.normalize(c) for c in caps[0]} and len(decoded) == 2   # both captions, text intact
    assert len(set(seen)) > 4                                                     # segmentations vary per read
    torch.manual_seed(0); again = [tuple(ds[0][0].tolist()) for _ in range(60)]
    assert again == seen                                                          # torch's generator: reproducible
    plain = CaptionTokens(tok, spec['length'], torch.zeros(2, 4, dtype=torch.long), [[c[0]] for c in caps])
    r = torch.get_rng_state(); plain[0]; assert torch.equal(r, torch.get_rng_state())  # one caption: no draw at all


# ---- the prior contract
def test_prior_contract_and_sampler_options():
    from dalle_course.core import MODELS, model_class
    from dalle_course.prior import AutoregressivePrior, Prior
    from dalle_course.prior_training import resolve_prior_recipe
    assert {'joint', 'separate', 'paella', 'maskgit'} <= set(MODELS['prior'])  # lesson 31's priors are in the registry
    for arch in MODELS['prior']:
        cls = model_class('prior', arch)
        assert issubclass(cls, Prior) and cls.arch == arch
        r = resolve_prior_recipe(arch, 'tiny', 100, 21, 12, 64, 8, 8)          # 8x8: the U-Net's 3 levels of patch 2
        m = cls(**r.model)
        assert (m.text_vocab, m.image_vocab, m.text_len, m.h, m.w, m.n_img) == (21, 64, 12, 8, 8, 64)
        assert m.null_text(3).shape == (3, 12) and (m.null_text(3) == m.pad_id).all()
        z = m.generate(torch.randint(1, 21, (2, 12)), top_k=3, generator=torch.Generator().manual_seed(0))
        assert z.shape == (2, 8, 8) and int(z.min()) >= 0 and int(z.max()) < 64    # codebook tokens only
        if issubclass(cls, AutoregressivePrior):                                 # one token a step: no step count
            with pytest.raises(InputError, match="no option 'steps'"): m.generate(torch.ones(1, 12, dtype=torch.long), steps=8)
        else:
            assert m.generate(torch.ones(1, 12, dtype=torch.long), steps=2).shape == (1, 8, 8)
        with pytest.raises(InputError, match="no option 'beam'"): m.generate(torch.ones(1, 12, dtype=torch.long), beam=4)
        loss, logs = m.loss({'text': torch.randint(1, 21, (2, 12)), 'image': torch.randint(0, 64, (2, 64))})
        assert torch.isfinite(loss) and any(k.startswith('ce_') for k in logs)   # ce_image, ce_noised, ce_masked
    # each architecture takes the keys it has: G1 has no encoder depth, G2 no mask pattern
    assert 'enc_depth' not in resolve_prior_recipe('joint', 'tiny', 100, 21, 12, 64, 4, 4).model
    assert 'mask_pattern' not in resolve_prior_recipe('separate', 'tiny', 100, 21, 12, 64, 4, 4).model


def test_tiny_prior_preset_budgets_tokens_not_sequences():
    from dalle_course.prior_training import resolve_prior_recipe
    b64 = resolve_prior_recipe('joint', 'tiny', 3000, 21, 12, 128, 16, 16).train['batch_size']
    b128 = resolve_prior_recipe('joint', 'tiny', 3000, 21, 12, 128, 32, 32).train['batch_size']
    assert (b64, b128) == (4096 // 268, 4096 // 1036)


def test_tokenizer_kinds_come_from_the_table():
    from dalle_course.tokenizer_training import TOKENIZER_KINDS, resolve_recipe, build_tokenizer
    for bad in ('dvae', 'dvae-foo', 'vqvae-fancy', 'vq'):   # a prefix never picks a class
        with pytest.raises(InputError, match='unknown tokenizer kind'): resolve_recipe(bad, 'tiny', 64, 100)
    for name, k in TOKENIZER_KINDS.items():
        assert type(build_tokenizer(resolve_recipe(name, 'tiny', 64, 100))) is k.cls


def test_time_estimate_leaves_everything_as_it_was(capsys):
    from dalle_course.learner import Learner, TrainConfig
    torch.manual_seed(3)
    m = torch.nn.Linear(4, 1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    L = Learner(m, lambda mod, b, hp: ((mod(b[0]) - b[1]) ** 2).mean(), data, TrainConfig(steps=5, batch_size=8, device='cpu'))
    w, rng = m.weight.detach().clone(), torch.get_rng_state()
    secs = L.announce('train demo')
    assert secs > 0 and torch.equal(m.weight, w) and m.weight.grad is None and torch.equal(rng, torch.get_rng_state())
    line = capsys.readouterr().out
    assert 'train demo: 5 parameters, 5 steps of 8' in line and 'estimated' in line and 'ms per step' in line


def test_children_are_checked_before_anything_is_deleted(tmp_path):
    out = tmp_path / 'demo'
    with RunFolder(out, 'demo') as rf:
        rf.file('report/a.txt').write_text('a')
        with RunFolder(rf.child('prior'), 'train prior') as c: c.file('prior').write_text('p')
    # a file the child did not write: its stage could not start again beside it (it refuses a folder it does not own),
    # so the parent's --overwrite is refused before it deletes anything, whether or not the name is one of ours
    for name in ('mine.txt', 'eval.json'):
        (out / 'prior' / name).write_text('m')
        with pytest.raises(InputError, match=f'prior/{name} was not written by dalle-course'):
            RunFolder(out, 'demo', overwrite=True).open()
        assert (out / 'report' / 'a.txt').exists() and (out / 'prior' / 'prior.safetensors').exists()  # nothing deleted
        (out / 'prior' / name).unlink()
    RunFolder(out, 'demo', overwrite=True).open().close()  # without it: replaced
    assert not (out / 'report').exists() and not (out / 'prior').exists()


def test_no_stage_module_imports_another():
    "The two training modules are stages: neither imports the other; model modules import no training module."
    import ast, dalle_course
    root = Path(dalle_course.__file__).parent
    def imports(name):
        tree = ast.parse((root / f'{name}.py').read_text())
        return {n.module.split('.')[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
               {a.name.split('.')[-1] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    stages = {'tokenizer_training', 'prior_training'}
    for s in stages: assert not (imports(s) & (stages - {s})), s
    for model in ('dvae', 'vqvae', 'prior', 'image_tokenizer', 'transformer', 'masks', 'text', 'sampling'):
        assert not (imports(model) & (stages | {'learner', 'demo', 'cli'})), model


def test_text_tokenizer_kind_comes_from_the_dataset(tmp_path):
    from dalle_course.datasets import text_tokenizer_kind
    from dalle_course.mdmnist import MDMNIST, write_mdmnist
    write_mdmnist(tmp_path / 'md', 4, seed=0, size=64, show_progress=False)
    ds = MDMNIST(tmp_path / 'md')
    assert text_tokenizer_kind(ds) == 'attributes' and text_tokenizer_kind(torch.utils.data.Subset(ds, [1])) == 'attributes'
    assert text_tokenizer_kind([{'image': torch.zeros(3, 8, 8), 'captions': ['a bird']}]) == 'words'


def test_data_fingerprint_refuses_other_data_on_resume(tmp_path):
    from helpers import write_splits
    from dalle_course.tokenizer_training import train_tokenizer
    from dalle_course.mdmnist import write_mdmnist
    write_splits(tmp_path, 32, 8, 2)
    write_mdmnist(tmp_path / 'other', 32, seed=5, size=64, show_progress=False)
    kw = dict(test=tmp_path / 'test', steps=2, plots=False, eval_images=8)
    train_tokenizer('vqvae', tmp_path / 'train', out=tmp_path / 'run', **kw)
    with pytest.raises(InputError, match=r'another training data \(--data\)'):
        train_tokenizer('vqvae', tmp_path / 'other', out=tmp_path / 'run', resume=True, **{**kw, 'steps': 3})
    assert train_tokenizer('vqvae', tmp_path / 'train', out=tmp_path / 'run', resume=True, **{**kw, 'steps': 3})['summary']['step'] == 3


def test_shipped_runs_share_one_tokenizer_and_load_by_name(tmp_path, monkeypatch):
    import shutil
    from dalle_course.core import shipped
    from dalle_course.image_tokenizer import load_tokenizer
    from dalle_course.pipeline import Pipeline, SHIPPED_RUNS
    from dalle_course.runs import FILES, tokenizer_file
    demo_tok = shipped('demo_64') / FILES['tokenizer']
    for name in ('paella_64', 'maskgit_64'):        # one copy of the demo's tokenizer, named by tokenizer.ref
        assert not (shipped(name) / FILES['tokenizer']).exists()
        assert tokenizer_file(shipped(name)).resolve() == demo_tok.resolve()
    monkeypatch.chdir(tmp_path)                      # no such folders here: the names mean the shipped runs
    pipes = {n: Pipeline.from_run(n) for n in SHIPPED_RUNS}
    assert {p.prior.arch for p in pipes.values()} == {'joint', 'paella', 'maskgit'}
    assert load_tokenizer(shipped('paella_64')).config == load_tokenizer(demo_tok).config
    run = tmp_path / 'mine'; shutil.copytree(shipped('paella_64'), run)
    (run / FILES['tokenizer_ref']).write_text('../nowhere/tokenizer.safetensors')
    with pytest.raises(InputError, match='tokenizer.ref names .*nowhere.* which does not exist'): Pipeline.from_run(run)
    (run / FILES['tokenizer_ref']).unlink()
    with pytest.raises(InputError, match='has no tokenizer.safetensors'): Pipeline.from_run(run)
    shutil.copy(demo_tok, run / FILES['tokenizer'])  # its own copy wins over a shared one
    assert Pipeline.from_run(run).prior.arch == 'paella'


# ---- a refused run leaves no half-made folder; a new output file is never clobbered by a second writer
def _tiny_stage(fail_in_data: bool):
    "A Stage of one linear layer whose data function refuses (InputError) after the run folder opened, if asked."
    from dalle_course.learner import Stage
    from dalle_course.runs import Recipe
    def data(recipe, rf):
        rf.file('notes.json').write_text('{}')  # something written before the refusal
        if fail_in_data: raise InputError('refused late')
        d = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
        return d, d
    recipe = Recipe('toy', 'linear', 'tiny', 16, model={}, train=dict(steps=2, batch_size=4, lr=0.01, seed=0))
    return Stage('train toy', recipe, (), build=lambda r: torch.nn.Linear(4, 1),
                 loss=lambda m, b, hp: ((m(b[0]) - b[1]) ** 2).mean(), evaluate=lambda m, l, a, b: ({}, {}), data=data)


@pytest.mark.parametrize('nested', [False, True])
def test_a_refused_fresh_run_removes_what_it_made(tmp_path, nested):
    from dalle_course.learner import train_run
    from dalle_course.runs import RunOptions
    out = tmp_path / ('a/b/run' if nested else 'run')
    with pytest.raises(InputError, match='refused late'): train_run(_tiny_stage(True), RunOptions(out=out, device='cpu'))
    assert list(tmp_path.iterdir()) == []  # every folder it made went too: a plain rerun is not blocked
    res = train_run(_tiny_stage(False), RunOptions(out=out, device='cpu'))  # and the rerun works
    assert res.summary['step'] == 2 and (out / 'notes.json').is_file()


def test_a_refused_resume_keeps_the_run(tmp_path):
    from dalle_course.learner import train_run
    from dalle_course.runs import RunOptions
    out = tmp_path / 'run'
    train_run(_tiny_stage(False), RunOptions(out=out, device='cpu'))
    before = listing(out)
    with pytest.raises(InputError): train_run(_tiny_stage(True), RunOptions(out=out, resume=True, steps=3, device='cpu'))
    assert listing(out) == before  # a resumed run is never removed


def test_an_exclusive_write_refuses_a_file_that_appeared(tmp_path):
    from dalle_course.core import write_bytes_atomic
    p = tmp_path / 'grid.png'
    write_bytes_atomic(p, b'first', replace=False)
    with pytest.raises(InputError, match='another process'): write_bytes_atomic(p, b'second', replace=False)
    assert p.read_bytes() == b'first' and listing(tmp_path) == ['grid.png']
    write_bytes_atomic(p, b'third')  # replace=True: an overwrite the user asked for
    assert p.read_bytes() == b'third'


def test_written_by_mark_reads_every_sample_format(tmp_path):
    import io
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from dalle_course.runs import mark_metadata, written_by_mark
    fig = plt.figure(figsize=(1, 1))
    for suffix in ('.png', '.jpg', '.pdf', '.svg'):
        fig.savefig(tmp_path / f'a{suffix}', **mark_metadata(suffix, 'dalle-course sample'))
        fig.savefig(tmp_path / f'b{suffix}')  # no mark: a file of the user's
        assert written_by_mark(tmp_path / f'a{suffix}') == 'dalle-course sample', suffix
        assert written_by_mark(tmp_path / f'b{suffix}') is None, suffix
    plt.close(fig)
    np.savez(tmp_path / 'a.npz', x=np.zeros(2), written_by=np.array('dalle-course sample'))
    np.savez(tmp_path / 'b.npz', x=np.zeros(2))
    (tmp_path / 'c.npz').write_bytes(b'not a zip')
    assert [written_by_mark(tmp_path / f'{k}.npz') for k in 'abc'] == ['dalle-course sample', None, None]


def test_split_train_test_refuses_another_kind_and_warns_on_overlap(tmp_path, capsys):
    from dalle_course.datasets import open_dataset, split_train_test
    from dalle_course.mdmnist import write_mdmnist
    write_mdmnist(tmp_path / 'd', n=40, seed=0, size=64, show_progress=False)
    ds = open_dataset(tmp_path / 'd')
    split_train_test(torch.utils.data.Subset(ds, range(30)), torch.utils.data.Subset(ds, range(30, 40)))
    assert capsys.readouterr().err == ''  # disjoint: nothing to say
    split_train_test(torch.utils.data.Subset(ds, range(30)), torch.utils.data.Subset(ds, range(24, 40)))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '6 of the 16 test images are also in the training data' in err[0]
    split_train_test(ds, ds)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--test is the training data itself' in err[0]

    class Other(torch.utils.data.Dataset):  # a dataset of another reader
        def __len__(self): return 4
        def __getitem__(self, i): return {'image': torch.zeros(3, 64, 64), 'caption': 'a bird'}
    with pytest.raises(InputError, match='--test holds Other data but --data holds MD-MNIST data'): split_train_test(ds, Other())
