"""Inference for the worker: the default model is loaded once per process, and a reviewed plan study gets its
predictions (calibrated probabilities with the top-attended instances) and a per-voxel risk map.

``add_predictions(review, files, model=...)`` is what the worker (and ``rtqa review``) calls after the rule-based
review: it reuses the review's DVH metrics (``review.metrics["structures"]``, TG-263 names from the review's
name matching), builds the bags on the same code path as training (``bags.bags_from_plan_study``) and returns
the Review with ``predictions``, ``metrics["ml"]`` and, for a spatial or fused model, ``attention`` (the
xerostomia branch's voxel attention on the dose grid, which ``report/`` draws as the risk map). A model that
cannot run leaves the review as it was, with the reason in ``metrics["ml"]``: ML never blocks a review.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtqa_node.config import MODEL_WEIGHTS_NAME, model_folder, models_dir
from rtqa_node.ml.bags import (
    PATCH_SHAPE,
    SPATIAL_ORGANS,
    PatientBags,
    StructureMetrics,
    bags_from_plan_study,
    risk_map,
)
from rtqa_node.ml.mil import BINARY_TARGETS, TASKS, VERDICT_CLASSES
from rtqa_node.ml.train import MODEL_VERSION, TrainedModel, forward
from rtqa_node.review import AttentionMap, Prediction, Review, Verdict

log = logging.getLogger(__name__)

DEFAULT_MODEL = "fused"
TOP_INSTANCES = 5
#: a fused model's top instances end with its spatial side's most-attended organ regions, named with this suffix
TOP_REGIONS = 2
REGION_SUFFIX = " (CT+dose region)"
#: the models' intended use is head-and-neck plans (models/README.md): a plan study gets predictions only when
#: its structures include a parotid and the brainstem or spinal cord (TG-263 names, the review's matching)
SCOPE_ORGANS = (("Parotid_L", "Parotid_R"), ("Brainstem", "SpinalCord"))


def out_of_scope(structures: Mapping[str, object]) -> str | None:
    """Why a plan study with these TG-263 structure names is outside the models' intended use; None inside."""
    missing = [" or ".join(group) for group in SCOPE_ORGANS if not any(o in structures for o in group)]
    return f"not applicable: no {' and no '.join(missing)} (head-and-neck models)" if missing else None


@functools.lru_cache(maxsize=4)
def load_model(folder: str) -> TrainedModel:
    """Loaded once per process and folder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return TrainedModel.load(Path(folder), device)


@dataclass(frozen=True)
class MlResult:
    """predictions: one per target; risk_map: (Z, Y, X) float32 on the plan's dose grid, the xerostomia branch's
    voxel attention mass (sums to 1 over the voxels the model looked at; 0 elsewhere), None for a tabular model."""

    predictions: tuple[Prediction, ...]
    risk_map: np.ndarray | None
    top_regions: tuple[tuple[str, float], ...]
    inference_s: float


def _batch(bags: PatientBags, device: torch.device) -> dict[str, torch.Tensor]:
    t, s = bags.tabular, bags.spatial
    return {
        "x": torch.as_tensor(t.instances[None], device=device),
        "name_index": torch.as_tensor(t.extra["name_index"][None], device=device),
        "tab_mask": torch.as_tensor(t.mask[None], device=device),
        "voxels": torch.as_tensor(s.instances[None], device=device),
        "features": torch.as_tensor(s.extra["features"][None], device=device),
        "region": torch.as_tensor(s.extra["region"][None], device=device),
        "spa_mask": torch.as_tensor(s.mask[None], device=device),
    }


def predict_bags(model: TrainedModel, bags: PatientBags) -> MlResult:
    t0 = time.perf_counter()
    device = next(model.module.parameters()).device
    with torch.no_grad():
        out = forward(model.module, model.config.model, _batch(bags, device))
    z = out.logits[0].cpu()
    temps = torch.as_tensor(model.temperatures)
    nv = len(VERDICT_CLASSES)
    verdict = torch.softmax(z[:nv] / temps[0], -1).numpy()
    binary = torch.sigmoid(z[nv:] / temps[1:]).numpy()
    tab_att = getattr(out, "tabular_attention", None) if model.config.model == "fused" else (
        out.attention if model.config.model.startswith("tabular") else None)
    spatial = getattr(out, "spatial", out) if model.config.model in ("spatial", "fused") else None
    version = f"{MODEL_VERSION}/{model.name}"

    def top(k: int) -> tuple[tuple[str, float], ...]:
        if tab_att is not None:
            a, names = tab_att[0, k].cpu().numpy(), bags.tabular.names
        elif spatial is not None:
            a, names = spatial.attention[0, k].cpu().numpy(), bags.spatial.names
        else:
            return ()
        order = np.argsort(-a[: len(names)])[:TOP_INSTANCES]
        out = [(names[i], round(float(a[i]), 4)) for i in order]
        if tab_att is not None and spatial is not None:  # fused: its spatial side names the organs it looked at
            ra = spatial.region_attention[0, k].cpu().numpy()
            out += [(f"{SPATIAL_ORGANS[i]}{REGION_SUFFIX}", round(float(ra[i]), 4))
                    for i in np.argsort(-ra)[:TOP_REGIONS] if ra[i] > 0]
        return tuple(out)

    predictions = [Prediction("qa_major", float(np.clip(verdict[2], 0, 1)), model.name, version, top(0))]
    for k, target in enumerate(BINARY_TARGETS):
        predictions.append(Prediction(target, float(np.clip(binary[k], 0, 1)), model.name, version,
                                      top(TASKS.index(target))))
    rmap, regions = None, ()
    if spatial is not None:
        k = TASKS.index("xerostomia_severe")
        voxel = spatial.voxel_attention[0, k].cpu().numpy().reshape((-1,) + PATCH_SHAPE)
        rmap = risk_map(bags.spatial, voxel, bags.grid_shape)
        ra = spatial.region_attention[0, k].cpu().numpy()
        regions = tuple((SPATIAL_ORGANS[i], round(float(ra[i]), 4)) for i in np.argsort(-ra) if ra[i] > 0)
    return MlResult(tuple(predictions), rmap, regions, time.perf_counter() - t0)


def predict(study, metrics: Mapping[str, StructureMetrics] | None = None, *,
            standard_names: Mapping[str, str] | None = None, model: TrainedModel | None = None) -> MlResult:
    """Bags from the plan study (DVH metrics reused when given) and the model's outputs."""
    model = model or load_model(str(models_dir() / DEFAULT_MODEL))
    bags = bags_from_plan_study(study, metrics, standard_names=standard_names)
    return predict_bags(model, bags)


