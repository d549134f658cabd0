"""Scaling laws: the Chinchilla fit L(N, D), the compute-optimal frontier, L(C), bootstrap intervals, plot.

Hoffmann et al. (2022), approach 3: L(N, D) = E + A/N^α + B/D^β, fitted as
    min over (a, b, e, α, β) of  Σ_i Huber_δ( LSE(a − α·ln N_i, b − β·ln D_i, e) − ln L_i )
with A = e^a, B = e^b, E = e^e, δ = 1e-3, L-BFGS from a grid of
initialisations (their grid: α, β ∈ {0, 0.5, ..., 2}, e ∈ {−1, −0.5, ..., 1},
a, b ∈ {0, 5, ..., 25}). The whole grid is scored and L-BFGS runs from the
best few points; bootstrap refits (runs resampled with replacement) give
percentile intervals.

Frontier: minimising L(N, D) under C = k·N·D (k FLOPs per parameter per
token, 6 for 6ND) gives
    N*(C) = G·(C/k)^a,  D*(C) = (C/k)^b / G,   a = β/(α+β), b = α/(α+β),
    G = (αA / (βB))^(1/(α+β)),
    L*(C) = E + (C0/C)^γ,  γ = αβ/(α+β),  C0 = k·(A·G^−α + B·G^β)^(1/γ).
Separately, L(C) = E' + (C0'/C)^γ' is fitted to the runs on the loss-vs-compute
Pareto front (a pure power law (C0'/C)^γ' with fewer than 4 such runs),
as Kaplan et al. (2020) Fig. 1 and GPT-3 Fig. 3.1 do.

numpy / scipy only: this module imports no JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import numpy as np
from scipy import optimize, special

HUBER_DELTA = 1e-3  # Hoffmann et al. §D.2.
_GRID_ALPHA = (0.0, 0.5, 1.0, 1.5, 2.0)
_GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
_GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
_MIN_POWER_LAW_POINTS = 4  # Fewer Pareto runs: the pure power law (two parameters).


def _logsumexp(t, axis=-1):
  """ln Σ exp over the last axis (scipy's logsumexp costs ~1 ms a call in its array-API layer)."""
  m = np.max(t, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return np.log(np.sum(np.exp(t - m), axis=axis)) + np.squeeze(m, axis)


@dataclasses.dataclass(frozen=True)
class Chinchilla:
  """L(N, D) = E + A/N^alpha + B/D^beta."""

  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, n, d):
    n, d = np.asarray(n, float), np.asarray(d, float)
    return self.E + self.A / n**self.alpha + self.B / d**self.beta

  def frontier(self, k: float) -> dict:
    """The compute-optimal allocation for C = k·N·D (formulas in the module docstring).

    Computed in logs (A, B can be e^25, and a resample's fit can put C0 beyond a float:
    then C0 is inf and log_C0 still holds it)."""
    s = self.alpha + self.beta
    ok = self.alpha > 0 and self.beta > 0 and 0 < self.A < math.inf and 0 < self.B < math.inf
    if not ok:
      nan = math.nan
      return {"k": k, "a": nan, "b": nan, "G": nan, "log_G": nan, "gamma": 0.0, "C0": nan, "log_C0": nan}
    log_g = (math.log(self.alpha / self.beta) + math.log(self.A) - math.log(self.B)) / s
    gamma = self.alpha * self.beta / s
    log_k_term = np.logaddexp(math.log(self.A) - self.alpha * log_g, math.log(self.B) + self.beta * log_g)
    log_c0 = math.log(k) + float(log_k_term) / gamma
    return {
      "k": k,
      "a": self.beta / s,
      "b": self.alpha / s,
      "G": _exp(log_g),
      "log_G": log_g,
      "gamma": gamma,
      "C0": _exp(log_c0),
      "log_C0": log_c0,
    }

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _exp(x: float) -> float:
  return math.exp(x) if x < 709.0 else math.inf


def frontier_point(fit: Chinchilla, k: float, c):
  """(N*(C), D*(C), L*(C)) on the frontier of C = k·N·D."""
  f = fit.frontier(k)
  log_s = np.log(np.asarray(c, float) / k)
  with np.errstate(over="ignore"):  # A degenerate fit's N* or D* may be beyond a float: inf.
    n = np.exp(f["log_G"] + f["a"] * log_s)
    d = np.exp(f["b"] * log_s - f["log_G"])
    return n, d, fit.E + np.exp(f["gamma"] * (f["log_C0"] - np.log(np.asarray(c, float))))


# ------------------------------------------------------------------ fitting


def _chinchilla_terms(theta, x, y):
  """[..., points, 3] log-terms a − αx, b − βy, e for parameters theta [..., 5]."""
  a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
  return np.stack(
    [a - alpha * x, b - beta * y, np.broadcast_to(e, np.broadcast_shapes(e.shape, x.shape))], -1
  )


def _huber_objective(theta, x, y, log_loss, delta):
  """Σ Huber_δ(r)/δ and its gradient for one θ (the 1/δ scale leaves the optimum alone and
  keeps the optimiser's tolerances meaningful). Written out term by term: it is called
  ~100 times per fit, and np.stack / broadcasting cost more than the arithmetic here."""
  a, b, e, alpha, beta = theta
  t0, t1 = a - alpha * x, b - beta * y
  m = np.maximum(np.maximum(t0, t1), e)
  e0, e1, e2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
  total = e0 + e1 + e2
  r = m + np.log(total) - log_loss
  g = np.clip(r, -delta, delta) / (delta * total)  # Huber'(r)/δ times the softmax denominator.
  value = special.huber(delta, r).sum() / delta
  g0, g1 = g * e0, g * e1
  return value, np.array([g0.sum(), g1.sum(), (g * e2).sum(), -(g0 @ x), -(g1 @ y)])


@functools.cache
def _grid() -> np.ndarray:
  return chinchilla_grid()


def chinchilla_grid() -> np.ndarray:
  """Hoffmann et al.'s 4,500 initialisations as [G, 5] rows (a, b, e, α, β)."""
  return np.array(
    [
      (a, b, e, al, be)
      for al, be, e, a, b in itertools.product(_GRID_ALPHA, _GRID_ALPHA, _GRID_E, _GRID_AB, _GRID_AB)
    ]
  )


def _grid_scores(grid, x, y, log_loss, delta):
  pred = _logsumexp(_chinchilla_terms(grid, x, y), axis=-1)
  return special.huber(delta, pred - log_loss).sum(-1) / delta


def _minimise(objective, starts):
  """The best BFGS result over `starts` (non-finite ones dropped).

  BFGS rather than L-BFGS-B: the latter's compiled core calls OpenBLAS, whose
  threads made each of its iterations ~20 ms on a busy 2-core machine (a
  15-run fit took 13 s, 1.0 s with OPENBLAS_NUM_THREADS=1); BFGS's 5x5
  updates stay in numpy. Unbounded, as Hoffmann et al.'s L-BFGS.
  """
  best = None
  for theta0 in starts:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
      res = optimize.minimize(
        objective, theta0, jac=True, method="BFGS", options={"maxiter": 3000, "gtol": 1e-9}
      )
    if np.isfinite(res.fun) and np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
      best = res
  return best


def fit_chinchilla(
  n, d, loss, *, delta: float = HUBER_DELTA, starts: int = 16, extra_starts=()
) -> tuple[Chinchilla, float]:
  """(fit, Huber objective / δ at the optimum) of L(N, D) to the points (n_i, d_i, loss_i).

  L-BFGS runs from the `starts` best of the 4,500 grid points (Hoffmann et al. ran
  from all) and from `extra_starts` (θ rows). It works on centred logs, a − α·ln N
  = (a − α·m) − α·(ln N − m), which BFGS converges on in about half the steps.
  """
  x, y, log_loss = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float))
  xm, ym = float(x.mean()), float(y.mean())
  shift = np.array(
    [[1, 0, 0, -xm, 0], [0, 1, 0, 0, -ym], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1.0]]
  )
  theta0 = list(extra_starts)
  if starts:
    order = np.argsort(_grid_scores(_grid(), x, y, log_loss, delta), kind="stable")
    theta0 += list(_grid()[order[:starts]])
  res = _minimise(lambda t: _huber_objective(t, x - xm, y - ym, log_loss, delta), [shift @ t for t in theta0])
  if res is None:  # Every start diverged (a resample of a few distinct runs can do that).
    return Chinchilla(*[math.nan] * 5), math.inf
  a, b, e, alpha, beta = np.linalg.solve(shift, res.x)
  fit = Chinchilla(E=_exp(e), A=_exp(a), B=_exp(b), alpha=float(alpha), beta=float(beta))
  return fit, float(res.fun)


