"""dalle_course.learner as a stage calls it: schedules, EMA, exact resume, NaN stop, DDP, data stream, logs, checkpoints."""
import importlib.util, json, math, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from dalle_course import learner as L
from dalle_course.core import InputError, load_checkpoint, read_checkpoint_meta
from dalle_course.schedules import Schedule
from dalle_course.learner import (Learner, NonFiniteLossError, StepBatchSampler, TrainConfig, fixed_rng,
                                  plot_metrics, read_metrics, to_device, update_ema)

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- a tiny task with dropout
class IndexedData(torch.utils.data.Dataset):
    "64 points (x, y) and their index, so that tests can see which examples each step used."
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g); self.y = torch.randint(0, 3, (n,), generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {'x': self.x[i], 'y': self.y[i], 'idx': i}


def make_model(seed=0, p=0.3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 3))


def ce_loss(model, batch, hp):
    logits = model(batch['x'])  # (B, 3)
    return nn.functional.cross_entropy(logits, batch['y']), {'acc': (logits.argmax(-1) == batch['y']).float().mean()}


def cfg_(**kw):
    base = dict(steps=30, batch_size=8, lr=1e-2, ckpt_every=10, log_every=1, eval_every=5, eval_batches=2, ema=0.9, seed=3)
    return TrainConfig(**{**base, **kw})


class StopAt:
    def __init__(self, step): self.at = step
    def after_step(self, learner, step, record):
        if step == self.at: raise KeyboardInterrupt


def _weights(out):
    st = load_checkpoint(Path(out) / 'checkpoint.safetensors')['state']
    return {f'{part}/{k}': v for part in ('model', 'ema') for k, v in st[part].items()}


def _interrupted_then_resumed(out, stop=17, **kw):
    with pytest.raises(KeyboardInterrupt):
        Learner(make_model(), ce_loss, IndexedData(), cfg_(**kw), out=out, eval_data=IndexedData(16),
                callbacks=[StopAt(stop)]).fit()
    assert read_checkpoint_meta(Path(out) / 'checkpoint.safetensors')['step'] == 10
    # a fresh process would build the model with other random weights: the checkpoint must overwrite them
    return Learner(make_model(seed=123), ce_loss, IndexedData(), cfg_(**kw), out=out, eval_data=IndexedData(16),
                   resume=True).fit()


# ---------------------------------------------------------------- schedules
def test_schedules_match_formulas():
    lin, cos = Schedule.linear(5.0, 0.01, 80, delay=10), Schedule.cosine(1.0, 1 / 16, 150, delay=5)
    wc, ms = Schedule.warmup_cosine(3e-4, 20, 200, final=1e-5), Schedule.multistep(1e-3, [5, 100], gamma=0.1)
    for s in range(400):
        t = min(max((s - 10) / 80, 0.0), 1.0)
        assert math.isclose(lin(s), 5.0 + (0.01 - 5.0) * t, rel_tol=1e-12, abs_tol=1e-12)
        t = min(max((s - 5) / 150, 0.0), 1.0)
        assert math.isclose(cos(s), 1 / 16 + (1 - 1 / 16) * (1 + math.cos(math.pi * t)) / 2, rel_tol=1e-12, abs_tol=1e-12)
        ref = 3e-4 * s / 20 if s < 20 else 1e-5 + (3e-4 - 1e-5) * (1 + math.cos(math.pi * min(1, (s - 20) / 180))) / 2
        assert math.isclose(wc(s), ref, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(ms(s), 1e-3 * 0.1 ** ((s >= 5) + (s >= 100)), rel_tol=1e-12)
    assert lin(0) == 5.0 and lin(90) == 0.01 and lin(10**6) == 0.01 and cos(155) == 1 / 16 and wc(0) == 0.0
    assert Schedule.constant(0.7)(0) == Schedule.constant(0.7)(10**9) == 0.7


def test_schedules_match_torch_schedulers():
    "torch's MultiStepLR and CosineAnnealingLR as independent references."
    p = torch.zeros(1, requires_grad=True)
    o1, o2 = torch.optim.SGD([p], lr=0.5), torch.optim.SGD([p], lr=0.5)
    s1 = torch.optim.lr_scheduler.MultiStepLR(o1, milestones=[7, 20], gamma=0.3)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=40, eta_min=0.01)
    ms, cos = Schedule.multistep(0.5, [7, 20], gamma=0.3), Schedule.cosine(0.5, 0.01, 40)
    for s in range(41):
        assert math.isclose(o1.param_groups[0]['lr'], ms(s), rel_tol=1e-9)
        assert math.isclose(o2.param_groups[0]['lr'], cos(s), rel_tol=1e-9, abs_tol=1e-12)
        o1.step(); o2.step(); s1.step(); s2.step()