def _review_metrics(review: Review) -> tuple[dict[str, StructureMetrics], dict[str, str]]:
    metrics, names = {}, {}
    for display, m in (review.metrics.get("structures") or {}).items():
        std = m.get("tg263") or display
        names[display] = std
        keys = ("volume_cc", "min_gy", "mean_gy", "max_gy", "d98_gy", "d95_gy", "d50_gy", "d2_gy")
        if std in metrics or any(m.get(k) is None for k in keys):
            continue
        metrics[std] = StructureMetrics(std, *(max(float(m[k]), 0.0) for k in keys))
    return metrics, names


def add_predictions(review: Review, files: Sequence[Path], *, model: str = DEFAULT_MODEL) -> Review:
    """The review with ``model``'s predictions (and its attention, for a spatial or fused model); unchanged, the
    reason in metrics["ml"], when the model does not apply (a not-evaluable plan study, one outside the models'
    head-and-neck scope) or cannot run (no weights, a bug): ML never blocks a review."""
    from rtqa_node.rt.plan_study import load_plan_study

    if review.verdict is Verdict.NOT_EVALUABLE:
        return dataclasses.replace(review, metrics={**review.metrics, "ml": {
            "status": "not applicable: the plan study could not be evaluated", "model": model}})
    folder = model_folder(model)
    try:
        if not (folder / MODEL_WEIGHTS_NAME).exists():
            log.warning("ml_model_missing", extra={"model": model})
            return dataclasses.replace(review, metrics={**review.metrics, "ml": {"status": "no model",
                                                                                 "model": model}})
        metrics, names = _review_metrics(review)
        if (reason := out_of_scope(metrics)) is not None:
            return dataclasses.replace(review, metrics={**review.metrics, "ml": {"status": reason, "model": model}})
        trained = load_model(str(folder))
        study = load_plan_study(files)
        t0 = time.perf_counter()
        result = predict(study, metrics or None, standard_names=names, model=trained)
        total_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - reported in the review, never raised into the worker
        log.warning("ml_prediction_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        return dataclasses.replace(review, metrics={**review.metrics, "ml": {"status": f"failed: {type(exc).__name__}",
                                                                             "model": model}})
    ml = {"status": "ok", "model": trained.name, "model_version": f"{MODEL_VERSION}/{trained.name}",
          "forward_s": round(result.inference_s, 4), "inference_s": round(total_s, 3),
          "top_regions_xerostomia": [list(r) for r in result.top_regions]}
    attention = None if result.risk_map is None else AttentionMap(
        result.risk_map, trained.name, f"{MODEL_VERSION}/{trained.name}")
    return dataclasses.replace(review, predictions=review.predictions + result.predictions,
                               metrics={**review.metrics, "ml": ml}, attention=attention)
