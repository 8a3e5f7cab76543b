"""Planted answers for the build-the-whole-piece exercises (lessons 12, 13, 22, 23, 24): the reference and the usual
mistakes, each with a piece of the hint its check must give for it."""
import math
import torch
import torch.nn.functional as F

# ---- 12: the DALL·E loss
def _elb(x, logits, out, beta, map_x=True, exp_b=True, norm='value', kl_sign=1):
    eps = 0.1
    xm = (1 - 2 * eps) * x + eps if map_x else x
    mu, log_b = out[:, :3], out[:, 3:]
    b = log_b.exp() if exp_b else log_b
    nll = math.log(2) + torch.log(b.abs()) + torch.log(xm * (1 - xm)) + (torch.log(xm / (1 - xm)) - mu).abs() / b
    logq = torch.log_softmax(logits, 1)
    kl = (logq.exp() * logq).sum(1) + math.log(logits.shape[1])
    B, _, H, W = x.shape
    if norm == 'value': return (nll.sum() + kl_sign * beta * kl.sum()) / (B * 3 * H * W)
    if norm == 'means': return nll.mean() + beta * kl.mean()
    return (nll.sum() + beta * kl.sum()) / B

def elb_right(x, logits, out, beta): return _elb(x, logits, out, beta)
def elb_no_map(x, logits, out, beta): return _elb(x, logits, out, beta, map_x=False)
def elb_b_not_exp(x, logits, out, beta): return _elb(x, logits, out, beta, exp_b=False)
def elb_two_means(x, logits, out, beta): return _elb(x, logits, out, beta, norm='means')
def elb_per_image(x, logits, out, beta): return _elb(x, logits, out, beta, norm='image')
def elb_kl_sign(x, logits, out, beta): return _elb(x, logits, out, beta, kl_sign=-1)

# ---- 13: the VQ forward
def _vq(z, codebook, beta, permute=True, arg='min', st=True, w_cb=1.0, w_cm=None):
    B, D, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, D) if permute else z.reshape(-1, D)
    d = torch.cdist(flat.detach(), codebook.detach())
    idx = d.argmin(1) if arg == 'min' else d.argmax(1)
    e = codebook[idx]
    zq = flat + (e - flat).detach() if st else e
    loss = w_cb * F.mse_loss(e, flat.detach()) + (beta if w_cm is None else w_cm) * F.mse_loss(flat, e.detach())
    return zq.view(B, h, w, D).permute(0, 3, 1, 2), idx.view(B, h, w), loss

def vq_right(z, codebook, beta): return _vq(z, codebook, beta)
def vq_no_permute(z, codebook, beta): return _vq(z, codebook, beta, permute=False)
def vq_argmax(z, codebook, beta): return _vq(z, codebook, beta, arg='max')
def vq_no_straight_through(z, codebook, beta): return _vq(z, codebook, beta, st=False)
def vq_beta_swapped(z, codebook, beta): return _vq(z, codebook, beta, w_cb=beta, w_cm=1.0)

# ---- 22: multi-head attention
def _mha(x, mask, W, H, scale='d', invert=False, split='hf', out_proj=True, tw=True):
    B, T, D = x.shape; d = D // H
    lin = (lambda t, w, b: t @ w.T + b) if tw else (lambda t, w, b: t @ w + b)
    q, k, v = lin(x, W['Wq'], W['bq']), lin(x, W['Wk'], W['bk']), lin(x, W['Wv'], W['bv'])
    heads = (lambda t: t.view(B, T, H, d).transpose(1, 2)) if split == 'hf' else (lambda t: t.view(B, T, d, H).permute(0, 3, 1, 2))
    q, k, v = heads(q), heads(k), heads(v)
    s = q @ k.transpose(-2, -1) / {'d': math.sqrt(d), 'D': math.sqrt(D), 'none': 1.0}[scale]
    s = s.masked_fill(mask if invert else ~mask, float('-inf'))
    y = (s.softmax(-1).nan_to_num(0.0) @ v).transpose(1, 2).reshape(B, T, D)
    return lin(y, W['Wo'], W['bo']) if out_proj else y

def mha_right(x, mask, W, H): return _mha(x, mask, W, H)
def mha_mask_inverted(x, mask, W, H): return _mha(x, mask, W, H, invert=True)
def mha_scale_D(x, mask, W, H): return _mha(x, mask, W, H, scale='D')
def mha_no_scale(x, mask, W, H): return _mha(x, mask, W, H, scale='none')
def mha_split_d_first(x, mask, W, H): return _mha(x, mask, W, H, split='df')
def mha_no_out_proj(x, mask, W, H): return _mha(x, mask, W, H, out_proj=False)
def mha_weight_not_transposed(x, mask, W, H): return _mha(x, mask, W, H, tw=False)

