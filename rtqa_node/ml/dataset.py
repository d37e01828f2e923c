"""Training and evaluation data: a cohort as stacked bag arrays plus labels, from the synthetic generator
(``simulate_patient``: no files, ~1 s per patient) or from a folder written by ``rtqa synth`` (the DICOM files
through the worker's path, and the ground truth from ``ground_truth.json`` / ``manifest.json``).

Labels follow the synthetic cohort's ground-truth contract (docs/architecture.md, "Synthetic cohort", schema
version 2; version 1 manifests are read too): per patient the reviewers' verdicts and consensus, the outcomes
(0/1), the oracle probabilities and the planted parotid sub-region mask on the dose grid where present.
A clinic's data fit the same shape: a folder of plan studies plus a CSV with ``folder``, ``reviewer_1..R``,
``consensus`` and one 0/1 column per endpoint (:func:`cohort_from_folder`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from rtqa_node.ml.bags import (
    CONSTRAINTS,
    PATCH_SHAPE,
    PROTOCOL_FRACTIONS,
    STRUCTURE_VOCAB,
    PatientBags,
    StructureMetrics,
    bags_from_plan_study,
    bags_from_synthetic,
    metrics_from_dvh,
    metrics_from_truth,
    patch_values,
)
from rtqa_node.ml.mil import VERDICT_CLASSES

log = logging.getLogger(__name__)

ENDPOINTS = ("xerostomia", "dysphagia", "local_control")
#: the synthetic protocol's grading of the better-spared parotid mean (synth/protocol.py: deviation above 30 Gy,
#: minor up to 36 Gy; the 26 Gy objective is a bag feature, bags.PAROTID_SPARED_MEAN_GY)
RULE_PAROTID_SPARED_MEAN_GY = (30.0, 36.0)
#: the DVH metrics the baselines see: (structure, metric) in Gy / cc, plus fractions
DVH_COLUMNS = (
    ("Parotid_L", "mean_gy"), ("Parotid_R", "mean_gy"), ("Parotid_L", "volume_cc"), ("Parotid_R", "volume_cc"),
    ("Musc_Constrict", "mean_gy"), ("Musc_Constrict_S", "mean_gy"), ("Larynx", "mean_gy"), ("Larynx_SG", "mean_gy"),
    ("Cavity_Oral", "mean_gy"),
    ("Glnd_Submand_L", "mean_gy"), ("Glnd_Submand_R", "mean_gy"),
    ("PTV_70", "d95_gy"), ("PTV_70", "d98_gy"), ("CTV_70", "d98_gy"), ("CTV_70", "mean_gy"), ("GTV_70", "volume_cc"),
    ("SpinalCord", "max_gy"), ("Brainstem", "max_gy"),
)


@dataclass(frozen=True)
class Cohort:
    """P patients' bags and labels as stacked arrays (shapes per field). Missing labels are -1 / NaN."""

    tab_x: np.ndarray  # (P, Nt, F) float32
    tab_name_index: np.ndarray  # (P, Nt) int64
    tab_mask: np.ndarray  # (P, Nt) bool
    spa_voxels: np.ndarray  # (P, Ns, C, Z, Y, X) float16
    spa_features: np.ndarray  # (P, Ns, Pf) float32
    spa_region: np.ndarray  # (P, Ns) int64
    spa_mask: np.ndarray  # (P, Ns) bool
    spa_origin: np.ndarray  # (P, Ns, 3) int64
    subregion: np.ndarray  # (P, Ns, Z, Y, X) uint8: planted sub-region voxels per patch (0 when unknown)
    has_subregion: np.ndarray  # (P,) bool
    dvh: np.ndarray  # (P, len(DVH_COLUMNS) + 1) float32: DVH_COLUMNS then fractions
    reviewers: np.ndarray  # (P, R) int64 verdict index per reviewer (-1: none)
    consensus: np.ndarray  # (P,) int64
    true_verdict: np.ndarray  # (P,) int64
    events: np.ndarray  # (P, 3) float32, ENDPOINTS order, NaN unknown
    oracle: np.ndarray  # (P, 3) float32 oracle probabilities (NaN: not a synthetic cohort)
    stem_cell_share: np.ndarray  # (P,) float32 share of the xerostomia oracle risk from the sub-region (NaN unknown)
    stem_cell_cause: np.ndarray  # (P,) float32 1: xerostomia caused by the sub-region mechanism, 0: not, NaN unknown
    site: np.ndarray  # (P,) int64
    folder: np.ndarray  # (P,) str

    def __len__(self) -> int:
        return int(self.tab_x.shape[0])

    def subset(self, index: np.ndarray) -> Cohort:
        return Cohort(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def verdict_soft(self) -> np.ndarray:
        """(P, 3): the fraction of reviewers who gave each verdict (reviewer disagreement as soft labels)."""
        out = np.zeros((len(self), len(VERDICT_CLASSES)), dtype=np.float32)
        for r in range(self.reviewers.shape[1]):
            ok = self.reviewers[:, r] >= 0
            out[ok, self.reviewers[ok, r]] += 1.0
        total = out.sum(1, keepdims=True)
        fallback = np.eye(len(VERDICT_CLASSES), dtype=np.float32)[np.clip(self.consensus, 0, None)]
        return np.where(total > 0, out / np.maximum(total, 1), fallback)

    def save(self, path: Path) -> None:
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> Cohort:
        with np.load(path, allow_pickle=False) as z:
            n = len(z["tab_x"])  # fields added after a cache was written load as unknown (NaN)
            return cls(**{f.name: z[f.name] if f.name in z else np.full(n, np.nan, dtype=np.float32)
                          for f in fields(cls)})


@dataclass(frozen=True)
class Labels:
    reviewers: tuple[int, ...]
    consensus: int
    true_verdict: int
    events: tuple[float, float, float]
    oracle: tuple[float, float, float]
    stem_cell_share: float
    stem_cell_cause: float
    site: int


def labels_from_truth(t: dict) -> Labels:
    """One patient's labels from the ground truth (schema 2: ``reviews``, ``oracle``, ``outcomes`` 0/1;
    schema 1: ``reviewer_labels`` and ``outcomes`` {probability, event})."""
    v = VERDICT_CLASSES.index
    if "reviews" in t:
        reviewers = tuple(v(r["verdict"]) for r in t["reviews"]["reviewers"])
        consensus = v(t["reviews"]["consensus"])
    else:
        rl = t["reviewer_labels"]
        reviewers = tuple(v(x) for x in [rl["site_reviewer"], *rl["central_reviewers"]])
        consensus = v(rl["consensus"])
    events, oracle, stem = [], [], float("nan")
    for e in ENDPOINTS:
        out = t.get("outcomes", {}).get(e)
        if isinstance(out, dict):  # schema 1
            events.append(float(out["event"]))
            oracle.append(float(out["probability"]))
        else:
            events.append(float(out) if out is not None else float("nan"))
            oracle.append(float(t.get("oracle", {}).get(e, {}).get("probability", float("nan"))))
    cause = float("nan")
    mech = t.get("mechanisms", {}).get("xerostomia", {})
    if isinstance(mech, dict) and "parotid_stem_cell_region" in mech.get("contributing", ()):
        stem = float(mech.get("stem_cell_share", float("nan")))
        if "cause" in mech:
            cause = float(mech.get("cause") == "parotid_stem_cell_region")
    site = int(str(t.get("site_id", "SITE01"))[4:] or 1) - 1
    return Labels(reviewers, consensus, v(t["true_verdict"]), tuple(events), tuple(oracle), stem, cause, site)


def dvh_row(metrics: dict[str, StructureMetrics], fractions: int | None) -> np.ndarray:
    row = [getattr(metrics[s], m) if s in metrics else np.nan for s, m in DVH_COLUMNS]
    return np.asarray(row + [fractions if fractions is not None else PROTOCOL_FRACTIONS], dtype=np.float32)


def protocol_verdict(dvh: np.ndarray) -> np.ndarray:
    """Rule-only verdict index (P,) from the DVH table: the protocol's dose constraints (bags.CONSTRAINTS, the
    better-spared parotid) and fractionation. It sees no structure-set or export errors."""
    col = {c: k for k, c in enumerate(DVH_COLUMNS)}
    worst = np.zeros(len(dvh), dtype=np.int64)
    for structure, (metric, per_protocol, minor, sign) in CONSTRAINTS.items():
        value = dvh[:, col[(structure, metric)]]
        minor_dev = sign * (value - per_protocol) > 0
        major_dev = sign * (value - minor) > 0
        worst = np.maximum(worst, np.where(major_dev, 2, np.where(minor_dev, 1, 0)))
    spared = np.fmin(dvh[:, col[("Parotid_L", "mean_gy")]], dvh[:, col[("Parotid_R", "mean_gy")]])
    worst = np.maximum(worst, np.where(spared > RULE_PAROTID_SPARED_MEAN_GY[1], 2,
                                       np.where(spared > RULE_PAROTID_SPARED_MEAN_GY[0], 1, 0)))
    dev = np.abs(dvh[:, -1] - PROTOCOL_FRACTIONS)
    worst = np.maximum(worst, np.where(dev > 2, 2, np.where(dev > 0, 1, 0)))
    return worst


def _synth_source_digest() -> str:
    """Digest of the generator's source as imported (not as on disk now: the tree may change under a running
    process) and of BAGS_VERSION; part of every cache key."""
    return _SOURCE_DIGEST


def _digest_now() -> str:
    from rtqa_node import synth
    from rtqa_node.ml.bags import BAGS_VERSION

    h = hashlib.sha256(BAGS_VERSION.encode())
    for p in sorted(Path(synth.__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


_SOURCE_DIGEST = _digest_now()


def _subregion_dose_mask(patient) -> np.ndarray | None:
    """The planted sub-region on the dose grid from a simulated patient, if the generator provides one."""
    for name in ("subregion_mask_dose", "subregion_dose", "subregion_mask"):
        mask = getattr(patient, name, None)
        if isinstance(mask, np.ndarray) and mask.shape == tuple(patient.dose_grid.shape):
            return mask
    return None


def _stack(records: list[tuple[PatientBags, Labels, np.ndarray, np.ndarray | None, str]]) -> Cohort:
    R = max(len(lab.reviewers) for _, lab, _, _, _ in records)
    reviewers = np.full((len(records), R), -1, dtype=np.int64)
    subregion = np.zeros((len(records),) + records[0][0].spatial.mask.shape + PATCH_SHAPE, dtype=np.uint8)
    has = np.zeros(len(records), dtype=bool)
    for i, (b, lab, _, sub, _) in enumerate(records):
        reviewers[i, : len(lab.reviewers)] = lab.reviewers
        if sub is not None:
            subregion[i] = (patch_values(b.spatial, (sub > 0).astype(np.float32)) > 0).astype(np.uint8)
            has[i] = True
    return Cohort(
        tab_x=np.stack([r[0].tabular.instances for r in records]),
        tab_name_index=np.stack([r[0].tabular.extra["name_index"] for r in records]),
        tab_mask=np.stack([r[0].tabular.mask for r in records]),
        spa_voxels=np.stack([r[0].spatial.instances for r in records]).astype(np.float16),
        spa_features=np.stack([r[0].spatial.extra["features"] for r in records]),
        spa_region=np.stack([r[0].spatial.extra["region"] for r in records]),
        spa_mask=np.stack([r[0].spatial.mask for r in records]),
        spa_origin=np.stack([r[0].spatial.extra["origin_index"] for r in records]),
        subregion=subregion, has_subregion=has,
        dvh=np.stack([r[2] for r in records]),
        reviewers=reviewers,
        consensus=np.array([r[1].consensus for r in records], dtype=np.int64),
        true_verdict=np.array([r[1].true_verdict for r in records], dtype=np.int64),
        events=np.array([r[1].events for r in records], dtype=np.float32),
        oracle=np.array([r[1].oracle for r in records], dtype=np.float32),
        stem_cell_share=np.array([r[1].stem_cell_share for r in records], dtype=np.float32),
        stem_cell_cause=np.array([r[1].stem_cell_cause for r in records], dtype=np.float32),
        site=np.array([r[1].site for r in records], dtype=np.int64),
        folder=np.array([r[4] for r in records]),
    )


CHUNK_PATIENTS = 25


def simulate_cohort(*, patients: int, seed: int, sites: int = 3, first: int = 0,
                    cache_dir: Path | None = None, jobs: int = 1) -> Cohort:
    """Patients ``first .. first+patients-1`` of the synthetic cohort (seed, sites) as a :class:`Cohort`.

    With ``cache_dir``, simulated in chunks of CHUNK_PATIENTS cached under a key that includes a digest of the
    generator's and the bags' source, so an interrupted run resumes and parallel runs can share the work;
    ``jobs`` > 1 simulates the missing chunks in that many processes. Patient i does not depend on the cohort
    size (synth contract), so chunks of larger cohorts are reused.
    """
    if cache_dir is None:
        return _simulate(seed, sites, first, patients)
    starts = list(range(first - first % CHUNK_PATIENTS, first + patients, CHUNK_PATIENTS))
    paths = {c: Path(cache_dir) / f"synth-s{seed}-k{sites}-c{c}-{CHUNK_PATIENTS}-{_synth_source_digest()}.npz"
             for c in starts}
    missing = [c for c in starts if not paths[c].exists()]
    if jobs > 1 and len(missing) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the children only run numpy (synth + bags), and callers need no __main__ guard
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(min(jobs, len(missing)), mp_context=context) as pool:
            list(pool.map(_simulate_chunk, [(paths[c], seed, sites, c) for c in missing]))
    parts = []
    for chunk_first in starts:
        chunk = Cohort.load(paths[chunk_first]) if paths[chunk_first].exists() else \
            _simulate_chunk((paths[chunk_first], seed, sites, chunk_first))
        lo = max(first, chunk_first) - chunk_first
        hi = min(first + patients, chunk_first + CHUNK_PATIENTS) - chunk_first
        parts.append(chunk.subset(np.arange(lo, hi)))
    return concatenate(parts)


def _simulate_chunk(job: tuple[Path, int, int, int]) -> Cohort:
    """Simulate one cache chunk and write it atomically (a worker process's unit of work)."""
    path, seed, sites, chunk_first = job
    chunk = _simulate(seed, sites, chunk_first, CHUNK_PATIENTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    chunk.save(tmp)
    tmp.replace(path)
    return chunk


def concatenate(parts: list[Cohort]) -> Cohort:
    widths = {f.name: max(getattr(p, f.name).shape[1] for p in parts) for f in fields(Cohort)
              if getattr(parts[0], f.name).ndim > 1 and f.name == "reviewers"}
    out = {}
    for f in fields(Cohort):
        arrays = [getattr(p, f.name) for p in parts]
        if f.name in widths:  # reviewers: pad to the widest panel with -1
            arrays = [np.pad(a, ((0, 0), (0, widths[f.name] - a.shape[1])), constant_values=-1) for a in arrays]
        out[f.name] = np.concatenate(arrays)
    return Cohort(**out)


def _simulate(seed: int, sites: int, first: int, patients: int) -> Cohort:
    from rtqa_node.synth.cohort import CohortConfig, simulate_patient

    config = CohortConfig(patients=max(first + patients, sites), sites=sites, seed=seed)
    site_profiles = config.site_profiles()
    records = []
    t0 = time.monotonic()
    for i in range(first, first + patients):
        p = simulate_patient(config, i, site_profiles)
        bags = bags_from_synthetic(p, config)
        metrics = {n: m for n, o in p.truth["organs"].items() if (m := metrics_from_truth(n, o)) is not None}
        records.append((bags, labels_from_truth(p.truth), dvh_row(metrics, int(p.truth["plan"]["fractions"])),
                        _subregion_dose_mask(p), p.folder))
    log.info("ml_cohort_simulated", extra={"patients": patients, "first": first, "seed": seed,
                                            "elapsed_s": round(time.monotonic() - t0, 1)})
    return _stack(records)


def _truth_by_folder(folder: Path) -> dict[str, dict]:
    for name in ("ground_truth.json", "manifest.json"):
        if (folder / name).exists():
            doc = json.loads((folder / name).read_text())
            return {p["folder"]: p for p in doc["patients"]}
    return {}


def _labels_from_csv(row: dict) -> dict:
    """A clinic's CSV row (folder, reviewer_1..R, consensus, xerostomia, dysphagia, local_control) as truth."""
    reviewers = [row[k] for k in sorted(row) if k.startswith("reviewer_") and row[k]]
    return {"reviews": {"reviewers": [{"verdict": r} for r in reviewers], "consensus": row["consensus"]},
            "true_verdict": row.get("true_verdict") or row["consensus"],
            "outcomes": {e: int(row[e]) if row.get(e, "") != "" else None for e in ENDPOINTS},
            "site_id": row.get("site_id") or "SITE01"}


def cohort_from_folder(folder: Path, labels_csv: Path | None = None) -> Cohort:
    """Plan studies in ``folder/<patient>/`` through the worker's path (load, DVH, bags), labels from the
    ground truth next to them or from ``labels_csv``; the planted sub-region from ``subregions/*.npz``."""
    from rtqa_node.rt.dvh import structure_dvh
    from rtqa_node.rt.plan_study import load_folder, plan_dose

    folder = Path(folder)
    if labels_csv is not None:
        with open(labels_csv, newline="") as f:
            truth = {r["folder"]: _labels_from_csv(r) for r in csv.DictReader(f)}
    else:
        truth = _truth_by_folder(folder)
    if not truth:
        raise FileNotFoundError(f"no ground_truth.json, manifest.json or labels CSV for {folder}")
    records = []
    for name in sorted(truth):
        study = load_folder(folder / name)
        dose = plan_dose(study)
        dvh_metrics = {s.name: structure_dvh(s, dose).metrics for s in study.structure_set_for(dose).structures
                       if s.name in STRUCTURE_VOCAB and s.closed_planar}
        metrics = {n: metrics_from_dvh(m) for n, m in dvh_metrics.items()}
        bags = bags_from_plan_study(study, metrics)
        sub = None
        entry = truth[name].get("subregion") or {}
        if entry.get("path") and (folder / entry["path"]).exists():
            with np.load(folder / entry["path"]) as z:
                sub = z.get("mask_dose")
        plan = study.plan
        records.append((bags, labels_from_truth(truth[name]),
                        dvh_row(metrics, plan.number_of_fractions if plan else None), sub, name))
    return _stack(records)
