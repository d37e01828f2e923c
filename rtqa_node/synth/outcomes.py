"""Synthetic outcomes and reviewer labels: the planted signal that models are trained and tested against.

Models (doses in Gy, probabilities in [0, 1]):
- xerostomia (salivary flow < 25 % of baseline at 1 year): LKB on the mean dose to both parotids together,
  TD50 = 39.9 Gy, m = 0.40, n = 1 (Dijkema et al., IJROBP 2010, combined Michigan-Utrecht data);
- dysphagia (grade >= 2 at 6 months): logistic in the mean pharyngeal constrictor dose, D50 = 60 Gy,
  gamma50 = 2.0 (illustrative, in the style of Christianen et al., Radiother Oncol 2012);
- local control at 2 years: logistic TCP in PTV_70 D95, TCD50 = 55 Gy x (GTV / 15 cc)^0.15, gamma50 = 2.5
  (illustrative).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from rtqa_node.synth.protocol import SEVERITIES


def lkb_ntcp(mean_dose_gy: float, *, td50_gy: float, m: float) -> float:
    """Lyman-Kutcher-Burman NTCP with n = 1 (the gEUD is the mean dose)."""
    return float(norm.cdf((mean_dose_gy - td50_gy) / (m * td50_gy)))


def logistic_response(dose_gy: float, *, d50_gy: float, gamma50: float) -> float:
    """1 / (1 + (D50 / D)^(4 gamma50)): response probability with slope gamma50 at D50."""
    if dose_gy <= 0:
        return 0.0
    return 1.0 / (1.0 + (d50_gy / dose_gy) ** (4.0 * gamma50))


def xerostomia_ntcp(mean_parotids_gy: float) -> float:
    return lkb_ntcp(mean_parotids_gy, td50_gy=39.9, m=0.40)


def dysphagia_ntcp(mean_constrictor_gy: float) -> float:
    return logistic_response(mean_constrictor_gy, d50_gy=60.0, gamma50=2.0)


def local_control_tcp(ptv70_d95_gy: float, gtv_volume_cc: float) -> float:
    tcd50 = 55.0 * (max(gtv_volume_cc, 0.5) / 15.0) ** 0.15
    return logistic_response(ptv70_d95_gy, d50_gy=tcd50, gamma50=2.5)


def draw_outcomes(rng: np.random.Generator, *, mean_parotids_gy: float, mean_constrictor_gy: float,
                  ptv70_d95_gy: float, gtv_volume_cc: float) -> dict:
    """One Bernoulli draw per endpoint (uniforms drawn in a fixed order, so a draw is monotone in risk)."""
    models = {
        "xerostomia": (xerostomia_ntcp(mean_parotids_gy), "LKB mean parotids TD50=39.9 m=0.40 n=1"),
        "dysphagia": (dysphagia_ntcp(mean_constrictor_gy), "logistic Musc_Constrict mean D50=60 g50=2.0"),
        "local_control": (local_control_tcp(ptv70_d95_gy, gtv_volume_cc),
                          "logistic PTV_70 D95 TCD50=55*(GTV/15cc)^0.15 g50=2.5"),
    }
    out = {}
    for name, (probability, model) in models.items():
        u = float(rng.random())
        out[name] = {"probability": round(probability, 4), "event": bool(u < probability), "model": model}
    return out


def reviewer_labels(rng: np.random.Generator, true_verdict: str, *, upgrade_pct: float, downgrade_pct: float,
                    central_raters: int = 2, central_error_pct: float = 5.0) -> dict:
    """Labels of the site's own reviewer and of central reviewers: each grades one step more or less severe
    than the truth with the given chances. The consensus is the median label."""
    truth = SEVERITIES.index(true_verdict)

    def rate(up_pct: float, down_pct: float) -> str:
        u = float(rng.random()) * 100.0
        step = 1 if u < up_pct else (-1 if u < up_pct + down_pct else 0)
        return SEVERITIES[min(max(truth + step, 0), len(SEVERITIES) - 1)]

    labels = [rate(upgrade_pct, downgrade_pct)] + [
        rate(central_error_pct, central_error_pct) for _ in range(central_raters)
    ]
    consensus = SEVERITIES[int(np.median([SEVERITIES.index(label) for label in labels]))]
    return {"site_reviewer": labels[0], "central_reviewers": labels[1:], "consensus": consensus,
            "true": true_verdict, "site_reviewer_correct": labels[0] == true_verdict}