def _theta(fit: Chinchilla) -> np.ndarray:
  """(a, b, e, α, β) of a fit; an E that underflowed to 0 becomes e = ln 1e-300."""
  return np.array([*np.log(np.clip([fit.A, fit.B, fit.E], 1e-300, 1e300)), fit.alpha, fit.beta])


def bootstrap_chinchilla(n, d, loss, fit: Chinchilla, *, samples: int, seed: int, delta: float = HUBER_DELTA):
  """Refits on `samples` resamples of the runs (with replacement), each started from the
  full fit's optimum: a resample perturbs the data set, and a grid search per resample
  would cost several times more (the full fit's grid search is what finds the basin)."""
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  rng = np.random.default_rng(seed)
  theta = _theta(fit)
  warm = [theta] if np.all(np.isfinite(theta)) else []  # A failed fit (nan): 3 grid starts instead.
  fits = []
  for _ in range(samples):
    idx = rng.integers(0, len(n), len(n))
    fits.append(
      fit_chinchilla(n[idx], d[idx], loss[idx], delta=delta, starts=0 if warm else 3, extra_starts=warm)[0]
    )
  return fits


def interval(values, level: float) -> list[float]:
  """Percentile interval [lo, hi] holding `level` of the finite values."""
  v = np.asarray(values, float)
  v = v[np.isfinite(v)]
  if not len(v):
    return [math.nan, math.nan]
  return [float(q) for q in np.quantile(v, [(1 - level) / 2, (1 + level) / 2])]


