"""dalle_course.gumbel as a user calls it, against independent references: closed forms, PyTorch's own
`F.gumbel_softmax`, the chain rule written out, and chi-square tests on fixed seeds (deterministic, not flaky)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dalle_course.core import InputError
from dalle_course.gumbel import (_gumbel_from_uniform, chi_square_test, exact_grad, gumbel_max_sample, gumbel_softmax,
                                 relaxed_grad, sample_gumbel, score_function_grad, straight_through)

EULER_GAMMA = 0.5772156649015329


def gen(seed):
    return torch.Generator().manual_seed(seed)


def one_hot_along(index, K, dim, ndim):
    "Reference one-hot: F.one_hot puts the classes last; move them to `dim`."
    return F.one_hot(index, K).movedim(-1, dim % ndim).float()


# ---------------------------------------------------------------- Gumbel noise

def test_sample_gumbel_is_standard_gumbel():
    n = 200_000
    g = sample_gumbel(n, generator=gen(0)).double()
    assert g.shape == (n,) and torch.isfinite(g).all()
    assert abs(g.mean().item() - EULER_GAMMA) < 0.01 and abs(g.var().item() - math.pi ** 2 / 6) < 0.03
    gs = g.sort().values  # Kolmogorov-Smirnov distance to the CDF exp(-exp(-g)), 1% critical value 1.63/sqrt(n)
    ks = ((torch.arange(1, n + 1, dtype=torch.float64) / n) - torch.exp(-torch.exp(-gs))).abs().max().item()
    assert ks < 1.63 / math.sqrt(n)


def test_gumbel_transform_is_finite_at_the_ends_and_exact_inside():
    u = torch.tensor([0.0, 1e-38, 1e-6, 0.25, 0.5, 0.9, 1 - 2 ** -24, 1.0])
    g = _gumbel_from_uniform(u)
    assert torch.isfinite(g).all()
    ref = torch.tensor([-math.log(-math.log(v)) for v in u[2:7].tolist()])
    torch.testing.assert_close(g[2:7], ref)
    assert g[0] < g[2] < g[-2] < g[-1]  # clamping keeps the order: u = 0 is the smallest, u = 1 the largest


def test_sample_gumbel_generator_shape_dtype():
    a, b = sample_gumbel((3, 4), generator=gen(1)), sample_gumbel((3, 4), generator=gen(1))
    assert torch.equal(a, b) and not torch.equal(a, sample_gumbel((3, 4), generator=gen(2)))
    state = torch.get_rng_state()
    sample_gumbel((5,), generator=gen(3))
    assert torch.equal(state, torch.get_rng_state()), 'a generator must leave the global RNG alone'
    assert sample_gumbel(7).shape == (7,) and sample_gumbel(torch.Size([2, 3])).shape == (2, 3)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        x = sample_gumbel(500_000, generator=gen(4), dtype=dt)
        assert x.dtype == dt and torch.isfinite(x).all()


# ---------------------------------------------------------------- chi-square helper

def _counts_with_stat(x, probs, n=1000):
    "Non-integer counts whose Pearson statistic against probs is exactly x."
    e = torch.tensor(probs, dtype=torch.float64) * n
    d = math.sqrt(x / (1 / e[0] + 1 / e[1]))
    return e + torch.tensor([d, -d] + [0.0] * (len(probs) - 2), dtype=torch.float64)


@pytest.mark.parametrize('x', [0.3, 2.0, 7.5, 20.0])
def test_chi_square_p_value_closed_forms(x):
    for probs, sf in [([0.4, 0.6], math.erfc(math.sqrt(x / 2))),                        # 1 dof
                      ([0.2, 0.3, 0.5], math.exp(-x / 2)),                               # 2 dof
                      ([0.1, 0.2, 0.3, 0.15, 0.25], math.exp(-x / 2) * (1 + x / 2))]:    # 4 dof
        stat, p = chi_square_test(_counts_with_stat(x, probs), probs)
        assert stat == pytest.approx(x, rel=1e-9) and p == pytest.approx(sf, rel=1e-9)


def test_chi_square_statistic_and_edge_cases():
    counts, probs = torch.tensor([30, 50, 20]), torch.tensor([2.0, 5.0, 3.0])  # unnormalised probs are fine
    stat, _ = chi_square_test(counts, probs)
    assert stat == pytest.approx((30 - 20) ** 2 / 20 + (50 - 50) ** 2 / 50 + (20 - 30) ** 2 / 30)
    assert chi_square_test([10, 0, 5], [0.5, 0.0, 0.5])[1] > 0.05       # zero-probability category, never drawn
    assert chi_square_test([10, 1, 5], [0.5, 0.0, 0.5]) == (math.inf, 0.0)
    with pytest.raises(InputError, match='categories'):
        chi_square_test([1, 2, 3], [0.5, 0.5])


# ---------------------------------------------------------------- Gumbel-max sampling

def test_gumbel_max_sample_follows_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, -float('inf'), 0.0])
    n = 60_000
    z = gumbel_max_sample(logits.expand(n, 6), generator=gen(0))
    assert z.dtype == torch.int64 and z.shape == (n,)
    counts = torch.bincount(z, minlength=6)
    assert counts[4] == 0                                     # masked category never drawn
    assert chi_square_test(counts, logits.softmax(-1))[1] > 1e-3
    wrong = torch.bincount((logits + torch.rand(n, 6, generator=gen(0))).argmax(-1), minlength=6)  # uniform noise
    assert chi_square_test(wrong, logits.softmax(-1))[1] < 1e-6  # the test has power


def test_gumbel_max_sample_dim_on_dvae_logits():
    B, K, h, w = 4, 5, 30, 30
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, 0.5])
    lg = logits.view(1, K, 1, 1).expand(B, K, h, w)                     # (B, K, h, w)
    codes = gumbel_max_sample(lg, dim=1, generator=gen(1))
    assert codes.shape == (B, h, w)
    assert chi_square_test(torch.bincount(codes.flatten(), minlength=K), logits.softmax(-1))[1] > 1e-3
    # the same noise, moved: dim=1 on (B, K, h, w) equals dim=-1 on the permuted tensor with the permuted noise
    lg2 = torch.randn(B, K, h, w)
    g = sample_gumbel(lg2.shape, generator=gen(2))
    assert torch.equal(gumbel_max_sample(lg2, dim=1, generator=gen(2)), (lg2 + g).permute(0, 2, 3, 1).argmax(-1))


# ---------------------------------------------------------------- gumbel_softmax

@pytest.mark.parametrize('shape,dim,tau', [((7,), -1, 1.0), ((4, 6), 0, 0.5), ((2, 8, 3, 3), 1, 0.3), ((3, 4, 5), -2, 2.0)])
def test_gumbel_softmax_formula_with_the_same_noise(shape, dim, tau):
    lg = torch.randn(shape, generator=gen(0)) * 2
    g = sample_gumbel(shape, generator=gen(5))
    z = (lg.double() + g.double()) / tau                                  # reference softmax written out in float64
    ref = torch.exp(z - z.amax(dim, keepdim=True)); ref = ref / ref.sum(dim, keepdim=True)
    y = gumbel_softmax(lg, tau, dim=dim, generator=gen(5))
    torch.testing.assert_close(y, ref.float(), atol=1e-6, rtol=1e-5)
    yh = gumbel_softmax(lg, tau, hard=True, dim=dim, generator=gen(5))
    assert torch.equal(yh, one_hot_along((lg + g).argmax(dim), shape[dim], dim, len(shape)))


@pytest.mark.parametrize('tau', [0.3, 1.0, 3.0])
def test_same_distribution_as_torch(tau):
    lg = torch.tensor([0.5, -1.0, 1.5, 0.0, 0.3, -0.2])
    pi, n = lg.softmax(-1), 40_000
    ours_h = gumbel_softmax(lg.expand(n, 6), tau, hard=True, generator=gen(1))
    torch.manual_seed(2); theirs_h = F.gumbel_softmax(lg.expand(n, 6), tau, hard=True)
    for h in (ours_h, theirs_h):
        assert torch.equal(h.sum(-1), torch.ones(n)) and chi_square_test(h.argmax(-1).bincount(minlength=6), pi)[1] > 1e-3
    ours = gumbel_softmax(lg.expand(n, 6), tau, generator=gen(3))
    torch.manual_seed(4); theirs = F.gumbel_softmax(lg.expand(n, 6), tau)
    z = (ours.mean(0) - theirs.mean(0)) / (ours.var(0) / n + theirs.var(0) / n).sqrt()
    assert z.abs().max() < 4.5, z                                       # E[y] agrees within sampling error
    se_var = lambda y: (y - y.mean(0)).pow(2).var(0) / n                 # squared standard error of a variance
    zv = (ours.var(0) - theirs.var(0)) / (se_var(ours) + se_var(theirs)).sqrt()
    assert zv.abs().max() < 4.5, zv                                      # the spread agrees too


def test_straight_through_gradient_equals_soft_gradient():
    lg = torch.randn(8, 10, generator=gen(0)).requires_grad_()
    w, tau = torch.randn(8, 10, generator=gen(1)), 0.5
    grads = []
    for hard in (False, True):
        (gumbel_softmax(lg, tau, hard=hard, generator=gen(7)) * w).sum().backward()
        grads.append(lg.grad.clone()); lg.grad = None
    torch.testing.assert_close(grads[1], grads[0])
    y = gumbel_softmax(lg.detach(), tau, generator=gen(7))                # chain rule by hand: y * (w - y.w) / tau
    torch.testing.assert_close(grads[0], y * (w - (y * w).sum(-1, keepdim=True)) / tau, atol=1e-6, rtol=1e-5)
    torch.manual_seed(9); (F.gumbel_softmax(lg, tau, hard=True) * w).sum().backward()
    torch.manual_seed(9); y_t = F.gumbel_softmax(lg.detach(), tau)      # torch's own ST obeys the same rule
    torch.testing.assert_close(lg.grad, y_t * (w - (y_t * w).sum(-1, keepdim=True)) / tau, atol=1e-6, rtol=1e-5)


def test_hard_dim1_on_dvae_logits():
    B, K, h, w = 2, 16, 4, 4
    lg = torch.randn(B, K, h, w, generator=gen(0), requires_grad=True)
    y = gumbel_softmax(lg, 0.7, hard=True, dim=1, generator=gen(3))
    g = sample_gumbel(lg.shape, generator=gen(3))
    assert y.shape == (B, K, h, w) and torch.equal(y, one_hot_along((lg.detach() + g).argmax(1), K, 1, 4))
    wts = torch.randn(B, K, h, w, generator=gen(4))
    (y * wts).sum().backward()
    ys = torch.softmax((lg.detach() + g) / 0.7, 1)
    torch.testing.assert_close(lg.grad, ys * (wts - (ys * wts).sum(1, keepdim=True)) / 0.7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('tau', [1.0, 1e-3, 1e-20, 1e-40])
@pytest.mark.parametrize('hard', [False, True])
def test_extreme_logits_and_tiny_tau_stay_finite(tau, hard):
    lg = torch.tensor([[1e4, -1e4, 0.0, -float('inf')], [-1e4, -1e4, -1e4, 1e4], [0.0, 0.0, -float('inf'), 1e-3]],
                      requires_grad=True)
    y = gumbel_softmax(lg, tau, hard=hard, generator=gen(0))
    (y * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(lg.grad).all()
    assert y[0, 3] == 0 and y[2, 2] == 0 and torch.equal(y.argmax(-1)[:2], torch.tensor([0, 3]))
    assert torch.allclose(y.sum(-1), torch.ones(3))
    for seed in range(20):  # masked entries are never chosen
        assert gumbel_softmax(lg.detach(), tau, hard=True, generator=gen(seed))[2, 2] == 0


def test_bf16_logits():
    lg32 = torch.randn(16, 12, generator=gen(0)) * 3
    lg = lg32.bfloat16().requires_grad_()
    y = gumbel_softmax(lg, 0.5, generator=gen(1))
    assert y.dtype == torch.bfloat16
    ref = gumbel_softmax(lg.detach().float(), 0.5, generator=gen(1))     # the same values in float32
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)
    yh = gumbel_softmax(lg, 0.5, hard=True, generator=gen(1))
    assert yh.dtype == torch.bfloat16 and torch.equal(yh.float(), F.one_hot(ref.argmax(-1), 12).float())
    yh.float().sum().backward()
    assert lg.grad.dtype == torch.bfloat16 and torch.isfinite(lg.grad.float()).all()


def test_generator_determinism_and_global_rng():
    lg = torch.randn(5, 7)
    state = torch.get_rng_state()
    a = gumbel_softmax(lg, 0.5, generator=gen(11)); b = gumbel_softmax(lg, 0.5, generator=gen(11))
    assert torch.equal(a, b) and not torch.equal(a, gumbel_softmax(lg, 0.5, generator=gen(12)))
    assert torch.equal(gumbel_max_sample(lg, generator=gen(3)), gumbel_max_sample(lg, generator=gen(3)))
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(0); c = gumbel_softmax(lg, 0.5)
    torch.manual_seed(0); d = gumbel_softmax(lg, 0.5)
    assert torch.equal(c, d)                                              # no generator: the global seed decides


@pytest.mark.parametrize('tau', [0, 0.0, -1.0])
def test_bad_tau(tau):
    with pytest.raises(InputError, match='tau'):
        gumbel_softmax(torch.randn(3), tau)


# ---------------------------------------------------------------- straight_through

@pytest.mark.parametrize('shape,dim', [((6,), -1), ((4, 6), 0), ((2, 5, 3, 3), 1), ((2, 4, 3), -2)])
def test_straight_through_values_and_gradient(shape, dim):
    x = (torch.randn(shape, generator=gen(0)) * 1000).requires_grad_()  # any values, not only probabilities
    out = straight_through(x, dim)
    assert torch.equal(out, one_hot_along(x.detach().argmax(dim), shape[dim], dim, len(shape)))  # exact one-hot
    w = torch.randn(shape, generator=gen(1))
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)                                         # identity Jacobian: the gradient of x
    sb = torch.softmax(torch.randn(3, 7, generator=gen(2)), -1).bfloat16()
    assert straight_through(sb).dtype == torch.bfloat16


# ---------------------------------------------------------------- gradient estimators

C = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
THETA = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])


def f_toy(y):
    return (y - C).pow(2).sum(-1)


def test_exact_grad_closed_form():
    pi, fk = THETA.softmax(-1), f_toy(torch.eye(5))
    torch.testing.assert_close(exact_grad(THETA, f_toy), pi * (fk - (pi * fk).sum()))
    eps, num = 1e-6, []                                                    # central differences of sum_k pi_k f_k
    for k in range(5):
        e = torch.zeros(5, dtype=torch.float64); e[k] = eps
        L = lambda t: (t.softmax(-1) * fk.double()).sum().item()
        num.append((L(THETA.double() + e) - L(THETA.double() - e)) / (2 * eps))
    torch.testing.assert_close(exact_grad(THETA, f_toy), torch.tensor(num, dtype=torch.float32), atol=1e-6, rtol=1e-5)
    with pytest.raises(InputError, match='1-D'):
        exact_grad(torch.zeros(2, 5), f_toy)


@pytest.mark.parametrize('baseline', [0.0, 0.8])
def test_score_function_is_unbiased(baseline):
    n = 50_000
    G = score_function_grad(THETA, f_toy, n, baseline=baseline, generator=gen(0))
    assert G.shape == (n, 5)
    z = (G.mean(0) - exact_grad(THETA, f_toy)) / (G.std(0) / math.sqrt(n))
    assert z.abs().max() < 4.5, z


@pytest.mark.parametrize('hard', [False, True])
def test_relaxed_grad_per_sample_chain_rule(hard):
    n, tau = 500, 0.4
    G = relaxed_grad(THETA, f_toy, tau, n, hard=hard, generator=gen(3))
    y = torch.softmax((THETA + sample_gumbel((n, 5), generator=gen(3))) / tau, -1)  # the same noise
    yf = F.one_hot(y.argmax(-1), 5).float() if hard else y                 # the value f sees
    d = 2 * (yf - C)                                                       # df/dy
    torch.testing.assert_close(G, y * (d - (y * d).sum(-1, keepdim=True)) / tau, atol=1e-5, rtol=1e-4)


def test_estimators_on_many_positions():
    M, n = 8, 4000
    th = THETA.expand(M, 5)
    fM = lambda y: (y - C).pow(2).sum((-1, -2))                            # (n, M, K) -> (n,)
    sf = score_function_grad(th, fM, n, generator=gen(0))
    rg = relaxed_grad(th, fM, 0.5, n, generator=gen(1))
    assert sf.shape == rg.shape == (n, M, 5)
    # additive f: the exact gradient for each position is the single-position one
    z = (sf.mean(0) - exact_grad(THETA, f_toy)) / (sf.std(0) / math.sqrt(n))
    assert z.abs().max() < 5, z
    # score-function variance grows with the number of positions that share the reward; the relaxed one does not
    var = lambda G: (G[:, 0] - G[:, 0].mean(0)).pow(2).sum(-1).mean().item()
    sf1, rg1 = score_function_grad(THETA, f_toy, n, generator=gen(2)), relaxed_grad(THETA, f_toy, 0.5, n, generator=gen(3))
    assert var(sf) > 20 * ((sf1 - sf1.mean(0)).pow(2).sum(-1).mean().item())
    assert var(rg) < 1.3 * ((rg1 - rg1.mean(0)).pow(2).sum(-1).mean().item())
