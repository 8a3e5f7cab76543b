"""dalle_course against dalle-pytorch 1.6.6 on the same configuration, in one run on one machine.

    python bench/side_by_side.py --dalle-pytorch-python runs/dalle-pytorch-venv/bin/python [--config cpu] [--out FILE.json]

Each measurement runs in a fresh process (dalle-pytorch in its own virtual environment, made by
bench/install_dalle_pytorch.sh; dalle_course in this one), the two implementations alternating, with the same
warm-up and timing rules: training = forward + backward + AdamW step on random caption and image tokens, the median
of --steps timed steps after --warmup; generation = one batch of image *tokens* (no decoding to pixels: dalle-pytorch's
VAE decode is replaced by the identity), the median of --repeats batches after one warm-up batch. Prints a table of
the ratios and writes every number to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # the same sizes as dalle_course.speed.BENCH_CONFIGS (kept here so dalle-pytorch's side needs no dalle_course)
    'tiny': dict(dim=32, depth=2, n_heads=2, text_len=8, text_vocab=50, grid=4, image_vocab=16, batch_size=2),
    'cpu': dict(dim=256, depth=4, n_heads=8, text_len=32, text_vocab=1000, grid=16, image_vocab=512, batch_size=8),
    'anchor': dict(dim=512, depth=12, n_heads=8, text_len=64, text_vocab=10000, grid=16, image_vocab=512, batch_size=64),
}
DP_KINDS = {'row': 'axial_row', 'column': 'axial_col', 'conv': 'conv_like', 'causal': 'full'}


def _dalle_kinds(depth: int) -> list[str]:  # DALL-E's layer pattern as dalle_course.masks.dalle_layer_kinds has it
    return ['conv' if i == depth - 1 else 'column' if (i - 2) % 4 == 0 else 'row' for i in range(depth)]


def _sync(torch, device):
    if device == 'cuda': torch.cuda.synchronize()


def _time(torch, fn, warmup, repeats, device):
    for _ in range(warmup): fn()
    _sync(torch, device); ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); _sync(torch, device); ts.append(time.perf_counter() - t)
    return ts


def _dalle_pytorch(cfg, mask, device):
    import torch
    from dalle_pytorch import DALLE, DiscreteVAE
    g = cfg['grid']
    n_down = {4: 2, 16: 2, 32: 3}.get(g, 2)
    vae = DiscreteVAE(image_size=g * 2 ** n_down, num_layers=n_down, num_tokens=cfg['image_vocab'], codebook_dim=64, hidden_dim=16)
    kinds = ['causal'] * cfg['depth'] if mask == 'causal' else _dalle_kinds(cfg['depth'])
    model = DALLE(dim=cfg['dim'], vae=vae, num_text_tokens=cfg['text_vocab'], text_seq_len=cfg['text_len'],
                  depth=cfg['depth'], heads=cfg['n_heads'], dim_head=cfg['dim'] // cfg['n_heads'],
                  attn_types=tuple(DP_KINDS[k] for k in kinds)).to(device)
    model.vae.decode = lambda seq: seq  # time the tokens only, as dalle_course's bench does
    return model


def measure(impl, what, cfg, mask, batch, steps, warmup, repeats, device, threads, compile_step=False):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    text = torch.randint(1, cfg['text_vocab'], (batch, cfg['text_len'])).to(device)
    image = torch.randint(0, cfg['image_vocab'], (batch, cfg['grid'] ** 2)).to(device)
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if device == 'cuda' else torch.autocast('cpu', enabled=False)
    if impl == 'dalle-pytorch':
        model = _dalle_pytorch(cfg, mask, device)
        loss_fn = lambda: model(text, image, return_loss=True)
        gen = lambda: model.generate_images(text)
    else:
        sys.path.insert(0, str(ROOT))
        from dalle_course.sampling import sample
        from dalle_course.speed import StaticDecoder, _prior
        model = _prior(cfg, mask, device)
        dec = StaticDecoder(model, compile=compile_step)
        loss_fn = lambda: model.loss_fn(model, {'text': text, 'image': image})[0]
        gen = lambda: sample(dec, text)
    if what == 'train':
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=impl == 'dalle_course' or device == 'cuda')  # as each trains: dalle_course's Learner fuses AdamW

        def step():
            with amp: loss = loss_fn()
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        ts = _time(torch, step, warmup, steps, device)
        return {'tokens_per_s': batch * (cfg['text_len'] + cfg['grid'] ** 2) / statistics.median(ts), 'times': ts}
    model.eval()
    with torch.no_grad(), amp: ts = _time(torch, gen, 1, repeats, device)
    return {'images_per_s': batch / statistics.median(ts), 'times': ts}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--dalle-pytorch-python', type=Path, help="the python of dalle-pytorch's virtual environment")
    ap.add_argument('--config', default='cpu', choices=list(CONFIGS))
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--steps', type=int, default=10, help='timed training steps')
    ap.add_argument('--warmup', type=int, default=3, help='untimed training steps first')
    ap.add_argument('--repeats', type=int, default=1, help='timed generation batches (after one warm-up batch)')
    ap.add_argument('--generate-batches', default='8', help='generation batch sizes, e.g. 8,64')
    ap.add_argument('--compile', action='store_true', help="dalle_course generates with its compiled static step (compiled in the warm-up batch)")
    ap.add_argument('--out', type=Path, default=None, help='write every number to this new .json file')
    ap.add_argument('--one', help=argparse.SUPPRESS)  # internal: one measurement, as JSON on stdout
    a = ap.parse_args()
    cfg = CONFIGS[a.config]
    if a.one:
        impl, what, mask, batch = json.loads(a.one)
        print(json.dumps(measure(impl, what, cfg, mask, batch, a.steps, a.warmup, a.repeats, a.device, a.threads, a.compile)))
        return
    if a.dalle_pytorch_python is None or not a.dalle_pytorch_python.exists():
        sys.exit("bench: pass --dalle-pytorch-python (bench/install_dalle_pytorch.sh makes runs/dalle-pytorch-venv)")
    if a.out is not None and a.out.exists(): sys.exit(f"bench: {a.out} exists; choose a new file")
    pythons = {'dalle-pytorch': str(a.dalle_pytorch_python), 'dalle_course': sys.executable}
    jobs = [('train', m, cfg['batch_size']) for m in ('causal', 'dalle')]
    jobs += [('generate', 'causal', int(b)) for b in a.generate_batches.split(',')]
    results = []
    for what, mask, batch in jobs:
        for impl in ('dalle-pytorch', 'dalle_course'):
            cmd = [pythons[impl], __file__, '--config', a.config, '--device', a.device, '--threads', str(a.threads),
                   '--steps', str(a.steps), '--warmup', str(a.warmup), '--repeats', str(a.repeats),
                   '--one', json.dumps([impl, what, mask, batch])] + (['--compile'] if a.compile else [])
            t = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode: sys.exit(f"bench: {impl} {what} failed:\n{r.stderr[-3000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            results.append({'impl': impl, 'what': what, 'mask': mask, 'batch': batch, **res})
            key = 'tokens_per_s' if what == 'train' else 'images_per_s'
            print(f"{impl:14} {what:8} mask {mask:6} batch {batch:3}: {res[key]:12.3f} {key.replace('_per_s', '/s')} "
                  f"({time.time() - t:.0f} s)", flush=True)
    import torch
    out = {'config': a.config, 'sizes': cfg, 'device': a.device, 'compile': a.compile, 'threads': a.threads, 'steps': a.steps,
           'warmup': a.warmup, 'repeats': a.repeats, 'torch': torch.__version__, 'results': results}
    print('\n| measurement | dalle-pytorch 1.6.6 | dalle_course | ratio |\n|---|---:|---:|---:|')
    for i in range(0, len(results), 2):
        dp, dc = results[i], results[i + 1]
        key = 'tokens_per_s' if dp['what'] == 'train' else 'images_per_s'
        unit = 'tokens/s' if dp['what'] == 'train' else 'images/s'
        name = f"{dp['what']}, {'full attention' if dp['mask'] == 'causal' else 'DALL-E masks'}, batch {dp['batch']}"
        print(f"| {name} ({unit}) | {dp[key]:,.3f} | {dc[key]:,.3f} | {dc[key] / dp[key]:.1f}x |")
    if a.out is not None: a.out.write_text(json.dumps(out, indent=1)); print(f"numbers in {a.out}")


if __name__ == '__main__':
    main()
