"""The scaling-law fits: recovery of known laws, the frontier formulas, intervals, the plot."""

import math

import numpy as np
import pytest
from scipy import optimize

from gpt_jax import scaling

# Hoffmann et al. (2022) eq. 10's fit (N parameters, D tokens).
CHINCHILLA = scaling.Chinchilla(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def grid(sizes=5, budgets=4):
  """A ladder: `sizes` model sizes (1e5-1e7) x `budgets` token budgets (a 64x range)."""
  n = np.repeat(np.geomspace(1e5, 1e7, sizes), budgets)
  d = np.tile(np.geomspace(1.25e5, 8e6, budgets), sizes)
  return n, d


def test_fit_recovers_an_exact_law():
  n, d = grid()
  fit, objective = scaling.fit_chinchilla(n, d, CHINCHILLA.loss(n, d))
  for key in ("E", "A", "B", "alpha", "beta"):
    assert getattr(fit, key) == pytest.approx(getattr(CHINCHILLA, key), rel=1e-4), key
  assert objective < 1e-8


def test_bootstrap_interval_holds_the_true_exponents_under_noise():
  """0.5% log-normal noise on every loss (about the run-to-run spread of small runs)."""
  n, d = grid()
  rng = np.random.default_rng(1)
  loss = CHINCHILLA.loss(n, d) * np.exp(rng.normal(0.0, 0.005, n.shape))
  a = scaling.analyse(n, d, 6 * n * d, loss, k=6.0, samples=60, level=0.9, seed=0)
  ci = a["fit"]["ci"]
  for key in ("alpha", "beta"):
    lo, hi = ci[key]
    assert lo <= getattr(CHINCHILLA, key) <= hi, (key, ci[key])
    assert hi - lo < 0.15, (key, ci[key])  # Informative, not just wide.
  # The frontier exponents are functions of α and β: close to the truth (their 90% intervals,
  # a few thousandths wide here, need not hold it on every draw).
  true_front = CHINCHILLA.frontier(6.0)
  for key in ("a", "b", "gamma"):
    assert a["frontier"][key] == pytest.approx(true_front[key], abs=0.02), key
  assert a["residual_log_loss_rms"] < 0.01


def test_huber_fit_shrugs_off_an_outlier():
  """One diverged run (loss x1.5) barely moves the exponents: the Huber loss is
  linear beyond δ, where least squares would chase the outlier."""
  n, d = grid()
  loss = CHINCHILLA.loss(n, d)
  loss[7] *= 1.5
  fit, _ = scaling.fit_chinchilla(n, d, loss)
  assert fit.alpha == pytest.approx(CHINCHILLA.alpha, abs=0.01)
  assert fit.beta == pytest.approx(CHINCHILLA.beta, abs=0.01)


def test_objective_gradient_matches_finite_differences():
  n, d = grid(3, 3)
  x, y = np.log(n) - np.log(n).mean(), np.log(d) - np.log(d).mean()
  log_loss = np.log(CHINCHILLA.loss(n, d)) + 0.01 * np.sin(np.arange(len(n)))
  theta = np.array([0.4, 0.3, 0.2, 0.35, 0.25])
  f = lambda t: scaling._huber_objective(t, x, y, log_loss, 0.05)[0]
  g = lambda t: scaling._huber_objective(t, x, y, log_loss, 0.05)[1]
  assert optimize.check_grad(f, g, theta, epsilon=1e-7) < 1e-4 * np.linalg.norm(g(theta))


@pytest.mark.parametrize("k", [6.0, 7.3])
def test_frontier_formulas_match_a_numerical_minimisation(k):
  f = CHINCHILLA.frontier(k)
  assert f["a"] + f["b"] == pytest.approx(1.0)
  assert f["a"] == pytest.approx(0.28 / 0.62) and f["gamma"] == pytest.approx(0.34 * 0.28 / 0.62)
  for c in (1e18, 1e21, 1e24):
    # N* minimises L(N, C/(kN)) over ln N.
    res = optimize.minimize_scalar(
      lambda ln, c=c: CHINCHILLA.loss(math.exp(ln), c / (k * math.exp(ln))),
      bounds=(5, 40),
      method="bounded",
      options={"xatol": 1e-10},
    )
    n_opt, d_opt, l_opt = scaling.frontier_point(CHINCHILLA, k, c)
    assert n_opt == pytest.approx(math.exp(res.x), rel=1e-4)
    assert k * n_opt * d_opt == pytest.approx(c)
    assert l_opt == pytest.approx(res.fun, rel=1e-9)
    assert l_opt == pytest.approx(CHINCHILLA.loss(n_opt, d_opt), rel=1e-12)


def test_loss_vs_compute_fits():
  c = np.geomspace(1e12, 1e17, 7)
  offset = scaling.fit_loss_vs_compute(c, 1.8 + (3e10 / c) ** 0.12)
  assert (offset["form"], offset["E"], offset["gamma"]) == (
    "offset",
    pytest.approx(1.8, rel=1e-5),
    pytest.approx(0.12, rel=1e-5),
  )
  assert offset["C0"] == pytest.approx(3e10, rel=1e-3)
  pure = scaling.fit_loss_vs_compute(c[:3], (2.3e8 / c[:3]) ** 0.05)  # GPT-3 Fig. 3.1's kind of law.
  assert (pure["form"], pure["E"]) == ("pure", 0.0)
  assert pure["gamma"] == pytest.approx(0.05, rel=1e-6) and pure["C0"] == pytest.approx(2.3e8, rel=1e-4)


def test_pareto_front_and_interval():
  compute = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
  loss = np.array([5.0, 4.0, 4.5, 4.2, 3.0])
  assert scaling.pareto_front(compute, loss).tolist() == [0, 1, 4]
  assert scaling.interval(np.arange(101.0), 0.9) == pytest.approx([5.0, 95.0])
  assert scaling.interval([math.nan, 1.0, 1.0], 0.5) == [1.0, 1.0]


def test_plot_writes_a_png(tmp_path):
  n, d = grid(3, 3)
  loss = CHINCHILLA.loss(n, d)
  a = scaling.analyse(n, d, 6 * n * d, loss, k=6.0, samples=5, level=0.9, seed=0)
  a.pop("_boots")
  runs = [
    {"name": f"r{i}", "shape": f"s{i // 3}", "budget": f"D{d[i]:.0f}", "n": n[i], "tokens": d[i],
     "flops_per_token": 6 * n[i], "compute": 6 * n[i] * d[i], "eval_loss": loss[i], "held_out": i == 8}
    for i in range(len(n))
  ]  # fmt: skip
  report = {
    "mode": "tokens",
    "runs": runs,
    "analysis": a,
    "n_definition": {"name": "matmul"},
    "holdout": {"predicted": loss[8], "ci": [loss[8] * 0.99, loss[8] * 1.01]},
  }
  scaling.plot(report, tmp_path / "p.png")
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_degenerate_ladders_do_not_raise():
  """A tiny ladder's losses barely move (few steps): the fit may be meaningless, but the
  analysis, its frontier (C0 beyond a float) and intervals must still come back."""
  front = scaling.Chinchilla(E=1.0, A=5.0, B=1e9, alpha=1e-3, beta=2e-3).frontier(6.0)
  assert front["C0"] == math.inf and math.isfinite(front["log_C0"])
  _, _, l_opt = scaling.frontier_point(
    scaling.Chinchilla(E=1.0, A=5.0, B=1e9, alpha=1e-3, beta=2e-3), 6.0, 1e12
  )
  assert np.isfinite(l_opt)
  assert math.isnan(scaling.Chinchilla(E=1.0, A=0.0, B=1.0, alpha=0.3, beta=0.3).frontier(6.0)["a"])
  n, d = grid(3, 2)
  loss = 5.6 + 0.01 * np.sin(np.arange(len(n)))
  a = scaling.analyse(n, d, 6 * n * d, loss, k=6.0, samples=20, level=0.9, seed=0)
  assert len(a.pop("_boots")) == 20 and a["fit"]["points"] == 6
