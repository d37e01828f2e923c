"""Evaluation on a held-out cohort: every model and baseline in one table, with the issue-9 acceptance criteria.

Metrics: AUC (Mann-Whitney) with a percentile bootstrap 95 % CI; expected calibration error (10 equal-width
bins) and reliability plot; decision curve (net benefit, Vickers & Elkin, Med Decis Making 2006); Cohen's kappa
of the predicted verdict against each reviewer and the consensus, next to the reviewers' pairwise kappas; and
for spatial models the share of the xerostomia risk map's attention mass inside the planted parotid sub-region.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from rtqa_node.ml.baselines import DvhLogistic, published_models, rule_only_verdict
from rtqa_node.ml.dataset import ENDPOINTS, Cohort
from rtqa_node.ml.mil import TASKS, VERDICT_CLASSES
from rtqa_node.ml.train import TrainedModel, batch_tensors, forward

log = logging.getLogger(__name__)

XEROSTOMIA_BRANCH = TASKS.index("xerostomia_severe")
#: a patient's planted sub-region "drives risk" when its mechanism gives at least this share of the oracle risk
DRIVES_RISK_SHARE = 0.25
AUC_MARGIN_TO_ORACLE = 0.03
ATTENTION_IN_REGION_MIN = 0.70


# -- metrics --------------------------------------------------------------------------------------------------


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties count 1/2); NaN with one class only."""
    y = np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(p)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, *, n: int = 500, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        a = auc(y[i], p[i])
        if not np.isnan(a):
            values.append(a)
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over bins of |mean(p) - mean(y)| weighted by the bin's share."""
    edges = np.linspace(0, 1, bins + 1)
    k = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = 0.0
    for b in range(bins):
        sel = k == b
        if sel.any():
            out += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(out)


