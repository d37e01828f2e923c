"""The cohort report of ``rtqa synth --report``: report.md with tables, and PNG plots (matplotlib, Agg):
outcome rates, dose-response recovered from the generated outcomes vs the models that generated them,
reviewer agreement (Cohen's and Fleiss' kappa), and per-site contouring differences before and after the
consensus guideline.

"Recovered" means estimated from the 0/1 outcomes and the doses alone, as an analyst of the cohort would:
binned event rates with Wilson intervals, and maximum-likelihood logistic fits (``fit_logistic``). The oracle
curve in each bin is the mean of the patients' true probabilities; the two agree within sampling error when
the generator does what the documentation says (tests/test_synth.py asserts it).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from rtqa_node.synth import protocol, schema
from rtqa_node.synth.outcomes import MODELS, xerostomia_ntcp
from rtqa_node.synth.reviewers import agreement

REPORT_NAME = "report.md"
PLOTS = ("outcome_rates.png", "dose_response.png", "kappa.png", "contours.png")


def fit_logistic(x: np.ndarray, y: np.ndarray) -> dict:
    """Maximum-likelihood logistic regression y ~ 1 + x (x: (N, K)). Returns coefficients (intercept first),
    standard errors from the observed information, and the log-likelihood."""
    x = np.column_stack([np.ones(len(y)), np.asarray(x, dtype=float).reshape(len(y), -1)])
    y = np.asarray(y, dtype=float)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-9)
    xs = x / scale

    def nll(beta: np.ndarray) -> tuple[float, np.ndarray]:
        eta = xs @ beta
        value = float(np.sum(np.logaddexp(0.0, eta) - y * eta))
        grad = xs.T @ (1.0 / (1.0 + np.exp(-eta)) - y)
        return value, grad

    result = minimize(nll, np.zeros(x.shape[1]), jac=True, method="BFGS")
    beta = result.x
    p = 1.0 / (1.0 + np.exp(-(xs @ beta)))
    info = (xs * (p * (1 - p))[:, None]).T @ xs
    try:
        cov = np.linalg.inv(info)
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    except np.linalg.LinAlgError:
        se = np.full(len(beta), np.inf)
    return {"coef": (beta / scale).tolist(), "se": (se / scale).tolist(), "loglik": -float(result.fun)}


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(float(centre - half), 0.0), min(float(centre + half), 1.0)


def _bins(x: np.ndarray, y: np.ndarray, p: np.ndarray, count: int) -> list[dict]:
    edges = np.quantile(x, np.linspace(0, 1, count + 1))
    out = []
    for k in range(count):
        sel = (x >= edges[k]) & ((x <= edges[k + 1]) if k == count - 1 else (x < edges[k + 1]))
        n = int(sel.sum())
        if n == 0:
            continue
        lo, hi = _wilson(int(y[sel].sum()), n)
        out.append({"dose_lo_gy": round(float(edges[k]), 2), "dose_hi_gy": round(float(edges[k + 1]), 2),
                    "dose_mean_gy": round(float(x[sel].mean()), 2), "n": n,
                    "observed": round(float(y[sel].mean()), 4), "ci95": [round(lo, 4), round(hi, 4)],
                    "oracle": round(float(p[sel].mean()), 4),
                    "oracle_se": round(float(np.sqrt(np.sum(p[sel] * (1 - p[sel]))) / n), 4)})
    return out


def recover(patients: list[dict], *, bins: int = 4) -> dict:
    """Dose-response recovered from a cohort's ground truth (doses and 0/1 outcomes) next to the oracle."""
    od = [p["outcome_doses"] for p in patients]
    out: dict = {"patients": len(patients)}
    for endpoint in schema.ENDPOINTS:
        y = np.array([p["outcomes"][endpoint] for p in patients], dtype=float)
        prob = np.array([p["oracle"][endpoint]["probability"] for p in patients])
        expected, sd = float(prob.sum()), float(np.sqrt(np.sum(prob * (1 - prob))))
        out[endpoint] = {"events": int(y.sum()), "expected_events": round(expected, 2),
                         "expected_sd": round(sd, 2),
                         "calibration_z": round((float(y.sum()) - expected) / sd, 3) if sd > 0 else 0.0}
    y = np.array([p["outcomes"]["xerostomia"] for p in patients], dtype=float)
    p_x = np.array([p["oracle"]["xerostomia"]["probability"] for p in patients])
    mean = np.array([d["mean_parotids_gy"] for d in od])
    stem = np.array([d["mean_stem_cell_regions_gy"] for d in od])
    out["xerostomia"]["bins"] = _bins(mean, y, p_x, bins)
    out["xerostomia"]["fit_mean_only"] = fit_logistic(mean, y)
    out["xerostomia"]["fit_mean_and_stem"] = fit_logistic(np.column_stack([mean, stem]), y)
    out["xerostomia"]["stem_vs_mean_correlation"] = round(float(np.corrcoef(mean, stem)[0, 1]), 4)
    # How much of the stem-region dose the whole-gland mean cannot explain (residual sd after a linear fit).
    slope, intercept = np.polyfit(mean, stem, 1)
    out["xerostomia"]["stem_residual_sd_gy"] = round(float(np.std(stem - (slope * mean + intercept))), 3)

    y = np.array([p["outcomes"]["dysphagia"] for p in patients], dtype=float)
    p_d = np.array([p["oracle"]["dysphagia"]["probability"] for p in patients])
    pcm = np.array([d["mean_constrictor_s_gy"] for d in od])
    sgl = np.array([d["mean_supraglottic_gy"] for d in od])
    m = MODELS["dysphagia"][schema.MECHANISM_DYSPHAGIA]
    s = m["b0"] + m["b_pcms_per_gy"] * pcm + m["b_sgl_per_gy"] * sgl
    out["dysphagia"]["bins"] = _bins(s, y, p_d, bins)
    out["dysphagia"]["bins_axis"] = "linear predictor S of the model"
    out["dysphagia"]["fit"] = fit_logistic(np.column_stack([pcm, sgl]), y)
    out["dysphagia"]["model_coef"] = [m["b0"], m["b_pcms_per_gy"], m["b_sgl_per_gy"]]

    y = np.array([p["outcomes"]["local_control"] for p in patients], dtype=float)
    p_l = np.array([p["oracle"]["local_control"]["probability"] for p in patients])
    eud = np.array([d["ctv70_weighted_eud_gy"] for d in od])
    out["local_control"]["bins"] = _bins(eud, y, p_l, bins)
    out["local_control"]["bins_axis"] = "clonogen-weighted gEUD of CTV_70"
    return out