def test_schedule_serialization_and_validation():
    for s in (Schedule.constant(2), Schedule.linear(0, 1, 10, 3), Schedule.cosine(1, 0, 5),
              Schedule.warmup_cosine(1, 2, 9, 0.1), Schedule.multistep(1, [2, 4], 0.5)):
        back = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
        assert back == s and [back(i) for i in range(12)] == [s(i) for i in range(12)]
    assert Schedule.from_dict(0.25) == Schedule.constant(0.25)
    for bad in (lambda: Schedule.warmup_cosine(1, 10, 5), lambda: Schedule.multistep(1, [5, 2]),
                lambda: Schedule.linear(0, 1, -1), lambda: Schedule.from_dict({'kind': 'exp'})):
        with pytest.raises(InputError): bad()


def test_trainconfig_round_trip_and_lr_schedule():
    c = TrainConfig(steps=50, lr=2e-3, lr_schedule='multistep', milestones=[10, 30], gamma=0.5, betas=(0.8, 0.99))
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.lr_sched() == Schedule.multistep(2e-3, [10, 30], 0.5)
    assert TrainConfig(steps=50, lr=1, lr_schedule='warmup_cosine', warmup=5, min_lr=0.1).lr_sched() == \
        Schedule.warmup_cosine(1, 5, 50, 0.1)
    assert TrainConfig(lr=1.0, warmup=4).lr_sched()(2) == 0.5
    with pytest.raises(InputError, match='unknown TrainConfig settings'): TrainConfig.from_dict({'stpes': 3})
    for bad in (dict(lr_schedule='cos'), dict(ema=1.5), dict(steps=0), dict(log_every=0)):
        with pytest.raises(InputError): TrainConfig(**bad)