def net_benefit(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit TP/n - FP/n * pt / (1 - pt) at each threshold probability pt."""
    n = len(y)
    out = []
    for t in thresholds:
        pos = p >= t
        tp, fp = np.sum(pos & (y == 1)), np.sum(pos & (y == 0))
        out.append(tp / n - fp / n * t / (1 - t))
    return np.asarray(out)


def cohen_kappa(a: np.ndarray, b: np.ndarray, classes: int = len(VERDICT_CLASSES)) -> float:
    ok = (a >= 0) & (b >= 0)
    a, b = a[ok], b[ok]
    if len(a) == 0:
        return float("nan")
    cm = np.zeros((classes, classes))
    np.add.at(cm, (a, b), 1)
    cm /= cm.sum()
    po, pe = np.trace(cm), float(cm.sum(1) @ cm.sum(0))
    return float((po - pe) / (1 - pe)) if pe < 1 else 1.0


# -- predictions ----------------------------------------------------------------------------------------------


@dataclass
class CohortPredictions:
    """One model's calibrated outputs on a cohort; ``voxel_attention``: xerostomia branch (P, Ns, V)."""

    name: str
    kind: str  # "mil" | "baseline"
    verdict: np.ndarray | None  # (P, 3)
    endpoints: dict[str, np.ndarray] = field(default_factory=dict)  # endpoint -> (P,)
    voxel_attention: np.ndarray | None = None


def predict_cohort(model: TrainedModel, cohort: Cohort, *, batch_size: int = 32,
                   device: torch.device | None = None) -> CohortPredictions:
    device = device or torch.device("cpu")
    module = model.module.to(device).eval()
    t = torch.as_tensor(model.temperatures)
    nv = len(VERDICT_CLASSES)
    verdict, binary, voxels = [], [], []
    with torch.no_grad():
        for i in range(0, len(cohort), batch_size):
            idx = np.arange(i, min(i + batch_size, len(cohort)))
            out = forward(module, model.config.model, batch_tensors(cohort, idx, device))
            z = out.logits.cpu()
            verdict.append(torch.softmax(z[:, :nv] / t[0], -1))
            binary.append(torch.sigmoid(z[:, nv:] / t[1:]))
            spatial = getattr(out, "spatial", out) if model.config.model in ("spatial", "fused") else None
            if spatial is not None:
                voxels.append(spatial.voxel_attention[:, XEROSTOMIA_BRANCH].cpu())
    b = torch.cat(binary).numpy()
    return CohortPredictions(
        model.name, "mil", torch.cat(verdict).numpy(), {e: b[:, k] for k, e in enumerate(ENDPOINTS)},
        torch.cat(voxels).numpy() if voxels else None)


def baseline_predictions(train: Cohort, test: Cohort) -> list[CohortPredictions]:
    lr = DvhLogistic.fit(train)
    lr_verdict, lr_endpoints = lr.predict(test.dvh)
    return [
        CohortPredictions("rule_only (protocol verdict)", "baseline", rule_only_verdict(test.dvh)),
        CohortPredictions("published NTCP/TCP (LKB, logistic)", "baseline", None, published_models(test.dvh)),
        CohortPredictions("logistic regression on DVH", "baseline", lr_verdict, lr_endpoints),
    ]


def oracle_predictions(test: Cohort) -> CohortPredictions | None:
    if np.all(np.isnan(test.oracle)):
        return None
    return CohortPredictions("oracle (true probabilities)", "oracle", None,
                             {e: test.oracle[:, k] for k, e in enumerate(ENDPOINTS)})


# -- evaluation -------------------------------------------------------------------------------------------------


def drives_risk(test: Cohort) -> np.ndarray:
    """(P,) bool: the planted sub-region mechanism gives >= DRIVES_RISK_SHARE of the xerostomia oracle risk."""
    share = test.stem_cell_share
    return test.has_subregion & ~np.isnan(share) & (share >= DRIVES_RISK_SHARE)


def _attention_in_region(pred: CohortPredictions, test: Cohort, sel: np.ndarray) -> float:
    if pred.voxel_attention is None or not sel.any():
        return float("nan")
    inside = test.subregion.reshape(test.subregion.shape[:2] + (-1,)) > 0  # (P, Ns, V)
    mass = (pred.voxel_attention * inside).sum(axis=(1, 2))  # (P,)
    return float(mass[sel].mean())


def score(pred: CohortPredictions, test: Cohort, *, seed: int = 0) -> dict:
    row: dict = {"model": pred.name, "kind": pred.kind, "endpoints": {}}
    risk = drives_risk(test)
    for k, e in enumerate(ENDPOINTS):
        if e not in pred.endpoints:
            continue
        y, p = test.events[:, k], pred.endpoints[e]
        known = ~np.isnan(y) & ~np.isnan(p)  # a baseline without its structure (missing OAR) predicts NaN
        y, p = y[known].astype(int), p[known]
        lo, hi = bootstrap_auc_ci(y, p, seed=seed)
        entry = {"auc": auc(y, p), "auc_ci95": [lo, hi], "ece": ece(y, p), "n": len(y), "events": int(y.sum())}
        if e == "xerostomia" and risk.any():
            sel = risk[known]
            entry["auc_planted_mechanism"] = auc(y[sel], p[sel])
            entry["n_planted_mechanism"] = int(sel.sum())
        row["endpoints"][e] = entry
    if pred.verdict is not None:
        v = np.argmax(pred.verdict, axis=1)
        row["verdict"] = {
            "kappa_consensus": cohen_kappa(v, test.consensus),
            "kappa_reviewers": [cohen_kappa(v, test.reviewers[:, r]) for r in range(test.reviewers.shape[1])],
            "accuracy_consensus": float(np.mean(v == test.consensus)),
            "auc_major": auc(test.consensus == 2, pred.verdict[:, 2]),
        }
    row["attention_in_subregion"] = _attention_in_region(pred, test, risk)
    row["attention_in_subregion_all"] = _attention_in_region(pred, test, test.has_subregion)
    return row


def reviewer_agreement(test: Cohort) -> dict:
    R = test.reviewers.shape[1]
    pairs = {f"R{a + 1}-R{b + 1}": cohen_kappa(test.reviewers[:, a], test.reviewers[:, b])
             for a, b in combinations(range(R), 2)}
    return {"pairwise_kappa": pairs, "mean_pairwise_kappa": float(np.nanmean(list(pairs.values()))) if pairs else float("nan"),
            "kappa_vs_consensus": [cohen_kappa(test.reviewers[:, r], test.consensus) for r in range(R)]}


def criteria(rows: list[dict], agreement: dict, *, fused: str = "fused", spatial: str = "spatial") -> list[dict]:
    """The issue-9 acceptance criteria, each {criterion, passed, detail}."""
    by = {r["model"]: r for r in rows}
    out = []
    oracle = next((r for r in rows if r["kind"] == "oracle"), None)
    f = by.get(fused)
    baselines = [r for r in rows if r["kind"] == "baseline" and "xerostomia" in r["endpoints"]]
    baselines += [r for r in rows if r["model"] == "tabular_mean"]
    if f and oracle:
        fa, oa = f["endpoints"]["xerostomia"]["auc"], oracle["endpoints"]["xerostomia"]["auc"]
        out.append({"criterion": f"fused xerostomia AUC within {AUC_MARGIN_TO_ORACLE} of the oracle",
                    "passed": bool(oa - fa <= AUC_MARGIN_TO_ORACLE), "detail": f"fused {fa:.3f}, oracle {oa:.3f}"})
        best = max(baselines, key=lambda r: r["endpoints"]["xerostomia"]["auc"])
        ba = best["endpoints"]["xerostomia"]["auc"]
        out.append({"criterion": "fused xerostomia AUC above every baseline", "passed": bool(fa > ba),
                    "detail": f"fused {fa:.3f}, best baseline {best['model']} {ba:.3f}"})
    planted = [r for r in (by.get(fused), by.get(spatial)) if r and "auc_planted_mechanism" in r["endpoints"].get("xerostomia", {})]
    dvh_baselines = [r for r in rows if r["kind"] == "baseline" and "auc_planted_mechanism" in r["endpoints"].get("xerostomia", {})]
    if planted and dvh_baselines:
        best_m = max(planted, key=lambda r: r["endpoints"]["xerostomia"]["auc_planted_mechanism"])
        best_b = max(dvh_baselines, key=lambda r: r["endpoints"]["xerostomia"]["auc_planted_mechanism"])
        m, b = (best_m["endpoints"]["xerostomia"]["auc_planted_mechanism"],
                best_b["endpoints"]["xerostomia"]["auc_planted_mechanism"])
        out.append({"criterion": "spatial or fused beats whole-organ DVH baselines on the planted mechanism",
                    "passed": bool(m > b), "detail": f"{best_m['model']} {m:.3f} vs {best_b['model']} {b:.3f} "
                    f"(xerostomia AUC, {best_m['endpoints']['xerostomia']['n_planted_mechanism']} patients where the "
                    "sub-region drives risk)"})
    else:
        out.append({"criterion": "spatial or fused beats whole-organ DVH baselines on the planted mechanism",
                    "passed": False, "detail": "no planted sub-region in this cohort's ground truth"})
    att = [(r["model"], r["attention_in_subregion"]) for r in rows if not np.isnan(r.get("attention_in_subregion", np.nan))]
    if att:
        name, value = max(att, key=lambda t: t[1])
        out.append({"criterion": f">= {ATTENTION_IN_REGION_MIN:.0%} of risk-map attention mass in the planted sub-region",
                    "passed": bool(value >= ATTENTION_IN_REGION_MIN), "detail": f"{name}: {value:.1%}"})
    else:
        out.append({"criterion": f">= {ATTENTION_IN_REGION_MIN:.0%} of risk-map attention mass in the planted sub-region",
                    "passed": False, "detail": "no planted sub-region in this cohort's ground truth"})
    if f and "verdict" in f:
        k, rk = f["verdict"]["kappa_consensus"], agreement["mean_pairwise_kappa"]
        out.append({"criterion": "predicted QA verdict agrees with consensus at least as well as reviewers agree",
                    "passed": bool(k >= rk), "detail": f"kappa(fused, consensus) {k:.3f}, reviewers' mean pairwise {rk:.3f}"})
    return out


@dataclass(frozen=True)
class EvaluationResult:
    rows: list
    agreement: dict
    criteria: list
    cohort: dict

    def to_json(self) -> dict:
        return {"rows": self.rows, "reviewer_agreement": self.agreement, "criteria": self.criteria,
                "cohort": self.cohort, "all_passed": all(c["passed"] for c in self.criteria)}


def evaluate(models: list[TrainedModel], train: Cohort, test: Cohort, *, out_dir: Path | None = None,
             seed: int = 0, description: str = "") -> EvaluationResult:
    """Every model, baseline and the oracle on ``test``; baselines are fitted on ``train``. ``description`` (which
    cohorts these are) heads the report."""
    preds = [predict_cohort(m, test) for m in models] + baseline_predictions(train, test)
    oracle = oracle_predictions(test)
    if oracle is not None:
        preds.append(oracle)
    rows = [score(p, test, seed=seed) for p in preds]
    agreement = reviewer_agreement(test)
    crit = criteria(rows, agreement)
    info = {"patients": len(test), "events": {e: int(np.nansum(test.events[:, k])) for k, e in enumerate(ENDPOINTS)},
            "with_subregion": int(test.has_subregion.sum()), "sub_region_drives_risk": int(drives_risk(test).sum()),
            "description": description}
    result = EvaluationResult(rows, agreement, crit, info)
    if out_dir is not None:
        write_report(result, preds, test, Path(out_dir))
    return result


def describe_cohorts(train: dict, test: dict) -> str:
    """One sentence naming the training and test cohorts (``rtqa train`` data records) and what kind of
    validation that is: the synthetic generator draws sites (institutions) and reviewers from the seed."""
    def span(d: dict) -> str:
        first = d.get("first", 0)
        return f"seed {d.get('seed')}, patients {first}-{first + d.get('patients', 0) - 1}, {d.get('sites')} sites"

    if test.get("source") != "synthetic" or train.get("source") != "synthetic":
        return f"Test data: {test.get('source')}; training data: {train.get('source')}."
    kind = ("internal validation: new patients of the training sites and reviewers" if test.get("seed") == train.get("seed")
            else "external validation: other sites (contouring and planning styles, case mix) and other reviewers "
                 "than in training, since the generator draws them from the seed")
    return f"Test cohort: synthetic {span(test)}; training cohort: synthetic {span(train)}; {kind}."


# -- report ----------------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def markdown(result: EvaluationResult) -> str:
    lines = [f"# Model evaluation: {result.cohort['patients']} held-out patients", ""]
    if result.cohort.get("description"):
        lines += [result.cohort["description"], ""]
    lines += [
             f"Events: {result.cohort['events']}; planted sub-region present for {result.cohort['with_subregion']}, "
             f"driving >= {DRIVES_RISK_SHARE:.0%} of xerostomia risk for {result.cohort['sub_region_drives_risk']}.", "",
             "| model | xerostomia AUC [95% CI] | ECE | planted-mechanism AUC | dysphagia AUC | ECE | local control AUC | ECE "
             "| verdict kappa vs consensus | attention in sub-region |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        e = r["endpoints"]
        cells = [r["model"]]
        x = e.get("xerostomia")
        cells += ([f"{_fmt(x['auc'])} [{_fmt(x['auc_ci95'][0])}, {_fmt(x['auc_ci95'][1])}]", _fmt(x["ece"]),
                   _fmt(x.get("auc_planted_mechanism"))] if x else ["-", "-", "-"])
        for name in ("dysphagia", "local_control"):
            d = e.get(name)
            cells += [f"{_fmt(d['auc'])} [{_fmt(d['auc_ci95'][0])}, {_fmt(d['auc_ci95'][1])}]", _fmt(d["ece"])] if d else ["-", "-"]
        cells.append(_fmt(r["verdict"]["kappa_consensus"]) if "verdict" in r else "-")
        cells.append(_fmt(r.get("attention_in_subregion")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## QA verdict agreement (Cohen's kappa)", "",
              "| model | vs consensus | " + " | ".join(f"vs R{k + 1}" for k in range(len(result.agreement["kappa_vs_consensus"]))) + " |",
              "|---|---|" + "---|" * len(result.agreement["kappa_vs_consensus"])]
    for r in result.rows:
        if "verdict" in r:
            lines.append(f"| {r['model']} | {_fmt(r['verdict']['kappa_consensus'])} | "
                         + " | ".join(_fmt(k) for k in r["verdict"]["kappa_reviewers"]) + " |")
    lines.append("| reviewers vs consensus | - | " + " | ".join(_fmt(k) for k in result.agreement["kappa_vs_consensus"]) + " |")
    lines += ["", "Reviewers' pairwise kappa: " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.agreement["pairwise_kappa"].items())
              + f" (mean {_fmt(result.agreement['mean_pairwise_kappa'])})", "", "## Criteria (issue 9)", ""]
    for c in result.criteria:
        lines.append(f"- [{'x' if c['passed'] else ' '}] {c['criterion']}: {c['detail']}")
    lines += ["", "Plots: reliability.png (calibration, xerostomia), decision_curve.png (net benefit, xerostomia).", ""]
    return "\n".join(lines)


def write_report(result: EvaluationResult, preds: list[CohortPredictions], test: Cohort, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    k = ENDPOINTS.index("xerostomia")
    y = test.events[:, k]
    known = ~np.isnan(y)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    edges = np.linspace(0, 1, 11)
    for p in preds:
        if "xerostomia" not in p.endpoints:
            continue
        q = p.endpoints["xerostomia"][known]
        b = np.clip(np.digitize(q, edges[1:-1]), 0, 9)
        xs = [q[b == i].mean() for i in range(10) if (b == i).sum() >= 3]
        ys = [y[known][b == i].mean() for i in range(10) if (b == i).sum() >= 3]
        ax.plot(xs, ys, "o-", ms=3, label=p.name)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability: xerostomia")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    th = np.linspace(0.05, 0.8, 31)
    yk = y[known].astype(int)
    ax.plot(th, net_benefit(yk, np.ones(len(yk)), th), "k--", lw=1, label="treat all")
    ax.axhline(0, color="k", lw=0.8, label="treat none")
    for p in preds:
        if "xerostomia" in p.endpoints:
            ax.plot(th, net_benefit(yk, p.endpoints["xerostomia"][known], th), label=p.name)
    ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve: xerostomia",
           ylim=(-0.05, max(0.05, yk.mean() + 0.05)))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "decision_curve.png", dpi=110)
    plt.close(fig)
    (out_dir / "report.md").write_text(markdown(result))
    (out_dir / "evaluation.json").write_text(json.dumps(result.to_json(), indent=2, default=float) + "\n")
