"""Quantiser state under DDP: used by tests/test_vqvae.py, in one process and under torchrun (2 Gloo processes).

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/vqvae_ddp_script.py OUT_DIR
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dalle_course.vqvae import VectorQuantizer

CONFIGS = {  # name: quantiser settings
    'ema': dict(ema=True, decay=0.9, kmeans_init=False, restart_dead=False),
    'ema+tricks': dict(ema=True, decay=0.9, kmeans_init=True, kmeans_iters=2, restart_dead=True, dead_after=1),
    'grad+tricks': dict(ema=False, kmeans_init=True, kmeans_iters=2, restart_dead=True, dead_after=1),
}


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    "This rank's slice of the global batch of `step` (the whole batch when world == 1)."
    z = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(100 + step))  # (B, D, h, w), global
    return z.chunk(world)[rank] if world > 1 else z


def run(rank: int = 0, world: int = 1, steps: int = 5) -> dict:
    out = {}
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        vq = VectorQuantizer(32, 4, **kw).train()
        torch.manual_seed(1 + rank)  # different random streams per rank: restarts must still agree
        for s in range(steps): vq(batch(s, rank, world))
        out[name] = {k: v.clone() for k, v in vq.state_dict().items()}
    return out


if __name__ == '__main__':
    dist.init_process_group('gloo')
    r, w = dist.get_rank(), dist.get_world_size()
    torch.save(run(r, w), Path(sys.argv[1]) / f'rank{r}.pt')
    dist.destroy_process_group()
