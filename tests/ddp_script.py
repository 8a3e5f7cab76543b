"""A tiny deterministic training run, used by tests/test_learner.py both in one process and under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_script.py OUT_DIR [GRAD_ACCUM]
"""
import sys

import torch
from torch import nn

from dalle_course.learner import Learner, TrainConfig


def build():
    "(model, loss_fn, dataset, cfg): no dropout, so the run is a pure function of its inputs."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).tanh() + 0.1 * torch.randn(64, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    loss_fn = lambda m, b, hp: nn.functional.mse_loss(m(b[0]), b[1])
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, lr_schedule='warmup_cosine', warmup=2, grad_clip=0.5,
                      log_every=1, ckpt_every=3, ema=0.9, seed=0)
    return model, loss_fn, ds, cfg


def main(out, grad_accum: int = 1):
    import dataclasses
    model, loss_fn, ds, cfg = build()
    return Learner(model, loss_fn, ds, dataclasses.replace(cfg, grad_accum=grad_accum), out=out).fit()


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
