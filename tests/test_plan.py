"""`dalle-course plan` (lesson 34): a traced step's memory and FLOPs, checked against hand counts, lesson 32's counter and
a real CPU step; every train command plans; the CUDA-only paths (bf16, fused AdamW, DALL-E masks, FlexAttention) traced
at full size on fake tensors."""
import subprocess, sys

import pytest
import torch
from torch import nn

from dalle_course.plan import (COLLECTIVE_S, GPUS, HEADROOM, check_fsdp_on_cpu, check_on_cpu, comm_time, memory_per_gpu,
                               plan_report, plan_run, stage_spec, trace_step)
from dalle_course.prior import JointPrior
from dalle_course.speed import BENCH_CONFIGS, _batch, _prior, train_flops_per_token


def _mse(model, batch, hp=None):
    return ((model(batch['x']) - 1) ** 2).mean(), {}


def test_memory_by_kind_of_a_linear_layer():
    "Weights 4P bytes, AdamW 8P, the input and output kept: counted by hand for one fp32 Linear."
    d, B = 512, 256
    t = trace_step(nn.Linear(d, d), _mse, lambda: {'x': torch.randn(B, d)}, amp=False)
    P = d * d + d
    assert t['params'] == P and t['param_bytes'] == 4 * P
    assert t['peak_kinds']['param'] == 4 * P
    assert t['peak_kinds']['opt'] == 8 * P + 4 * len(list(nn.Linear(d, d).parameters()))  # two moments + a step count each
    assert t['peak_bytes'] >= 4 * P + 8 * P + 4 * B * d  # weights, AdamW, at least the input
    assert t['gathered_bytes'] == 2 * 4 * P  # one unit: its weights and its gradients whole
    assert t['flops'] == 2 * 2 * B * d * d  # the forward product, and the weight's gradient (the input needs none)


def test_flops_match_the_counter_and_count_attention():
    "Within 5% of 6 P + 12 L T D: a counter that misses SDPA's CPU kernel would be about 25% short here."
    cfg = BENCH_CONFIGS['cpu']
    t = trace_step(_prior(cfg, 'causal', 'cpu'), JointPrior.loss_fn, lambda: _batch(cfg, 2, 'cpu'), amp=False)
    seq = cfg['text_len'] + cfg['grid'] ** 2
    counter = train_flops_per_token(_prior(cfg, 'causal', 'cpu'), seq, cfg['depth'], cfg['dim']) * 2 * seq
    assert abs(t['flops'] / counter - 1) < 0.05, (t['flops'], counter)


def test_the_plan_matches_a_measured_cpu_step():
    "A real step on this CPU grows with the batch as the trace says (glibc returning freed blocks), and the rest is flat."
    c = check_on_cpu('cpu', (4, 16))
    assert 0.9 < c['growth_ratio'] < 1.1, c
    extra = [r['measured_bytes'] - r['planned_bytes'] for r in c['rows']]
    assert all(0 < e < 400 * 2 ** 20 for e in extra), extra  # the process's own cost, not the tensors'
    assert abs(extra[1] - extra[0]) < 0.1 * c['rows'][1]['planned_bytes'], extra


def test_ddp_and_fsdp_memory():
    t = dict(peak_bytes=10_000, param_bytes=1_000, trainable_bytes=900, gathered_bytes=300,
             peak_kinds=dict(param=1_000, grad=1_000, opt=2_000, act=6_000))
    assert memory_per_gpu(t, 'single', 1) == 10_000
    assert memory_per_gpu(t, 'ddp', 4) == 10_900  # DDP's buckets: a flat copy of the trainable gradients
    assert memory_per_gpu(t, 'fsdp', 4) == 10_000 - 4_000 * 3 / 4 + 300
    # with the trace's series, the sharded step's own peak: here the state-heavy moment (the optimizer step) is the
    # unsharded peak, but once sharded the activation-heavy moment (end of the forward) is higher
    t['series'] = [(10_000, 8_000), (9_000, 1_000)]
    assert memory_per_gpu(t, 'fsdp', 4) == max(10_000 - 8_000 * 0.75, 9_000 - 1_000 * 0.75) + 300 == 8_550