# ---------------------------------------------------------------- data stream
def test_step_batch_sampler_formula_and_rank_slices():
    full = StepBatchSampler(20, 6, seed=5, stop=13)  # 3 batches per epoch, 2 examples dropped
    batches = list(full)
    for k, b in enumerate(batches):
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(5 + k // 3)).tolist()
        assert b == perm[(k % 3) * 6:(k % 3) * 6 + 6] == full.batch_indices(k)
    assert list(StepBatchSampler(20, 6, seed=5, start=4, stop=13)) == batches[4:]
    parts = [list(StepBatchSampler(20, 6, seed=5, stop=13, rank=r, world_size=3)) for r in range(3)]
    for k in range(13):
        assert parts[0][k] + parts[1][k] + parts[2][k] == batches[k] and all(len(p[k]) == 2 for p in parts)
    with pytest.raises(InputError, match='divisible'): StepBatchSampler(20, 6, world_size=4)
    with pytest.raises(InputError, match='fewer than batch_size'): StepBatchSampler(5, 6)


def test_batch_at_each_step_is_same_in_fresh_and_resumed_runs(tmp_path):
    seen = {}
    def loss(model, batch, hp):
        seen.setdefault(tag, {})[hp['step']] = batch['idx'].tolist()
        return ce_loss(model, batch, hp)
    tag = 'fresh'
    Learner(make_model(), loss, IndexedData(), cfg_(), out=tmp_path / 'a').fit()
    tag = 'resumed'
    with pytest.raises(KeyboardInterrupt):
        Learner(make_model(), loss, IndexedData(), cfg_(), out=tmp_path / 'b', callbacks=[StopAt(17)]).fit()
    replay = dict(seen['resumed'])
    Learner(make_model(), loss, IndexedData(), cfg_(), out=tmp_path / 'b', resume=True).fit()
    assert seen['fresh'] == seen['resumed'] and sorted(seen['fresh']) == list(range(30))
    assert all(replay[k] == seen['fresh'][k] for k in replay)
    ref = StepBatchSampler(64, 8, seed=3)
    assert all(seen['fresh'][k] == ref.batch_indices(k) for k in range(30))


def test_to_device_nested():
    b = to_device({'a': torch.ones(2), 'l': [torch.zeros(1), 'txt'], 't': (1, torch.ones(1))}, 'cpu')
    assert b['l'][1] == 'txt' and isinstance(b['t'], tuple) and b['t'][0] == 1 and torch.equal(b['a'], torch.ones(2))


# ---------------------------------------------------------------- EMA
def test_ema_matches_formula():
    d, thetas = 0.8, []
    class Grab:
        def before_fit(self, learner): thetas.append([p.detach().double().clone() for p in learner.model.parameters()])
        def after_step(self, learner, step, record): thetas.append([p.detach().double().clone() for p in learner.model.parameters()])
    lrn = Learner(make_model(), ce_loss, IndexedData(), cfg_(steps=12, ema=d, eval_every=0), callbacks=[Grab()])
    lrn.fit()
    ema = thetas[0]
    for th in thetas[1:]: ema = [d * e + (1 - d) * t for e, t in zip(ema, th)]  # θ_ema ← d·θ_ema + (1−d)·θ
    for e, got in zip(ema, lrn.ema_model.parameters()): assert_close(got.double(), e, rtol=0, atol=1e-6)
    assert not torch.equal(lrn.ema_model[0].weight, lrn.model[0].weight)  # it is an average, not a copy
    bn, bn_ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    bn(torch.randn(5, 3)); update_ema(bn_ema, bn, 0.5)
    assert torch.equal(bn_ema.running_mean, bn.running_mean)  # buffers are copied


# ---------------------------------------------------------------- exact resume
def test_resume_is_bit_exact(tmp_path):
    a = Learner(make_model(), ce_loss, IndexedData(), cfg_(), out=tmp_path / 'A', eval_data=IndexedData(16)).fit()
    b = _interrupted_then_resumed(tmp_path / 'B')
    assert a['step'] == b['step'] == 30 and a['loss'] == b['loss'] and a['eval'] == b['eval']
    wa, wb = _weights(tmp_path / 'A'), _weights(tmp_path / 'B')
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (load_checkpoint(tmp_path / r / 'checkpoint.safetensors')['state']['optim']['state'] for r in 'AB')
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    strip = lambda rs: [{k: v for k, v in r.items() if k != 'time'} for r in rs]
    ra, rb = strip(read_metrics(tmp_path / 'A/metrics.jsonl')), strip(read_metrics(tmp_path / 'B/metrics.jsonl'))
    assert ra == rb and [r['step'] for r in ra if r['split'] == 'train'] == list(range(1, 31))


@pytest.mark.parametrize('broken', ['rng', 'optimizer'])
def test_resume_equality_needs_rng_and_optimizer_state(tmp_path, monkeypatch, broken):
    "The resume test is sharp: forgetting the RNG state (dropout masks) or Adam's moments changes the result."
    a = Learner(make_model(), ce_loss, IndexedData(), cfg_(), out=tmp_path / 'A').fit()
    if broken == 'rng': monkeypatch.setattr(L, 'set_rng_state', lambda s: None)
    else: monkeypatch.setattr(torch.optim.AdamW, 'load_state_dict', lambda self, sd: None)
    b = _interrupted_then_resumed(tmp_path / 'B')
    wa, wb = _weights(tmp_path / 'A'), _weights(tmp_path / 'B')
    assert a['loss'] != b['loss'] and not all(torch.equal(wa[k], wb[k]) for k in wa)


def test_evaluation_does_not_perturb_training():
    "Evaluating every step (with a loss that draws random numbers) leaves the training stream untouched."
    def noisy(model, batch, hp):
        loss, m = ce_loss(model, batch, hp)
        return loss + 0 * torch.rand(()), m
    runs = [Learner(make_model(), noisy, IndexedData(), cfg_(steps=15, eval_every=e), eval_data=IndexedData(16)).fit()
            for e in (1, 0)]
    assert runs[0]['loss'] == runs[1]['loss'] and runs[0]['eval'] == runs[1]['eval']
    torch.manual_seed(0); ref = torch.rand(4)
    torch.manual_seed(0)
    with fixed_rng(9): torch.rand(100); np.random.rand(3)
    assert torch.equal(torch.rand(4), ref)


# ---------------------------------------------------------------- NaN stop
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    ck = tmp_path / 'checkpoint.safetensors'; saved = {}
    class Snap:
        def after_step(self, learner, step, record):
            if step == 10: saved['bytes'] = ck.read_bytes(); saved['w'] = {k: v.clone() for k, v in learner.model.state_dict().items()}
    def loss(model, batch, hp):
        l, m = ce_loss(model, batch, hp)
        return (l * float('inf') if hp['step'] >= 13 else l), m
    lrn = Learner(make_model(), loss, IndexedData(), cfg_(eval_every=0), out=tmp_path, callbacks=[Snap()])
    with pytest.raises(NonFiniteLossError) as e: lrn.fit()
    msg = str(e.value)
    assert e.value.step == 14 and e.value.ckpt_step == 10 and math.isinf(e.value.value)
    assert 'step 14' in msg and 'inf' in msg and 'step 10' in msg and 'learning rate' in msg
    assert ck.read_bytes() == saved['bytes']  # the last good checkpoint is untouched
    st = load_checkpoint(ck)
    assert st['step'] == 10 and all(torch.isfinite(v).all() for v in st['state']['model'].values())
    assert max(r['step'] for r in read_metrics(tmp_path / 'metrics.jsonl')) == 13
    assert all(torch.isfinite(p).all() for p in lrn.model.parameters())  # the bad step never updated the weights
    with pytest.raises(NonFiniteLossError, match='no checkpoint had been written'):
        Learner(make_model(), lambda m, b, hp: ce_loss(m, b, hp)[0] * float('nan'), IndexedData(), cfg_()).fit()


# ---------------------------------------------------------------- hyperparameters and param groups
def test_param_groups_lr_mult_and_hparams(tmp_path):
    model, lrs, hps = make_model(), [], []
    class Probe:
        def after_step(self, learner, step, record): lrs.append([g['lr'] for g in learner.opt.param_groups])
    def loss(m, b, hp):
        hps.append(dict(hp)); return ce_loss(m, b, hp)
    groups = [{'params': model[0].parameters()}, {'params': model[3].parameters(), 'lr_mult': 10.0, 'weight_decay': 0.5}]
    sched = Schedule.warmup_cosine(1e-3, 4, 20, 1e-5)
    lrn = Learner(model, loss, IndexedData(), cfg_(steps=20, eval_every=0, weight_decay=0.0), param_groups=groups,
                  lr_schedule=sched, hparams={'tau': Schedule.linear(5, 0.01, 10), 'kl': 0.25}, callbacks=[Probe()])
    lrn.fit()
    for s in range(20):
        ref = 1e-3 * s / 4 if s < 4 else 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * (s - 4) / 16)) / 2
        assert math.isclose(lrs[s][0], ref, rel_tol=1e-9, abs_tol=1e-15) and math.isclose(lrs[s][1], 10 * ref, rel_tol=1e-9, abs_tol=1e-14)
        assert hps[s]['step'] == s and math.isclose(hps[s]['tau'], 5 + (0.01 - 5) * min(s / 10, 1)) and hps[s]['kl'] == 0.25
    assert [g['weight_decay'] for g in lrn.opt.param_groups] == [0.0, 0.5]
    with pytest.raises(InputError, match="'step' is reserved"):
        Learner(make_model(), ce_loss, IndexedData(), cfg_(), hparams={'step': 1.0})


