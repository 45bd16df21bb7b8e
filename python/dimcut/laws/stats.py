"""Least-squares lines with standard errors and prediction intervals, and Student's t without
scipy."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LineFit:
    """Ordinary least squares y = a·s + b through (s, y), or y − b = a·s with b fixed.

    RMSE is sqrt(mean residual²) (as in the paper's Table 3); standard errors and prediction
    intervals use the residual variance SS_res / dof, dof = n − (number of fitted parameters).
    R² = 1 − SS_res/SS_tot with SS_tot about the mean of y, also for a fixed intercept (where it
    can be negative); None when all y are equal.
    """

    s: tuple[float, ...]
    y: tuple[float, ...]
    a: float
    b: float
    fixed_intercept: bool
    se_a: float
    se_b: float | None  # None when b is fixed
    rmse: float
    r2: float | None

    @property
    def n(self) -> int:
        return len(self.s)

    @property
    def dof(self) -> int:
        return self.n - (1 if self.fixed_intercept else 2)

    @property
    def s_max(self) -> float:
        """The fitted range is [0, s_max]: s = 0 is measured (or imposed by a fixed intercept)."""
        return max(self.s)

    def rmse_of(self, a: float, b: float) -> float:
        """RMSE of another line over the same points (e.g. the theory a = −1, b = 1)."""
        s, y = np.asarray(self.s), np.asarray(self.y)
        return float(np.sqrt(np.mean((y - (a * s + b)) ** 2)))

    def prediction_interval(self, s: float, confidence: float) -> tuple[float, float, float]:
        """(ŷ, low, high): the OLS prediction interval for a new observation at s."""
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
        points = np.asarray(self.s)
        residuals = np.asarray(self.y) - (self.a * points + self.b)
        sigma = math.sqrt(float(residuals @ residuals) / self.dof)
        if self.fixed_intercept:
            leverage = s**2 / float(points @ points)
        else:
            centred = points - points.mean()
            leverage = 1 / self.n + (s - points.mean()) ** 2 / float(centred @ centred)
        half = t_quantile((1 + confidence) / 2, self.dof) * sigma * math.sqrt(1 + leverage)
        y_hat = self.a * s + self.b
        return y_hat, y_hat - half, y_hat + half


def fit_line(s: Sequence[float], y: Sequence[float], *, intercept: float | None = None) -> LineFit:
    """Least-squares fit of y = a·s + b; with `intercept` given, b is fixed to it and only a is fitted.

    Needs enough points for standard errors: 3 with 2 distinct s (free intercept), or 2 with
    some s ≠ 0 (fixed intercept).
    """
    s_arr, y_arr = np.asarray(s, dtype=float), np.asarray(y, dtype=float)
    if s_arr.ndim != 1 or s_arr.shape != y_arr.shape:
        raise ValueError(f"s and y must be 1-D of one length, got {s_arr.shape} and {y_arr.shape}")
    if not (np.isfinite(s_arr).all() and np.isfinite(y_arr).all()):
        raise ValueError("s and y must be finite (no NaN or infinity)")
    n = len(s_arr)
    if intercept is None:
        if n < 3 or np.ptp(s_arr) == 0:
            raise ValueError(
                f"a free-intercept fit needs at least 3 points at 2 or more distinct s (2 to fit a "
                f"and b, 1 more for standard errors); got {n}"
            )
        centred = s_arr - s_arr.mean()
        sxx = float(centred @ centred)
        a = float(centred @ (y_arr - y_arr.mean())) / sxx
        b = float(y_arr.mean() - a * s_arr.mean())
        ss_res = float(np.sum((y_arr - (a * s_arr + b)) ** 2))
        sigma2 = ss_res / (n - 2)
        se_a = math.sqrt(sigma2 / sxx)
        se_b = math.sqrt(sigma2 * (1 / n + s_arr.mean() ** 2 / sxx))
    else:
        if n < 2 or not np.any(s_arr):
            raise ValueError(
                f"a fixed-intercept fit needs at least 2 points with s ≠ 0 (1 to fit a, 1 more "
                f"for its standard error); got {n}"
            )
        b = float(intercept)
        sss = float(s_arr @ s_arr)
        a = float(s_arr @ (y_arr - b)) / sss
        ss_res = float(np.sum((y_arr - (a * s_arr + b)) ** 2))
        se_a = math.sqrt(ss_res / (n - 1) / sss)
        se_b = None
    ss_tot = float(np.sum((y_arr - y_arr.mean()) ** 2))
    return LineFit(
        s=tuple(float(v) for v in s_arr),
        y=tuple(float(v) for v in y_arr),
        a=a,
        b=b,
        fixed_intercept=intercept is not None,
        se_a=se_a,
        se_b=se_b,
        rmse=math.sqrt(ss_res / n),
        r2=1 - ss_res / ss_tot if ss_tot > 0 else None,
    )


# ------------------------------------------------------------------ Student's t without scipy


@functools.lru_cache(maxsize=256)  # intervals ask for the same few quantiles over and over
def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with `dof` degrees of freedom (bisection)."""
    if not 0 < p < 1 or dof < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and dof ≥ 1, got p = {p}, dof = {dof}")
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    high = 1.0
    while _t_cdf(high, dof) < p:
        high *= 2
    low = 0.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, dof) < p else (low, mid)
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2


def _t_cdf(t: float, dof: int) -> float:
    """P(T ≤ t) for t ≥ 0: 1 − I_x(dof/2, 1/2)/2 with x = dof/(dof + t²)."""
    return 1 - 0.5 * _betainc(dof / 2, 0.5, dof / (dof + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) by its continued fraction."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1 - _betainc(b, a, 1 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Lentz's evaluation of the continued fraction for I_x(a, b) (Numerical Recipes §6.4)."""
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / guard(1 - (a + b) * x / (a + 1))
    result = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for term in (even, odd):
            d = 1 / guard(1 + term * d)
            c = guard(1 + term / c)
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result