def pareto_front(compute, loss) -> np.ndarray:
  """Indices of the runs that no cheaper-or-equal run beats, in order of compute."""
  order = np.lexsort((np.asarray(loss, float), np.asarray(compute, float)))
  keep, best = [], math.inf
  for i in order:
    if loss[i] < best:
      keep.append(int(i))
      best = loss[i]
  return np.array(keep, int)


def fit_loss_vs_compute(compute, loss, *, delta: float = HUBER_DELTA, start: dict | None = None) -> dict:
  """L(C) = E' + (C0/C)^γ (Huber on ln L), or (C0/C)^γ with fewer than 4 points.

  Works on θ = (v, γ, ln E') with ln L̂ = LSE(v − γ·(ln C − m), ln E'), m the mean
  ln C, so v and γ are not entangled; ln C0 = m + v/γ. Starts: `start` (a previous
  fit) if given, else lines through the median run for a few γ and E'.
  """
  lc, ll = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
  pure = len(lc) < _MIN_POWER_LAW_POINTS
  m = float(lc.mean())
  lcc = lc - m

  def objective(theta):
    v, gamma, e = theta
    t = np.stack([v - gamma * lcc, np.full_like(lcc, -np.inf if pure else e)], -1)
    pred = _logsumexp(t, axis=-1)
    r = pred - ll
    g = np.clip(r, -delta, delta) / delta
    w = np.exp(t - pred[:, None])
    grad = np.array([(g * w[:, 0]).sum(), -(g * w[:, 0] * lcc).sum(), 0.0 if pure else (g * w[:, 1]).sum()])
    return special.huber(delta, r).sum() / delta, grad

  if start is not None:
    gamma = start["gamma"]
    e = math.log(start["E"]) if start["E"] > 0 else -30.0
    starts = [[gamma * (start["log_C0"] - m), gamma, e]]
  else:
    l_m, lc_m = float(np.exp(np.median(ll))), float(np.median(lcc))
    starts = []
    for gamma in (0.05, 0.2):
      for share in (0.0,) if pure else (0.0, 0.5, 0.9):
        e_prime = share * float(np.exp(ll.min()))
        starts.append(
          [math.log(l_m - e_prime) + gamma * lc_m, gamma, math.log(e_prime) if e_prime > 0 else -30.0]
        )
  res = _minimise(objective, starts)
  if res is None:
    nan = math.nan
    return {"E": nan, "C0": nan, "log_C0": nan, "gamma": nan, "form": "pure" if pure else "offset"}
  v, gamma, e = res.x
  return {
    "E": 0.0 if pure else _exp(e),
    "C0": _exp(m + v / gamma),
    "log_C0": m + v / gamma,
    "gamma": float(gamma),
    "form": "pure" if pure else "offset",
  }


