"""Simulated expert QA: central reviewers grade every plan against the protocol with their own thresholds
(``tolerance_pct`` on every dose limit), miss rates (a deviation overlooked), severity slips (minor <-> major)
and false alarms; consensus is the ordinal median (ties to the more severe). Agreement is reported as
Cohen's kappa (pairwise, unweighted) and Fleiss' kappa (Fleiss, Psychol Bull 1971;76:378).

Target: kappa between 0.4 and 0.8 ("moderate" to "substantial", Landis and Koch, Biometrics 1977;33:159).
This band is a DESIGN TARGET, not a published range: a literature search (issue 7) found no published
Cohen's or Fleiss' kappa for RTQA reviewers grading plans or contours as per protocol / minor / major
deviation. The nearest published figures, none of them that measurement:
- Radiat Oncol 2020;15:64 (doi 10.1186/s13014-020-01507-5, SPIDERplan validation): three radiation oncologists
  graded 40 nasopharynx plans as "Good" / "Admissible with minor deviations" / "Not Admissible"; inter-rater
  Brennan-Prediger kappa "substantial agreements were verified in most cases" (abstract; no numbers seen).
- Cagni et al., Front Oncol 2021;11:706034: 9 observers scored 65 head-and-neck plans (7-point scale); median
  pairwise exact agreement 27.7 % [6.2, 40.0], 78.5 % [63.1, 86.2] for acceptable vs not (percent agreement,
  not kappa).
So the band is consistent with, but not derived from, published plan-review agreement. The reviewer
parameters below are tuned to it (illustrative, not fitted to a trial); they were not changed when the basis
was checked (Fleiss 0.52, Cohen 0.48-0.61 on the 200-patient reference cohort, inside the band).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rtqa_node.synth.protocol import SEVERITIES, PlanFacts, grade, verdict

REVIEWER_STREAM = 7_401
KAPPA_RANGE = (0.4, 0.8)
KAPPA_RANGE_BASIS = ("design target (Landis-Koch moderate to substantial); no published kappa for RTQA "
                     "per-protocol/minor/major grading was found")
CONSENSUS_RULE = "ordinal median of the reviewers' verdicts, ties to the more severe"


@dataclass(frozen=True, slots=True)
class ReviewerProfile:
    reviewer_id: str  # "R1"
    tolerance_pct: float  # > 0 lenient, < 0 strict, applied to every dose limit
    miss_pct: float  # chance to overlook each deviation
    slip_pct: float  # chance to grade a found deviation one severity off
    false_alarm_pct: float  # chance to call a per-protocol plan a minor deviation

    def as_dict(self) -> dict:
        return asdict(self)


def reviewer_profiles(seed: int, count: int) -> list[ReviewerProfile]:
    rng = np.random.default_rng([seed, REVIEWER_STREAM])
    return [
        ReviewerProfile(
            reviewer_id=f"R{k + 1}",
            tolerance_pct=round(float(rng.normal(0.0, 1.5)), 2),
            miss_pct=round(float(rng.uniform(8.0, 20.0)), 1),
            slip_pct=round(float(rng.uniform(8.0, 20.0)), 1),
            false_alarm_pct=round(float(rng.uniform(3.0, 10.0)), 1),
        )
        for k in range(count)
    ]


def review(rng: np.random.Generator, facts: PlanFacts, profile: ReviewerProfile) -> dict:
    """One reviewer's verdict and the deviation codes they report."""
    found = []
    for d in grade(facts, tolerance_pct=profile.tolerance_pct):
        if rng.random() * 100.0 < profile.miss_pct:
            continue
        severity = d.severity
        if rng.random() * 100.0 < profile.slip_pct:
            severity = "major" if severity == "minor" else "minor"
        found.append((d.code, severity))
    if not found and rng.random() * 100.0 < profile.false_alarm_pct:
        found.append(("other", "minor"))
    level = max((SEVERITIES.index(s) for _, s in found), default=0)
    return {"reviewer_id": profile.reviewer_id, "verdict": SEVERITIES[level], "codes": sorted({c for c, _ in found})}


def consensus(verdicts: list[str]) -> str:
    ranks = sorted(SEVERITIES.index(v) for v in verdicts)
    return SEVERITIES[ranks[len(ranks) // 2]]


def review_plan(rng: np.random.Generator, facts: PlanFacts, profiles: list[ReviewerProfile]) -> dict:
    reviews = [review(rng, facts, p) for p in profiles]
    return {"reviewers": reviews, "consensus": consensus([r["verdict"] for r in reviews]),
            "consensus_rule": CONSENSUS_RULE, "true_verdict": verdict(grade(facts))}


def cohen_kappa(a: list[str], b: list[str], categories: tuple[str, ...] = SEVERITIES) -> float:
    """Unweighted Cohen's kappa of two raters over the same items."""
    if len(a) != len(b) or not a:
        raise ValueError("cohen_kappa needs two equally long, non-empty label lists")
    index = {c: i for i, c in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    for x, y in zip(a, b):
        table[index[x], index[y]] += 1
    n = table.sum()
    p_o = np.trace(table) / n
    p_e = float(np.sum(table.sum(axis=0) * table.sum(axis=1))) / n**2
    return float((p_o - p_e) / (1.0 - p_e)) if p_e < 1.0 else 1.0


def fleiss_kappa(ratings: list[list[str]], categories: tuple[str, ...] = SEVERITIES) -> float:
    """Fleiss' kappa; ratings[i] are the labels of item i (the same number of raters per item)."""
    if not ratings:
        raise ValueError("fleiss_kappa needs at least one item")
    index = {c: i for i, c in enumerate(categories)}
    counts = np.zeros((len(ratings), len(categories)))
    for i, labels in enumerate(ratings):
        for label in labels:
            counts[i, index[label]] += 1
    n = counts.sum(axis=1)[0]
    if n < 2 or np.any(counts.sum(axis=1) != n):
        raise ValueError("fleiss_kappa needs the same number (>= 2) of raters per item")
    p_j = counts.sum(axis=0) / counts.sum()
    p_i = (np.sum(counts**2, axis=1) - n) / (n * (n - 1))
    p_bar, p_e = float(p_i.mean()), float(np.sum(p_j**2))
    return float((p_bar - p_e) / (1.0 - p_e)) if p_e < 1.0 else 1.0


def agreement(patients: list[dict]) -> dict:
    """Kappas of a cohort's reviews (PATIENT["reviews"]) and each reviewer's and the consensus' kappa vs truth."""
    ids = [r["reviewer_id"] for r in patients[0]["reviews"]["reviewers"]]
    labels = {rid: [p["reviews"]["reviewers"][k]["verdict"] for p in patients] for k, rid in enumerate(ids)}
    pairs = {f"{a}-{b}": round(cohen_kappa(labels[a], labels[b]), 4)
             for i, a in enumerate(ids) for b in ids[i + 1:]}
    truth = [p["true_verdict"] for p in patients]
    return {
        "reviewers": ids,
        "cohen_pairwise": pairs,
        "cohen_mean": round(float(np.mean(list(pairs.values()))), 4) if pairs else None,
        "fleiss": round(fleiss_kappa([[labels[r][i] for r in ids] for i in range(len(patients))]), 4),
        "vs_truth": {rid: round(cohen_kappa(labels[rid], truth), 4) for rid in ids},
        "consensus_vs_truth": round(cohen_kappa([p["reviews"]["consensus"] for p in patients], truth), 4),
        "target_range": list(KAPPA_RANGE),
        "target_range_basis": KAPPA_RANGE_BASIS,
    }