# ---------------------------------------------------------------- logs and checkpoints
def test_metrics_jsonl_contents(tmp_path):
    c = cfg_(steps=23, log_every=5, eval_every=10, ckpt_every=0, lr_schedule='warmup_cosine', warmup=3)
    Learner(make_model(), ce_loss, IndexedData(), c, out=tmp_path, eval_data=IndexedData(16),
            hparams={'tau': Schedule.linear(2, 1, 20)}).fit()
    recs = read_metrics(tmp_path / 'metrics.jsonl')
    tr, ev = [r for r in recs if r['split'] == 'train'], [r for r in recs if r['split'] == 'eval']
    assert [r['step'] for r in tr] == [5, 10, 15, 20, 23] and [r['step'] for r in ev] == [10, 20, 23]
    for r in tr:
        assert set(r) == {'step', 'split', 'loss', 'lr', 'hp', 'metrics', 'grad_norm', 'time'}
        assert math.isclose(r['lr'], c.lr_sched()(r['step'] - 1)) and math.isclose(r['hp']['tau'], 2 - min((r['step'] - 1) / 20, 1))
        assert 0 <= r['metrics']['acc'] <= 1 and r['grad_norm'] > 0 and r['loss'] > 0
    for r in ev: assert {'acc', 'ema_loss', 'ema_acc'} <= set(r['metrics']) and r['loss'] > 0
    assert (tmp_path / 'metrics.png').stat().st_size > 1000
    fig = plot_metrics(tmp_path / 'metrics.jsonl')
    assert len(fig.axes) == 3
    import matplotlib.pyplot as plt; plt.close(fig)