def loss_vs_compute(fit: dict, c):
  return fit["E"] + np.exp(fit["gamma"] * (fit["log_C0"] - np.log(np.asarray(c, float))))


# ----------------------------------------------------------------- analysis


def analyse(
  n, d, compute, loss, *, k: float, samples: int, level: float, seed: int, delta: float = HUBER_DELTA
) -> dict:
  """The Chinchilla fit, its frontier for C = k·N·D, the Pareto L(C) fit, and their
  bootstrap intervals, as one JSON-ready dict. `bootstrap` keeps the resampled fits."""
  n, d, compute, loss = (np.asarray(v, float) for v in (n, d, compute, loss))
  fit, objective = fit_chinchilla(n, d, loss, delta=delta)
  boots = bootstrap_chinchilla(n, d, loss, fit, samples=samples, seed=seed, delta=delta)
  front = fit.frontier(k)
  boot_front = [b.frontier(k) for b in boots]
  ci = {key: interval([getattr(b, key) for b in boots], level) for key in ("E", "A", "B", "alpha", "beta")}
  ci.update({key: interval([f[key] for f in boot_front], level) for key in ("a", "b", "gamma")})
  pareto = pareto_front(compute, loss)
  lvc = fit_loss_vs_compute(compute[pareto], loss[pareto], delta=delta) if len(pareto) >= 2 else None
  if lvc is not None:
    rng = np.random.default_rng(seed)
    gammas = []
    for _ in range(samples):
      idx = rng.integers(0, len(n), len(n))
      p = pareto_front(compute[idx], loss[idx])
      if len(p) >= 2:
        start = lvc if (len(p) < _MIN_POWER_LAW_POINTS) == (lvc["form"] == "pure") else None
        gammas.append(fit_loss_vs_compute(compute[idx][p], loss[idx][p], delta=delta, start=start)["gamma"])
    lvc["gamma_ci"] = interval(gammas, level)
    lvc["points"] = [int(i) for i in pareto]
  residuals = np.log(fit.loss(n, d)) - np.log(loss)
  return {
    "fit": {**fit.as_dict(), "huber_delta": delta, "objective": objective, "points": len(n), "ci": ci},
    "residual_log_loss_rms": float(np.sqrt(np.mean(residuals**2))),
    "frontier": {**front, "ci": {key: ci[key] for key in ("a", "b", "gamma")}},
    "loss_vs_compute": lvc,
    "bootstrap": {"samples": samples, "level": level, "seed": seed},
    "_boots": boots,
  }


def predict(fit: Chinchilla, boots, n: float, d: float, level: float) -> tuple[float, list[float]]:
  """L(n, d) and its bootstrap interval."""
  return float(fit.loss(n, d)), interval([b.loss(n, d) for b in boots], level)


def from_report(report: dict) -> Chinchilla:
  return Chinchilla(**{key: report["analysis"]["fit"][key] for key in ("E", "A", "B", "alpha", "beta")})


