"""Baselines the MIL models must beat, all on whole-organ DVH metrics (``dataset.DVH_COLUMNS``):

- rule only: the protocol verdict (HN-SYNTH-SIB-70-56: PTV_70 D95, SpinalCord Dmax, fractionation);
- published NTCP/TCP models with cited parameters (the synthetic cohort's own whole-organ models, so on that
  cohort they miss only what the planted spatial mechanism adds):
  xerostomia: LKB on the mean dose to both parotids, TD50 = 39.9 Gy, m = 0.40, n = 1 (Dijkema et al., IJROBP
  2010); dysphagia: S = -6.09 + 0.057 Dmean(Musc_Constrict_S) + 0.037 Dmean(Larynx_SG), p = 1/(1 + e^-S)
  (Christianen et al., Radiother Oncol 2012;105:107, as the synthetic cohort reads it); local control:
  logistic TCP, TCD50 = 55 Gy x (GTV / 15 cc)^0.15, gamma50 = 2.5 (illustrative), on CTV_70 D98 as a DVH
  surrogate of the cohort's clonogen-weighted gEUD (a = -10), which whole-structure metrics cannot give;
- L2-regularised logistic regression on the DVH metrics (multinomial for the verdict, on the soft labels);
- MIL with mean pooling instead of attention: ``train.TrainConfig(model="tabular_mean")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch.nn import functional as F

from rtqa_node.ml.dataset import DVH_COLUMNS, Cohort, protocol_verdict
from rtqa_node.ml.mil import VERDICT_CLASSES

_COL = {c: k for k, c in enumerate(DVH_COLUMNS)}


def lkb_ntcp(mean_dose_gy: np.ndarray, *, td50_gy: float = 39.9, m: float = 0.40) -> np.ndarray:
    """LKB with n = 1 (gEUD = mean dose); defaults: xerostomia, Dijkema et al. 2010."""
    return norm.cdf((mean_dose_gy - td50_gy) / (m * td50_gy))


def logistic_response(dose_gy: np.ndarray, *, d50_gy, gamma50: float) -> np.ndarray:
    """1 / (1 + (D50 / D)^(4 gamma50))."""
    d = np.maximum(np.asarray(dose_gy, dtype=np.float64), 1e-6)
    return 1.0 / (1.0 + (d50_gy / d) ** (4.0 * gamma50))


def mean_parotids_gy(dvh: np.ndarray) -> np.ndarray:
    """Volume-weighted mean dose of both parotids together (P,)."""
    ml, mr = dvh[:, _COL[("Parotid_L", "mean_gy")]], dvh[:, _COL[("Parotid_R", "mean_gy")]]
    vl, vr = dvh[:, _COL[("Parotid_L", "volume_cc")]], dvh[:, _COL[("Parotid_R", "volume_cc")]]
    return (ml * vl + mr * vr) / np.maximum(vl + vr, 1e-6)


def published_models(dvh: np.ndarray) -> dict[str, np.ndarray]:
    """Endpoint -> probability (P,) from the published whole-organ models."""
    gtv = np.maximum(dvh[:, _COL[("GTV_70", "volume_cc")]], 0.5)
    return {
        "xerostomia": lkb_ntcp(mean_parotids_gy(dvh)),
        "dysphagia": 1.0 / (1.0 + np.exp(-(-6.09 + 0.057 * dvh[:, _COL[("Musc_Constrict_S", "mean_gy")]]
                                            + 0.037 * dvh[:, _COL[("Larynx_SG", "mean_gy")]]))),
        "local_control": logistic_response(dvh[:, _COL[("CTV_70", "d98_gy")]], d50_gy=55.0 * (gtv / 15.0) ** 0.15,
                                           gamma50=2.5),
    }


def rule_only_verdict(dvh: np.ndarray) -> np.ndarray:
    """(P, 3) one-hot protocol verdict."""
    return np.eye(len(VERDICT_CLASSES))[protocol_verdict(dvh)]


@dataclass(frozen=True)
class LogisticModel:
    """Standardised features -> softmax/sigmoid; missing values are imputed with the training mean."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (F, T)
    bias: np.ndarray  # (T,)

    def _z(self, x: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(x), self.mean, x)
        return ((x - self.mean) / self.scale) @ self.weight + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = self._z(x)
        if z.shape[1] == 1:
            return 1.0 / (1.0 + np.exp(-z[:, 0]))
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-2) -> LogisticModel:
    """y: (P,) 0/1 -> binary model; y: (P, T) soft labels -> multinomial. L-BFGS on the penalised NLL."""
    mean = np.nanmean(x, axis=0)
    mean = np.where(np.isnan(mean), 0.0, mean)
    xi = np.where(np.isnan(x), mean, x)
    scale = xi.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    X = torch.as_tensor((xi - mean) / scale, dtype=torch.float64)
    Y = torch.as_tensor(y, dtype=torch.float64)
    T = 1 if Y.ndim == 1 else Y.shape[1]
    W = torch.zeros(X.shape[1], T, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = X @ W + b
        if T == 1:
            loss = F.binary_cross_entropy_with_logits(z[:, 0], Y)
        else:
            loss = -(Y * F.log_softmax(z, -1)).sum(-1).mean()
        loss = loss + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(mean, scale, W.detach().numpy(), b.detach().numpy())


@dataclass(frozen=True)
class DvhLogistic:
    """Logistic regression on DVH metrics: one binary model per endpoint, one multinomial for the verdict."""

    endpoints: dict[str, LogisticModel]
    verdict: LogisticModel

    @classmethod
    def fit(cls, cohort: Cohort) -> DvhLogistic:
        from rtqa_node.ml.dataset import ENDPOINTS

        models = {}
        for k, e in enumerate(ENDPOINTS):
            known = ~np.isnan(cohort.events[:, k])
            models[e] = fit_logistic(cohort.dvh[known], cohort.events[known, k])
        return cls(models, fit_logistic(cohort.dvh, cohort.verdict_soft))

    def predict(self, dvh: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.verdict.predict_proba(dvh), {e: m.predict_proba(dvh) for e, m in self.endpoints.items()}