def test_eval_on_fixed_batch_equals_direct_computation():
    x = torch.randn(10, 6); y = torch.randint(0, 3, (10,)); batch = {'x': x, 'y': y}
    lrn = Learner(make_model(), ce_loss, IndexedData(), cfg_(steps=3, ema=None), eval_data=batch,
                  eval_fn=lambda m, l: {'n_params': sum(p.numel() for p in m.parameters())})
    res = lrn.fit()['eval']
    assert lrn.model.training  # evaluation put the model back in train mode
    lrn.model.eval()
    with torch.no_grad(): ref = nn.functional.cross_entropy(lrn.model(x), y).item()
    assert math.isclose(res['loss'], ref, rel_tol=1e-6) and res['n_params'] == 6 * 32 + 32 + 32 * 3 + 3


def test_checkpoint_contents(tmp_path):
    c = cfg_(steps=12, ckpt_every=5)
    hp = {'tau': Schedule.linear(5, 0.01, 8)}
    lrn = Learner(make_model(), ce_loss, IndexedData(), c, out=tmp_path, hparams=hp)
    lrn.fit()
    p = tmp_path / 'checkpoint.safetensors'
    ck = load_checkpoint(p)
    assert ck['step'] == 12 and read_checkpoint_meta(p)['step'] == 12
    assert TrainConfig.from_dict(ck['config']['train']) == c
    assert Schedule.from_dict(ck['config']['lr_schedule']) == c.lr_sched()
    assert {k: Schedule.from_dict(v) for k, v in ck['config']['hparams'].items()} == hp
    st = ck['state']
    assert {'model', 'ema', 'optim', 'rng'} <= set(st)
    plain = set(make_model().state_dict())
    assert set(st['model']) == set(st['ema']) == plain
    assert {k[len('model/'):] for k in load_file(p) if k.startswith('model/')} == plain  # readable safetensors keys
    for k, v in lrn.model.state_dict().items(): assert torch.equal(st['model'][k], v)
    for k, v in lrn.ema_model.state_dict().items(): assert torch.equal(st['ema'][k], v)
    rng = st['rng'][0]
    assert {'python', 'numpy', 'torch'} <= set(rng) and rng['torch'].dtype == torch.uint8
    assert len(st['optim']['state']) == 4 and all(int(s['step']) == 12 for s in st['optim']['state'].values())
    assert [g['lr_mult'] for g in st['optim']['param_groups']] == [1.0]
    fresh = make_model(seed=7); fresh.load_state_dict(st['model'])  # loads into a plain module