def _site_contours(patients: list[dict]) -> dict:
    """Per site and period: mean drawn/true volume ratio and mean |shift| per styled structure."""
    out: dict = {}
    for p in patients:
        for name, c in p["anatomy"]["contouring"].items():
            ratio = p["anatomy"]["drawn_vs_true_volume_ratio"].get(name)
            slot = out.setdefault(p["site_id"], {}).setdefault(p["period"], {}).setdefault(
                name, {"volume_ratio": [], "shift_mm": [], "margin_mm": []})
            if ratio is not None:
                slot["volume_ratio"].append(ratio)
            slot["shift_mm"].append(float(np.linalg.norm(c["shift_mm"])))
            slot["margin_mm"].append(c["margin_mm"])
    return out


def contour_variability(patients: list[dict]) -> dict:
    """Between-site spread of the systematic margins (sd over sites of the site-mean margin, averaged over
    structures) and mean |shift|, before and after the guideline."""
    per = _site_contours(patients)
    result = {}
    for period in schema.PERIODS:
        margins, shifts = [], []
        names = sorted({n for site in per.values() for n in site.get(period, {})})
        for name in names:
            site_means = [np.mean(site[period][name]["margin_mm"]) for site in per.values()
                          if period in site and name in site[period]]
            if len(site_means) >= 2:
                margins.append(float(np.std(site_means)))
            shifts += [s for site in per.values() if period in site and name in site[period]
                       for s in site[period][name]["shift_mm"]]
        result[period] = {"between_site_margin_sd_mm": round(float(np.mean(margins)), 3) if margins else None,
                          "mean_abs_shift_mm": round(float(np.mean(shifts)), 3) if shifts else None,
                          "patients": sum(p["period"] == period for p in patients)}
    return result


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return buffer.getvalue()