def analyse_runs(rows: list[dict], *, samples: int, level: float, seed: int, delta: float = HUBER_DELTA):
  """(analysis, held-out check, bootstrap fits) for a ladder's report rows (n, tokens,
  flops_per_token, compute, eval_loss, held_out, name). The frontier's k is the fitted
  rows' mean FLOPs per token / N."""
  fitted = [r for r in rows if not r["held_out"]]
  col = lambda key: np.array([r[key] for r in fitted], float)
  k = float(np.mean(col("flops_per_token") / col("n")))
  analysis = analyse(
    col("n"), col("tokens"), col("compute"), col("eval_loss"), k=k, samples=samples, level=level, seed=seed,
    delta=delta,
  )  # fmt: skip
  boots = analysis.pop("_boots")
  if analysis["loss_vs_compute"]:  # Pareto indices -> run names.
    lvc = analysis["loss_vs_compute"]
    lvc["points"] = [fitted[i]["name"] for i in lvc["points"]]
  fit = Chinchilla(**{key: analysis["fit"][key] for key in ("E", "A", "B", "alpha", "beta")})
  holdout = None
  for r in rows:
    if r["held_out"]:
      pred, ci = predict(fit, boots, r["n"], r["tokens"], level)
      holdout = {
        "name": r["name"],
        "actual": r["eval_loss"],
        "predicted": pred,
        "ci": ci,
        "relative_error": (pred - r["eval_loss"]) / r["eval_loss"],
        "within_ci": ci[0] <= r["eval_loss"] <= ci[1],
      }
  return analysis, holdout, boots


def _ci(ci) -> str:
  return f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def summary(report: dict) -> str:
  """The report in a few lines: the fit, the frontier, L(C), the held-out rung."""
  a, f = report["analysis"], report["analysis"]["fit"]
  level = a["bootstrap"]["level"]
  fr = a["frontier"]
  lines = [
    f"fit ({f['points']} runs, N = {report['n_definition']['name']}): L(N, D) = {f['E']:.4g} + "
    f"{f['A']:.4g}/N^{f['alpha']:.4f} + {f['B']:.4g}/D^{f['beta']:.4f}; "
    f"{level:.0%} CI alpha {_ci(f['ci']['alpha'])}, beta {_ci(f['ci']['beta'])}; "
    f"rms ln-residual {a['residual_log_loss_rms']:.4f}",
    f"frontier (C = {fr['k']:.3g}·N·D): N* ∝ C^{fr['a']:.3f} {_ci(fr['ci']['a'])}, D* ∝ C^{fr['b']:.3f} "
    f"{_ci(fr['ci']['b'])}, L*(C) = {f['E']:.4g} + ({fr['C0']:.4g}/C)^{fr['gamma']:.4f}",
  ]
  lvc = a.get("loss_vs_compute")
  if lvc:
    lines.append(
      f"loss vs compute ({len(lvc['points'])} Pareto runs): L(C) = {lvc['E']:.4g} + ({lvc['C0']:.4g}/C)^"
      f"{lvc['gamma']:.4f}, gamma CI {_ci(lvc['gamma_ci'])}"
    )
  h = report.get("holdout")
  if h:
    lines.append(
      f"held out {h['name']}: predicted {h['predicted']:.4f} {_ci(h['ci'])}, actual {h['actual']:.4f}: "
      f"error {h['relative_error']:+.2%}"
    )
  return "\n".join(lines)


# --------------------------------------------------------------------- plot