def test_fresh_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    Learner(make_model(), ce_loss, IndexedData(), cfg_(steps=3), out=tmp_path).fit()
    with pytest.raises(InputError, match='resume=True'):
        Learner(make_model(), ce_loss, IndexedData(), cfg_(steps=3), out=tmp_path).fit()
    s = Learner(make_model(), ce_loss, IndexedData(), cfg_(steps=5), out=tmp_path, resume=True).fit()  # extends the run
    assert s['step'] == 5 and load_checkpoint(tmp_path / 'checkpoint.safetensors')['step'] == 5


def test_batch_size_must_divide_among_processes(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    with pytest.raises(InputError, match='not divisible by the 3 processes'):
        Learner(make_model(), ce_loss, IndexedData(), cfg_())


# ---------------------------------------------------------------- DDP: 2 gloo processes on the CPU
def test_ddp_two_processes_match_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                        str(HERE / 'ddp_script.py'), str(tmp_path / 'ddp')], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    spec = importlib.util.spec_from_file_location('ddp_script', HERE / 'ddp_script.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    single = mod.main(tmp_path / 'single')
    wd, ws = _weights(tmp_path / 'ddp'), _weights(tmp_path / 'single')
    assert wd.keys() == ws.keys()
    for k in ws: assert_close(wd[k], ws[k], rtol=0, atol=1e-6)
    rd, rs = read_metrics(tmp_path / 'ddp/metrics.jsonl'), read_metrics(tmp_path / 'single/metrics.jsonl')
    assert [x['step'] for x in rd] == [x['step'] for x in rs] == list(range(1, 7))  # one writer: each step once
    for a, b in zip(rd, rs):
        assert math.isclose(a['loss'], b['loss'], rel_tol=1e-5) and math.isclose(a['grad_norm'], b['grad_norm'], rel_tol=1e-5)
    assert sorted(os.listdir(tmp_path / 'ddp')) == ['checkpoint.safetensors', 'metrics.jsonl', 'metrics.png']
    ck = load_checkpoint(tmp_path / 'ddp/checkpoint.safetensors')
    assert ck['step'] == 6 and len(ck['state']['rng']) == 2  # both ranks' RNG states
    print('DDP vs single process, max abs weight difference:', max((wd[k] - ws[k]).abs().max().item() for k in ws))


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    "k micro-batches of B/k make the update of one batch of B (a loss without batch statistics), under DDP too."
    spec = importlib.util.spec_from_file_location('ddp_script', HERE / 'ddp_script.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    one, four = mod.main(tmp_path / 'one'), mod.main(tmp_path / 'accum4', grad_accum=4)
    w1, w4 = _weights(tmp_path / 'one'), _weights(tmp_path / 'accum4')
    for k in w1: assert_close(w4[k], w1[k], rtol=0, atol=1e-6)
    assert math.isclose(one['loss'], four['loss'], rel_tol=1e-5)
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                        str(HERE / 'ddp_script.py'), str(tmp_path / 'ddp2'), '2'], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wd = _weights(tmp_path / 'ddp2')
    for k in w1: assert_close(wd[k], w1[k], rtol=0, atol=1e-6)  # 2 ranks x 2 micro-batches of 2 == one batch of 8
    # the logged gradient norm is the whole batch's (a missing 1/k would log, and clip, k times the gradient)
    r1, r4 = read_metrics(tmp_path / 'one/metrics.jsonl'), read_metrics(tmp_path / 'accum4/metrics.jsonl')
    for a, b in zip(r1, r4):
        assert math.isclose(a['grad_norm'], b['grad_norm'], rel_tol=1e-5) and math.isclose(a['loss'], b['loss'], rel_tol=1e-5)


def test_grad_accum_must_divide_the_per_rank_batch(monkeypatch):
    with pytest.raises(InputError, match='grad_accum=3 does not divide'):
        Learner(make_model(), ce_loss, IndexedData(), cfg_(grad_accum=3))
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(InputError, match='multiple of 16'):
        Learner(make_model(), ce_loss, IndexedData(), cfg_(grad_accum=8))
    with pytest.raises(InputError, match='grad_accum must be'): cfg_(grad_accum=0)


# ---------------------------------------------------------------- torch.compile
def test_compile_keeps_plain_checkpoint_keys(tmp_path):
    torch._dynamo.reset()
    c = cfg_(steps=4, compile=True, ema=None, eval_every=0)
    lrn = Learner(make_model(p=0.0), ce_loss, IndexedData(), c, out=tmp_path, eval_data=IndexedData(16))
    assert isinstance(lrn.train_module.model, torch._dynamo.eval_frame.OptimizedModule)  # really compiled
    s = lrn.fit()
    st = load_checkpoint(tmp_path / 'checkpoint.safetensors')['state']
    assert set(st['model']) == set(make_model().state_dict()) and math.isfinite(s['loss'])
    ref = Learner(make_model(p=0.0), ce_loss, IndexedData(), c.__class__(**{**c.to_dict(), 'compile': False})).fit()
    assert math.isclose(s['loss'], ref['loss'], rel_tol=1e-4)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    "A torch.compile that fails at the first step: one warning, then the same run as without compile."
    class Broken(nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, *a, **k): raise RuntimeError('inductor: no C++ compiler')
    monkeypatch.setattr(torch, 'compile', lambda m, *a, **k: Broken(m))
    c = cfg_(steps=4, compile=True, ema=None, eval_every=0)
    with pytest.warns(UserWarning, match='torch.compile failed'):
        s = Learner(make_model(p=0.0), ce_loss, IndexedData(), c).fit()
    ref = Learner(make_model(p=0.0), ce_loss, IndexedData(), c.__class__(**{**c.to_dict(), 'compile': False})).fit()
    assert math.isclose(s['loss'], ref['loss'], rel_tol=1e-6)
    with pytest.raises(RuntimeError, match='shape'):  # an error of the loss itself is not hidden by the fallback
        bad = lambda m, b, hp: (_ for _ in ()).throw(RuntimeError('shape mismatch in the loss'))
        Learner(make_model(p=0.0), bad, IndexedData(), c).fit()


def test_fused_adamw_step_equals_the_plain_one():
    "The learner's fused AdamW (CPU and CUDA) against torch's per-tensor AdamW on the same gradients."
    import copy
    c = cfg_(steps=3, ema=None, eval_every=0, grad_clip=None, lr_schedule='constant', warmup=0)
    model = make_model(p=0.0)
    ref = copy.deepcopy(model)
    lrn = Learner(model, ce_loss, IndexedData(), c)
    assert lrn.opt.defaults['fused'] is True
    lrn.fit()
    opt = torch.optim.AdamW(ref.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, foreach=False)
    torch.manual_seed(c.seed)
    from torch.utils.data import DataLoader
    from dalle_course.learner import StepBatchSampler
    data = IndexedData()
    for idx in list(StepBatchSampler(len(data), c.batch_size, c.seed, 0, c.steps, 0, 1)):
        batch = torch.utils.data.default_collate([data[i] for i in idx])
        loss = ce_loss(ref, batch, {'step': 0}); loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward(); opt.step(); opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()): assert_close(a, b, atol=1e-6, rtol=1e-5)