# ---- 23: the G1 forward
def _g1(p, text, img, pos=True, split='L-1', shift=True):
    L, N = text.shape[1], img.shape[1]
    te = p['text_emb'](text) + (p['text_pos'](L) if pos else 0)
    ie = p['image_emb'](img[:, :-1]) + (p['image_pos'](N - 1) if pos else 0)
    y = p['transformer'](torch.cat([te, ie], 1))
    s = L - 1 if split == 'L-1' else L
    return {'text_logits': p['text_head'](y[:, :L - 1] if split == 'L-1' else y[:, :L]), 'image_logits': p['image_head'](y[:, s:])}

def g1_right(p, text, img): return _g1(p, text, img)
def g1_no_positions(p, text, img): return _g1(p, text, img, pos=False)
def g1_split_at_L(p, text, img): return _g1(p, text, img, split='L')

# ---- 24: the sampling loop
def _loop(prior, text, temperature, top_k, guidance, generator, order='temp-first', cache=True, batched=True, guide_mode='right',
          ignore_top_k=False):
    B, N = text.shape[0], prior.n_img
    cfg = guidance != 1.0
    rows = torch.cat([text, prior.null_text(B)]) if cfg else text
    both = (lambda t: torch.cat([t, t])) if cfg else (lambda t: t)
    out = torch.zeros(B, N, dtype=torch.long)
    if not cache:
        for i in range(N):
            l = prior(rows, both(out))['image_logits'][:, i].float()
            if cfg: l = l[B:] + guidance * (l[:B] - l[B:])
            l = l / temperature
            if top_k: l = l.masked_fill(l < l.topk(top_k, -1).values[:, -1:], float('-inf'))
            out[:, i] = torch.multinomial(l.softmax(-1), 1, generator=generator)[:, 0]
        return out
    state, logits = prior.prefix(rows)
    for i in range(N):
        l = logits.float()
        if cfg:
            c, u = l[:B], l[B:]
            l = (u + guidance * (c - u) if guide_mode == 'right' else c if guide_mode == 'cond-only'
                 else c + guidance * (c - u))
        if order == 'temp-first': l = l / temperature  # order 'none': the temperature is ignored
        if top_k and not ignore_top_k: l = l.masked_fill(l < l.topk(top_k, -1).values[:, -1:], float('-inf'))
        if order == 'temp-last': l = l / temperature
        elif order == 'temp-times': l = l * temperature
        tok = torch.multinomial(l.softmax(-1), 1, generator=generator)
        out[:, i] = tok[:, 0]
        if i + 1 < N: logits = prior.extend(state, both(tok))[:, -1]
    return out

def loop_right(*a): return _loop(*a)
def loop_no_cache(*a): return _loop(*a, cache=False)
def loop_times_temperature(*a): return _loop(*a, order='temp-times')
def loop_wrong_guidance(*a): return _loop(*a, guide_mode='cond-based')
def loop_no_temperature(*a): return _loop(*a, order='none')           # ignores the temperature
def loop_no_top_k(*a): return _loop(*a, ignore_top_k=True)             # ignores top_k
def loop_cond_only(*a): return _loop(*a, guide_mode='cond-only')       # stacks the rows but ignores the guidance scale
def loop_guide_above_one(prior, text, t, k, g, gen): return _loop(prior, text, t, k, g if g > 1 else 1.0, gen)  # s < 1 ignored
def loop_float_tokens(*a): return _loop(*a).float()                     # token ids as floats
def loop_writes_text(prior, text, *a):                                  # zeroes the caller's captions after using them
    out = _loop(prior, text, *a); text.zero_(); return out

PLANTED = {
    'check_dalle_elb': (elb_right, [(elb_no_map, 'φ(x)'), (elb_b_not_exp, 'exp(log_b)'), (elb_two_means, 'hw/(3HW)'),
                                    (elb_per_image, 'per pixel value, not per image'), (elb_kl_sign, 'never negative')]),
    'check_vq_forward': (vq_right, [(vq_no_permute, 'permute(0, 2, 3, 1)'), (vq_argmax, 'argmin'),
                                    (vq_no_straight_through, 'sg(e − z)'), (vq_beta_swapped, 'moves only z')]),
    'check_mha': (mha_right, [(mha_mask_inverted, 'True in the mask means may attend'), (mha_scale_D, 'head size'),
                              (mha_no_scale, 'divide the scores by √d'), (mha_split_d_first, 'heads first'),
                              (mha_no_out_proj, 'output projection'), (mha_weight_not_transposed, 'x Wᵀ + b')]),
    'check_g1_forward': (g1_right, [(g1_no_positions, 'position embeddings'), (g1_split_at_L, 'position L−1 on')]),
    'check_sample_loop': (loop_right, [(loop_no_cache, 'KV cache'), (loop_times_temperature, 'divide by the temperature'),
                                       (loop_wrong_guidance, 'uncond + s·(cond − uncond)'),
                                       (loop_no_temperature, 'divide by the temperature'),
                                       (loop_no_top_k, 'keep the top_k largest'), (loop_cond_only, 'uncond + s·(cond − uncond)'),
                                       (loop_guide_above_one, 'with guidance ≠ 1'), (loop_float_tokens, 'integer ids'),
                                       (loop_writes_text, 'must not change the captions')]),
}