def plot(report: dict, path) -> None:
  """Two panels: loss vs compute per model size (fitted curves, frontier, L(C) fit, the
  held-out rung), and loss vs N per token budget with the fitted L(N, D)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from matplotlib import ticker

  runs = report["runs"]
  a = report["analysis"]
  fit = from_report(report)
  k = a["frontier"]["k"]
  fig, (ax_c, ax_n) = plt.subplots(1, 2, figsize=(13, 5.2))
  sizes = sorted({r["shape"] for r in runs}, key=lambda s: next(r["n"] for r in runs if r["shape"] == s))
  colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(sizes), 1)))
  c_all = np.array([r["compute"] for r in runs])
  c_grid = np.geomspace(c_all.min() / 2, c_all.max() * 4, 200)
  for shape, colour in zip(sizes, colours):
    rs = [r for r in runs if r["shape"] == shape]
    n, fpt = rs[0]["n"], rs[0]["flops_per_token"]
    fitted = [r for r in rs if not r["held_out"]]
    ax_c.plot(
      [r["compute"] for r in fitted],
      [r["eval_loss"] for r in fitted],
      "o",
      color=colour,
      label=f"{shape} (N={n:.3g})",
    )
    ax_c.plot(c_grid, fit.loss(n, c_grid / fpt), "-", color=colour, lw=1, alpha=0.7)
  _, _, l_front = frontier_point(fit, k, c_grid)
  ax_c.plot(c_grid, l_front, "k--", lw=1.5, label=f"frontier L*(C), γ={a['frontier']['gamma']:.3f}")
  lvc = a.get("loss_vs_compute")
  if lvc:
    ax_c.plot(
      c_grid,
      loss_vs_compute(lvc, c_grid),
      ":",
      color="tab:red",
      lw=1.5,
      label=f"Pareto fit L(C), γ={lvc['gamma']:.3f}",
    )
  for r in runs:
    if r["held_out"]:
      h = report.get("holdout") or {}
      ax_c.plot(r["compute"], r["eval_loss"], "*", color="tab:red", ms=14, label=f"held out {r['name']}")
      if "predicted" in h:
        ax_c.errorbar(
          r["compute"],
          h["predicted"],
          yerr=[[h["predicted"] - h["ci"][0]], [h["ci"][1] - h["predicted"]]],
          fmt="x",
          color="tab:red",
          capsize=4,
          label="its prediction",
        )
  ax_c.set_xscale("log")
  ax_c.set_yscale("log")
  ax_c.set_xlabel("compute C = FLOPs/token (PaLM) × D")
  ax_c.set_ylabel("validation loss (nats/token)")
  ax_c.set_title("loss vs compute, per model size")
  ax_c.legend(fontsize=7)

  budgets = sorted(
    {r["budget"] for r in runs}, key=lambda b: min(r["tokens"] for r in runs if r["budget"] == b)
  )
  colours = plt.get_cmap("plasma")(np.linspace(0, 0.85, max(len(budgets), 1)))
  n_all = np.array([r["n"] for r in runs])
  n_grid = np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 100)
  for budget, colour in zip(budgets, colours):
    rs = sorted((r for r in runs if r["budget"] == budget and not r["held_out"]), key=lambda r: r["n"])
    if not rs:
      continue
    ax_n.plot([r["n"] for r in rs], [r["eval_loss"] for r in rs], "o", color=colour, label=f"{budget}")
    if report["mode"] == "tokens":
      ax_n.plot(n_grid, fit.loss(n_grid, rs[0]["tokens"]), "-", color=colour, lw=1, alpha=0.7)
    else:  # IsoFLOP: D = C / FLOPs per token along the curve; points joined.
      ax_n.plot(
        [r["n"] for r in rs],
        fit.loss([r["n"] for r in rs], [r["tokens"] for r in rs]),
        "-",
        color=colour,
        lw=1,
      )
  ax_n.set_xscale("log")
  ax_n.set_yscale("log")
  ax_n.set_xlabel(f"N ({report['n_definition']['name']} parameters)")
  ax_n.set_ylabel("validation loss (nats/token)")
  ax_n.set_title("loss vs N at fixed " + ("D" if report["mode"] == "tokens" else "C (IsoFLOP)"))
  for r in runs:
    if r["held_out"]:
      ax_n.plot(r["n"], r["eval_loss"], "*", color="tab:red", ms=14, label=f"held out {r['name']}")
  ax_n.legend(fontsize=7)
  for ax in (ax_c, ax_n):  # Losses span less than a decade: plain tick labels, not 4x10^0.
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.1f"))
  f = a["fit"]
  fig.suptitle(
    f"L(N, D) = {f['E']:.3g} + {f['A']:.3g}/N^{f['alpha']:.3f} + {f['B']:.3g}/D^{f['beta']:.3f}"
    f"   (Huber δ={f['huber_delta']:g} on ln L, {f['points']} runs)",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)
