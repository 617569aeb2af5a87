"""Two-sample tests on token counts: what every distribution check in effroll (verify, the audit) uses."""

from __future__ import annotations

from collections import Counter


def chi2_homogeneity(a: Counter, b: Counter, min_expected: float = 5.0) -> tuple[float, float, int]:
    """Two-sample chi-square test on token counts; returns (statistic, p-value, dof)."""
    from scipy.stats import chi2

    na, nb = sum(a.values()), sum(b.values())
    keys = set(a) | set(b)
    cells, pool_a, pool_b = [], 0, 0
    for k in keys:
        tot = a.get(k, 0) + b.get(k, 0)
        if min(tot * na, tot * nb) / (na + nb) >= min_expected:
            cells.append((a.get(k, 0), b.get(k, 0)))
        else:
            pool_a += a.get(k, 0)
            pool_b += b.get(k, 0)
    if pool_a + pool_b > 0:
        cells.append((pool_a, pool_b))
    if len(cells) < 2:
        return 0.0, 1.0, 0
    stat = 0.0
    for ca, cb in cells:
        tot = ca + cb
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb
    dof = len(cells) - 1
    return stat, float(chi2.sf(stat, dof)), dof


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def detectable_tv(samples: int, categories: int = 20, alpha: float = 1e-4, power: float = 0.9) -> float:
    """Smallest TV gap the two-sample chi-square test detects with ``power``, in the worst case.

    With n samples per side the noncentrality is lambda = n/2 * sum_i (p_i - q_i)^2 / m_i. A gap of
    total variation TV spread evenly over ``categories`` cells of mass 1/categories gives
    sum = 4 TV^2, so lambda = 2 n TV^2 (a gap concentrated on a few cells is far easier to see).
    """
    from scipy.stats import chi2, ncx2

    dof = categories - 1
    crit = chi2.isf(alpha, dof)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        tv = (lo + hi) / 2
        lam = 2 * samples * tv**2
        if ncx2.sf(crit, dof, lam) >= power:
            hi = tv
        else:
            lo = tv
    return hi