@pytest.mark.parametrize('gpus,batch', [(4, 1), (4, 8)], ids=['state-heavy', 'activation-heavy'])
def test_fsdp_plan_against_pytorchs_fully_shard(gpus, batch):
    "PyTorch's FSDP2 on a fake process group holds what the plan says, to within 10% (and never more)."
    c = check_fsdp_on_cpu('cpu', gpus, batch)
    assert 1.0 <= c['planned_bytes'] / c['measured_bytes'] < 1.10, c
    assert c['measured_bytes'] < c['single_bytes']  # sharding saved something


def test_communication_and_epochs():
    t = dict(param_bytes=100 * 2 ** 20, trainable_bytes=100 * 2 ** 20)
    assert comm_time(t, 'single', 8, 1, 450, 13) == 0
    ddp = comm_time(t, 'ddp', 4, 1, 450, 13)
    assert ddp == pytest.approx(2 * 0.75 * 100 * 2 ** 20 / 450e9 + 4 * COLLECTIVE_S)  # 4 buckets of 25 MiB
    assert comm_time(t, 'ddp', 4, 3, 450, 13) == ddp  # no_sync: one all-reduce per step, whatever the micro-batches
    fsdp = comm_time(t, 'fsdp', 4, 2, 450, 13)
    assert fsdp == pytest.approx(2 * (3 * 0.75 * 100 * 2 ** 20 / 450e9 + 3 * 13 * COLLECTIVE_S))
    p = plan_run(stage_spec('tokenizer', 'fsq', 'tiny', n_train=1000), 'h100', 1)
    r = p['rows'][0]
    assert p['steps_per_epoch'] == 1000 // p['batch_size'] and r['epoch_s'] == pytest.approx(r['step_s'] * p['steps_per_epoch'])
    assert r['step_s'] >= r['compute_s'] > 0


def test_refusals():
    from dalle_course.core import InputError
    with pytest.raises(InputError, match='--grad-accum'):
        stage_spec('clip', 'vit', 'tiny', grad_accum=2)
    s = stage_spec('tokenizer', 'fsq', 'tiny')
    with pytest.raises(InputError, match='one node'):
        plan_run(s, 'h100', 16)
    with pytest.raises(InputError, match='--mfu'):
        plan_run(s, 'h100', 1, mfu=0)
    with pytest.raises(InputError, match='peak'):
        plan_run(s, 'h100', 1, peak_tflops=0)
    with pytest.raises(InputError, match='does not split'):
        plan_run(stage_spec('tokenizer', 'fsq', 'tiny', batch_size=6), 'h100', 4)


TINY = [('tokenizer', k) for k in ('dvae-dalle', 'dvae-thesis', 'vqvae', 'vqvae-ema', 'vqvae-rotation', 'fsq')] + \
       [('prior', a) for a in ('joint', 'separate', 'paella', 'maskgit')] + [('classifier', 'cnn'), ('clip', 'vit')]


@pytest.mark.parametrize('stage,kind', TINY, ids=[f'{s}-{k}' for s, k in TINY])
def test_every_train_command_plans(stage, kind):
    preset = {'classifier': 'ruler'}.get(stage, 'tiny')
    p = plan_run(stage_spec(stage, kind, preset, batch_size=4), 'h100', 2)  # 4: splits over the 2 GPUs
    assert [r['how'] for r in p['rows']] == ['ddp', 'fsdp']
    for r in p['rows']:
        assert r['memory_bytes'] > p['param_bytes'] and r['flops_per_gpu'] > 0 and r['fits']
        assert r['run_s'] == pytest.approx(r['step_s'] * p['steps'])
    ddp, fsdp = p['rows']
    assert fsdp['peak_kinds']['opt'] == pytest.approx(ddp['peak_kinds']['opt'] / 2)  # each of 2 GPUs holds half
    assert 'fits' in plan_report(p)


def test_gpu_preset_at_full_size_with_bf16_fused_adamw_dalle_masks_and_dropout():
    "The CUDA run's path traced at its real sizes: 64 captions x (text + 32 x 32 tokens), 12 layers of width 512."
    s = stage_spec('prior', 'joint', 'gpu-mdmnist')
    assert s.recipe.model['mask_pattern'] == 'dalle' and s.recipe.model['dropout'] > 0
    p = plan_run(s, 'h100', 1)
    r = p['rows'][0]
    assert 30e6 < p['params'] < 50e6
    # activations dominate; with the T x T attention weights kept (SDPA's math path) it would not fit at all
    assert 8 * 2 ** 30 < r['memory_bytes'] < 40 * 2 ** 30 and r['fits'] and r['grad_accum'] == 1
    assert r['memory_bytes'] * HEADROOM <= GPUS['h100'].memory_gib * 2 ** 30