def _plots(patients: list[dict], rec: dict, kappas: dict | None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    sites = sorted({p["site_id"] for p in patients})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(schema.ENDPOINTS)
    for k, endpoint in enumerate(schema.ENDPOINTS):
        rates = [np.mean([p["outcomes"][endpoint] for p in patients if p["site_id"] == s]) for s in sites]
        ax.bar(np.arange(len(sites)) + k * width, rates, width, label=endpoint)
    ax.set_xticks(np.arange(len(sites)) + width, sites)
    ax.set_ylabel("event rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Outcome rates per site")
    out["outcome_rates.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, endpoint, label in zip(axes, schema.ENDPOINTS,
                                   ("mean dose, both parotids (Gy)", "dysphagia linear predictor S",
                                    "CTV_70 weighted gEUD (Gy)")):
        b = rec[endpoint]["bins"]
        x = [r["dose_mean_gy"] for r in b]
        ax.errorbar(x, [r["observed"] for r in b],
                    yerr=[[r["observed"] - r["ci95"][0] for r in b], [r["ci95"][1] - r["observed"] for r in b]],
                    fmt="o", label="recovered (observed, 95 % CI)")
        ax.plot(x, [r["oracle"] for r in b], "s--", label="oracle (mean true p)")
        if endpoint == "xerostomia":
            grid = np.linspace(0, 70, 100)
            ax.plot(grid, [xerostomia_ntcp(g) for g in grid], "k:", label="LKB mean-dose part alone")
        if endpoint == "dysphagia":
            grid = np.linspace(min(x) - 0.5, max(x) + 0.5, 100)
            ax.plot(grid, 1 / (1 + np.exp(-grid)), "k:", label="model 1/(1+exp(-S))")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.set_title(endpoint)
        ax.legend(fontsize=7)
    out["dose_response.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if kappas:
        names = [*kappas["cohen_pairwise"], "Fleiss"]
        values = [*kappas["cohen_pairwise"].values(), kappas["fleiss"]]
        ax.bar(names, values)
        ax.axhspan(*kappas["target_range"], color="green", alpha=0.15,
                   label="target range (design, not published)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("kappa")
        ax.legend(fontsize=8)
    ax.set_title("Reviewer agreement (Cohen pairwise, Fleiss)")
    out["kappa.png"] = _png(fig)
    plt.close(fig)

    per = _site_contours(patients)
    names = sorted({n for site in per.values() for period in site.values() for n in period})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, period in zip(axes, schema.PERIODS):
        for k, site in enumerate(sites):
            values = [np.mean(per.get(site, {}).get(period, {}).get(n, {}).get("margin_mm", [np.nan]) or [np.nan])
                      for n in names]
            ax.plot(np.arange(len(names)), values, "o-", label=site, alpha=0.8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(np.arange(len(names)), names, rotation=70, fontsize=7)
        ax.set_title(f"Contouring margin per site, {period.replace('_', ' ')}")
        ax.set_ylabel("mean applied margin (mm)")
        ax.legend(fontsize=7)
    out["contours.png"] = _png(fig)
    plt.close(fig)
    return out


def render(manifest: dict) -> tuple[str, dict[str, bytes], dict]:
    """(report.md text, PNG bytes by name, the numbers behind them)."""
    patients = manifest["patients"]
    rec = recover(patients, bins=4 if len(patients) >= 40 else 2)
    kappas = agreement(patients) if len(patients) >= 2 else None
    contours = contour_variability(patients)
    n = len(patients)
    lines = [(f"# Synthetic cohort: {n} patients, {manifest['config']['sites']} site(s), "
              f"seed {manifest['config']['seed']}"), ""]
    lines += ["## Per site", "", ("| site | patients | photon/proton/carbon | per protocol/minor/major (truth) | "
                                  "consensus agrees | xerostomia | dysphagia | local control |"),
              "|---|---|---|---|---|---|---|---|"]
    for site in sorted({p["site_id"] for p in patients}):
        ps = [p for p in patients if p["site_id"] == site]
        mods = "/".join(str(sum(p["modality"] == m for p in ps)) for m in schema.MODALITIES)
        verdicts = "/".join(str(sum(p["true_verdict"] == v for p in ps)) for v in protocol.SEVERITIES)
        agree = sum(p["reviews"]["consensus"] == p["true_verdict"] for p in ps)
        rates = " | ".join(f"{np.mean([p['outcomes'][e] for p in ps]):.0%}" for e in schema.ENDPOINTS)
        lines.append(f"| {site} | {len(ps)} | {mods} | {verdicts} | {agree}/{len(ps)} | {rates} |")
    lines += ["", "## Outcomes: recovered vs oracle", "",
              "| endpoint | events | expected (sum of oracle p) | z |", "|---|---|---|---|"]
    for e in schema.ENDPOINTS:
        r = rec[e]
        lines.append(f"| {e} | {r['events']} | {r['expected_events']:.1f} ± {r['expected_sd']:.1f} | "
                     f"{r['calibration_z']:+.2f} |")
    for e in schema.ENDPOINTS:
        lines += ["", f"{e} by {rec[e].get('bins_axis', 'mean parotid dose')}:", "",
                  "| bin | n | observed (95 % CI) | oracle |", "|---|---|---|---|"]
        for b in rec[e]["bins"]:
            lines.append(f"| {b['dose_lo_gy']:.1f}-{b['dose_hi_gy']:.1f} | {b['n']} | {b['observed']:.2f} "
                         f"({b['ci95'][0]:.2f}-{b['ci95'][1]:.2f}) | {b['oracle']:.2f} |")
    fit = rec["xerostomia"]["fit_mean_and_stem"]
    lines += ["", ("Planted spatial mechanism (parotid stem-cell regions): correlation of stem-region and "
                   f"whole-gland mean dose {rec['xerostomia']['stem_vs_mean_correlation']:.2f}, residual sd "
                   f"{rec['xerostomia']['stem_residual_sd_gy']:.1f} Gy; logistic fit on both: mean "
                   f"{fit['coef'][1]:+.3f} ± {fit['se'][1]:.3f} /Gy, stem {fit['coef'][2]:+.3f} ± "
                   f"{fit['se'][2]:.3f} /Gy.")]
    d = rec["dysphagia"]
    lines.append(f"Dysphagia logistic fit: b0 {d['fit']['coef'][0]:+.2f} ± {d['fit']['se'][0]:.2f}, PCM_S "
                 f"{d['fit']['coef'][1]:+.3f} ± {d['fit']['se'][1]:.3f}, SGL {d['fit']['coef'][2]:+.3f} ± "
                 f"{d['fit']['se'][2]:.3f} (model {d['model_coef'][0]}, {d['model_coef'][1]}, {d['model_coef'][2]}).")
    if kappas:
        pairs = ", ".join(f"{k} {v:.2f}" for k, v in kappas["cohen_pairwise"].items())
        lines += ["", "## Reviewer agreement", "",
                  (f"Fleiss' kappa {kappas['fleiss']:.2f}; Cohen's kappa pairwise {pairs} (mean "
                   f"{kappas['cohen_mean']:.2f}); consensus vs truth {kappas['consensus_vs_truth']:.2f}; "
                   f"target range {kappas['target_range'][0]}-{kappas['target_range'][1]} "
                   f"({kappas.get('target_range_basis', 'design target')}; see synth/reviewers.py).")]
    lines += ["", "## Contouring variability", "",
              "| period | patients | between-site margin sd (mm) | mean shift (mm) |", "|---|---|---|---|"]
    for period, c in contours.items():
        lines.append(f"| {period} | {c['patients']} | {c['between_site_margin_sd_mm']} | {c['mean_abs_shift_mm']} |")
    lines += ["", "Plots: " + ", ".join(PLOTS)]
    numbers = {"recovered": rec, "kappa": kappas, "contours": contours}
    return "\n".join(lines) + "\n", _plots(patients, rec, kappas), numbers


def write_report(manifest: dict, out_dir: Path) -> dict:
    """Write report.md and the PNGs into out_dir; return the numbers behind them."""
    from rtqa_node.synth.cohort import _write_atomic

    text, pngs, numbers = render(manifest)
    for name, data in pngs.items():
        _write_atomic(Path(out_dir) / name, data)
    _write_atomic(Path(out_dir) / REPORT_NAME, text)
    return numbers