def test_a_run_that_does_not_fit_gets_micro_batches():
    s = stage_spec('prior', 'joint', 'gpu-mdmnist', batch_size=256)
    r = plan_run(s, 'h100', 1)['rows'][0]
    assert r['grad_accum'] > 1 and r['fits'] and r['micro_batch'] * r['grad_accum'] == 256


def test_flex_attention_with_dalle_masks_at_full_size():
    "FlexAttention's block masks for DALL-E's row, column and conv layers, built and run at the anchor size under bf16."
    from torch._subclasses.fake_tensor import FakeTensorMode
    from dalle_course.plan import fake_model
    cfg = BENCH_CONFIGS['anchor']
    outs = {}
    for backend in ('sdpa', 'flex'):
        m = _prior(cfg, 'dalle', 'cpu').eval()
        m.transformer.set_attention(backend)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_model(m, mode)
        with mode, torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            b = _batch(cfg, cfg['batch_size'], 'cpu')
            outs[backend] = {k: (tuple(v.shape), v.dtype) for k, v in m(b['text'], b['image']).items()}
    assert outs['flex'] == outs['sdpa']
    assert outs['flex']['image_logits'] == ((64, 256, 512), torch.bfloat16)


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'dalle_course.cli', *args], capture_output=True, text=True)


@pytest.mark.parametrize('args,words', [
    (['plan', '--mfu', '2', 'train', 'tokenizer', '--kind', 'fsq'], '--mfu'),
    (['plan'], 'plan what?'),
    (['plan', '--table', 'train', 'prior', '--arch', 'joint'], '--table takes no train command'),
    (['plan', '--check', '--gpu', 'h200'], '--check takes no --gpu'),
    (['plan', 'train', 'tokenizer', '--kind', 'fsq', '--gpus', '2'], 'put it before `train`'),
    (['plan', '--gpus', '9', 'train', 'tokenizer', '--kind', 'fsq'], 'one node'),
    (['plan', 'train', 'clip', '--kind', 'vit', '--grad-accum', '2'], 'refuses --grad-accum'),
    (['plan', 'train', 'tokenizer', '--kind', 'fsq', '--preset', 'thesis-cub64'], "has no settings for 'fsq'"),
    (['plan', 'train', 'prior', '--arch', 'joint', '--data', '/nonexistent/md'], '/nonexistent/md'),
], ids=['mfu', 'no-command', 'table-and-command', 'check-and-gpu', 'option-after-train', 'gpus-9', 'clip-accum',
        'kind-preset', 'missing-data'])
def test_cli_refusals_are_one_line(args, words, tmp_path):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_cli_plans_a_train_command_as_typed(tmp_path):
    out = tmp_path / 'run'
    r = _cli('plan', '--gpu', 'h200', 'train', 'tokenizer', '--kind', 'dvae-dalle', '--preset', 'tiny', '--out', str(out))
    assert r.returncode == 0, r.stderr
    assert 'NVIDIA H200' in r.stdout and 'fits' in r.stdout and 'assumed: no --data' in r.stdout
    assert not out.exists()  # a plan writes nothing


def test_the_exercise_check_takes_every_correct_form():
    "Whole bytes, floats, numpy and torch scalars, and the library's own answer pass; a mistake gets its hint."
    import numpy as np
    from dalle_course.checks import check_memory_per_gpu
    from dalle_course.exercises import CheckFailure
    check_memory_per_gpu(memory_per_gpu)
    check_memory_per_gpu(lambda t, how, n: round(memory_per_gpu(t, how, n)))
    check_memory_per_gpu(lambda t, how, n: np.int64(round(memory_per_gpu(t, how, n))))
    check_memory_per_gpu(lambda t, how, n: torch.tensor(memory_per_gpu(t, how, n), dtype=torch.float32))
    check_memory_per_gpu(lambda t, how, n: np.float32(memory_per_gpu(t, how, n)))
    check_memory_per_gpu(lambda t, how, n: np.array(memory_per_gpu(t, how, n)))
    with pytest.raises(CheckFailure, match='flat copy'):
        check_memory_per_gpu(lambda t, how, n: t['peak_bytes'] if how == 'ddp' else memory_per_gpu(t, how, n))
