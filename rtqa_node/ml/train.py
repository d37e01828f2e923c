"""Training: loss, patient-level splits, seeds, early stopping, temperature scaling, checkpoints with their
configuration, and the model card.

Loss per patient: cross-entropy of the verdict logits against the reviewers' soft label (the fraction of
reviewers who gave each verdict, so disagreement becomes uncertainty rather than noise), plus binary
cross-entropy of each endpoint's logit against the observed event (never the oracle probability: a clinic has
only events). Spatial and fused models add a small penalty on the entropy of the voxel attention (a sparsity
prior, so that the risk map points at few voxels; see ``spatial.attention_entropy``). Calibration: one temperature per task fitted on the validation patients (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rtqa_node.config import MODEL_WEIGHTS_NAME
from rtqa_node.errors import ConfigError
from rtqa_node.ml import localise
from rtqa_node.ml.dataset import Cohort
from rtqa_node.ml.fusion import FusedMil
from rtqa_node.ml.mil import BINARY_TARGETS, RESPONSE_INPUTS, TASKS, VERDICT_CLASSES, TabularConfig, TabularMil
from rtqa_node.ml.spatial import TOXICITY_TARGETS, SpatialConfig, SpatialMil, attention_entropy

log = logging.getLogger(__name__)

MODEL_KINDS = ("tabular", "tabular_mean", "spatial", "fused")
WEIGHTS_NAME = MODEL_WEIGHTS_NAME
CONFIG_NAME = "config.json"
#: 2: spatial focus buffers, organ position frame, DoseResponse; 3: DoseResponse offset (bagged scan);
#: 4: TargetResponse (fused); 5: InstanceResponse offsets for local control and dysphagia (fused)
MODEL_VERSION = "5"


@dataclass(frozen=True)
class TrainConfig:
    model: str = "fused"  # MODEL_KINDS
    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 8  # epochs without a better validation loss before stopping
    seed: int = 0
    val_fraction: float = 0.2
    verdict_weight: float = 1.0
    #: weight of the voxel-attention entropy (spatial and fused models): a sparsity prior for the risk map
    attention_entropy_weight: float = 0.05
    #: epochs without the entropy prior, then as many to ramp it up linearly: applied from the start, it lets
    #: the attention collapse onto any few voxels before the outcome has shaped it (toy test: 0 % of the mass
    #: in the planted sub-region with the prior from epoch 0, 100 % with a 6-epoch warm-up)
    attention_entropy_warmup: int = 6
    #: spatial and fused models trained without a spatial init: fix the branches where a dose-response scan of
    #: the training patients finds a sub-organ dose-response on that location (``ml.localise``)
    localise: bool = True
    threads: int = 1
    tabular: TabularConfig = field(default_factory=TabularConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model must be one of {MODEL_KINDS}, got {self.model!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["tabular"] = TabularConfig(**d.get("tabular", {}))
        d["spatial"] = SpatialConfig(**d.get("spatial", {}))
        return cls(**d)


def build_model(config: TrainConfig) -> nn.Module:
    if config.model == "tabular":
        return TabularMil(config.tabular)
    if config.model == "tabular_mean":
        return TabularMil(TabularConfig(**{**config.tabular.to_dict(), "pooling": "mean"}))
    if config.model == "spatial":
        return SpatialMil(config.spatial)
    return FusedMil(config.tabular, config.spatial)


def batch_tensors(cohort: Cohort, index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    t = lambda a, dtype=None: torch.as_tensor(np.ascontiguousarray(a[index]), dtype=dtype, device=device)
    return {
        "x": t(cohort.tab_x), "name_index": t(cohort.tab_name_index), "tab_mask": t(cohort.tab_mask),
        "voxels": t(cohort.spa_voxels, torch.float32), "features": t(cohort.spa_features),
        "region": t(cohort.spa_region), "spa_mask": t(cohort.spa_mask),
    }


def forward(model: nn.Module, kind: str, b: dict[str, torch.Tensor]):
    """The model's output for a batch (MilOutput, SpatialOutput or FusedOutput; all have ``logits``)."""
    if kind in ("tabular", "tabular_mean"):
        return model(b["x"], b["name_index"], b["tab_mask"])
    if kind == "spatial":
        return model(b["voxels"], b["features"], b["region"], b["spa_mask"])
    return model(b["x"], b["name_index"], b["tab_mask"], b["voxels"], b["features"], b["region"], b["spa_mask"])


def loss_fn(logits: torch.Tensor, verdict_soft: torch.Tensor, events: torch.Tensor, verdict_weight: float) -> torch.Tensor:
    """logits (B, 6), verdict_soft (B, 3), events (B, 3) with NaN for unknown -> scalar."""
    nv = len(VERDICT_CLASSES)
    ce = -(verdict_soft * F.log_softmax(logits[:, :nv], dim=-1)).sum(-1).mean()
    known = ~torch.isnan(events)
    bce = F.binary_cross_entropy_with_logits(logits[:, nv:][known], events[known]) if known.any() else logits.sum() * 0
    return verdict_weight * ce + bce * len(BINARY_TARGETS)


def entropy_weight(config: TrainConfig, epoch: int) -> float:
    """The voxel-attention entropy weight at ``epoch`` (0-based): 0 during the warm-up, then a linear ramp."""
    warm = config.attention_entropy_warmup
    if warm <= 0:
        return config.attention_entropy_weight
    return config.attention_entropy_weight * float(np.clip((epoch - warm) / warm, 0.0, 1.0))


def split(n: int, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level split (a patient's bags never on both sides): (train, validation) indices."""
    perm = np.random.default_rng([seed, 9]).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _fit_temperature(nll) -> float:
    """argmin over T > 0 of nll(T) by L-BFGS on log T, clipped to [0.05, 20]."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = nll(log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def fit_temperatures(logits: torch.Tensor, verdict_soft: torch.Tensor, events: torch.Tensor) -> list[float]:
    """One temperature per task (verdict, then each binary target) minimising validation NLL."""
    nv = len(VERDICT_CLASSES)
    z = logits[:, :nv]
    out = [_fit_temperature(lambda t: -(verdict_soft * F.log_softmax(z / t, -1)).sum(-1).mean())]
    for k in range(len(BINARY_TARGETS)):
        known = ~torch.isnan(events[:, k])
        zk, yk = logits[known, nv + k], events[known, k]
        if len(yk) == 0 or yk.min() == yk.max():
            out.append(1.0)  # one class only: nothing to calibrate against
            continue
        out.append(_fit_temperature(lambda t, zk=zk, yk=yk: F.binary_cross_entropy_with_logits(zk / t, yk)))
    return out


@dataclass
class TrainedModel:
    """A trained network with its configuration, temperatures and training record."""

    name: str
    config: TrainConfig
    module: nn.Module
    temperatures: list[float]
    record: dict

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        torch.save({"name": self.name, "config": self.config.to_dict(), "temperatures": self.temperatures,
                    "record": self.record, "state_dict": state, "model_version": MODEL_VERSION},
                   folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps({"name": self.name, "config": self.config.to_dict(),
                                                       "temperatures": self.temperatures, "record": self.record,
                                                       "model_version": MODEL_VERSION}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, device: torch.device | None = None) -> TrainedModel:
        blob = torch.load(Path(folder) / WEIGHTS_NAME, map_location=device or "cpu", weights_only=True)
        config = TrainConfig.from_dict(blob["config"])
        module = build_model(config)
        try:
            module.load_state_dict(blob["state_dict"])
        except RuntimeError as exc:  # weights of another model version (a tabular model's did not change)
            raise ConfigError(f"{folder}: weights of model version {blob.get('model_version')} do not fit this "
                              f"code's (version {MODEL_VERSION}): retrain them (models/README.md); {exc}") from exc
        module.eval()
        return cls(blob["name"], config, module.to(device or "cpu"), list(blob["temperatures"]), blob["record"])


def start_instance_responses(model: nn.Module, cohort: Cohort, train_idx: np.ndarray) -> dict:
    """Start each of a fused model's named-instance offsets (``mil.InstanceResponse``: local control, dysphagia)
    at a logistic fit on the training patients, and zero that task's last head layer: training starts from that
    model. Returns per task {fitted, logistic (intercept, slopes in feature units), fill}."""
    x, names, mask = (torch.as_tensor(a[train_idx]) for a in (cohort.tab_x, cohort.tab_name_index, cohort.tab_mask))
    x = x.float()
    record = {}
    for task, response in model.instance_responses.items():
        with torch.no_grad():
            value, present = response.values(x, names, mask)
        fill = [float(value[present[:, k], k].mean()) if present[:, k].any() else 0.0 for k in range(value.shape[1])]
        response.initialise(intercept=0.0, slopes=[0.0] * value.shape[1], fill=fill)
        y = cohort.events[train_idx, BINARY_TARGETS.index(task)]
        known = ~np.isnan(y)
        if known.sum() < 20 or len(np.unique(y[known])) < 2:
            record[task] = {"fitted": False}
            continue
        with torch.no_grad():
            f = response.features(x, names, mask)[torch.as_tensor(known)]
        w, _ = localise.logistic_fit(f[:, None].double(), torch.as_tensor(y[known]))
        response.initialise(intercept=float(w[0, 0]), slopes=[float(v) for v in w[0, 1:]], fill=fill)
        localise.zero_head(model, task)
        record[task] = {"fitted": True, "logistic": [round(float(v), 4) for v in w[0]],
                        "fill": [round(v, 4) for v in fill]}
    return record


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{text}   ")
        sys.stderr.flush()


def train(cohort: Cohort, config: TrainConfig, *, name: str | None = None,
          device: torch.device | None = None, init: dict[str, TrainedModel] | None = None) -> TrainedModel:
    """Train on a patient-level split of ``cohort``; early stopping on validation loss; temperatures on the
    validation patients. Deterministic for a seed on one thread (CPU).

    init: for the fused model, trained ``"tabular"`` and/or ``"spatial"`` models (same split seed) whose
    encoders start the fused model's. Trained jointly from scratch, the tabular encoder fits within a few
    epochs while the spatial attention is still looking for its region, and early stopping ends training
    before the spatial branch has learned anything; starting from both unimodal encoders avoids that.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        train_idx, val_idx = split(len(cohort), val_fraction=config.val_fraction, seed=config.seed)
        model = build_model(config)
        initialised = []
        for kind, trained in (init or {}).items() if config.model == "fused" else ():
            if trained.config.seed != config.seed:
                raise ValueError(f"init model {kind} used split seed {trained.config.seed}, not {config.seed}")
            getattr(model, kind).load_state_dict(trained.module.encoder.state_dict())
            if kind == "spatial":  # its focus came with the encoder's buffers; its dose-response offset too
                model.dose_response.load_state_dict(trained.module.dose_response.state_dict())
                for task in TOXICITY_TARGETS:  # the fused heads start as a zero residual on that offset
                    if model.spatial.focus_sigma[TASKS.index(task)] > 0:
                        localise.zero_head(model, task)
            initialised.append(kind)
        localisation = None
        if (config.localise and config.model in ("spatial", "fused") and "spatial" not in initialised
                and config.spatial.can_focus):
            findings = localise.scan(cohort, train_idx, val_idx)
            localise.focus(model.spatial if config.model == "fused" else model.encoder, findings)
            localise.start_dose_response(model, findings)
            localisation = [f.to_dict() for f in findings]
        instance_responses = start_instance_responses(model, cohort, train_idx) if config.model == "fused" else None
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        soft = torch.as_tensor(cohort.verdict_soft, device=device)
        events = torch.as_tensor(cohort.events, device=device)
        rng = np.random.default_rng([config.seed, 11])
        best, best_state, best_epoch, history = float("inf"), None, -1, []
        t0 = time.monotonic()
        val_batches = [val_idx[i:i + 64] for i in range(0, len(val_idx), 64)]
        for epoch in range(config.epochs):
            model.train()
            order = rng.permutation(train_idx)
            total = 0.0
            entropy_w = entropy_weight(config, epoch)
            for i in range(0, len(order), config.batch_size):
                idx = order[i:i + config.batch_size]
                out = forward(model, config.model, batch_tensors(cohort, idx, device))
                loss = loss_fn(out.logits, soft[idx], events[idx], config.verdict_weight)
                spatial = getattr(out, "spatial", out) if config.model in ("spatial", "fused") else None
                if spatial is not None and entropy_w > 0:
                    loss = loss + entropy_w * attention_entropy(spatial.voxel_attention)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            model.eval()
            with torch.no_grad():
                logits = torch.cat([forward(model, config.model, batch_tensors(cohort, b, device)).logits
                                    for b in val_batches])
                val_loss = float(loss_fn(logits, soft[val_idx], events[val_idx], config.verdict_weight))
            history.append({"epoch": epoch, "train_loss": round(total / len(train_idx), 4),
                            "val_loss": round(val_loss, 4)})
            _progress(f"{name or config.model}: epoch {epoch + 1}/{config.epochs} train {total / len(train_idx):.3f} "
                      f"val {val_loss:.3f}")
            if val_loss < best - 1e-4:
                best, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= config.patience:
                break
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([forward(model, config.model, batch_tensors(cohort, b, device)).logits
                                for b in val_batches]).cpu()
        temperatures = fit_temperatures(logits, soft[val_idx].cpu(), events[val_idx].cpu())
        elapsed = time.monotonic() - t0
        record = {"train_patients": len(train_idx), "val_patients": len(val_idx),
                  "best_epoch": best_epoch, "best_val_loss": round(best, 4), "epochs_run": len(history),
                  "train_time_s": round(elapsed, 1), "device": str(device), "threads": config.threads,
                  "initialised_from": initialised, "localisation": localisation,
                  "instance_responses": instance_responses, "history": history}
        log.info("ml_trained", extra={"model": name or config.model, "best_epoch": best_epoch,
                                      "val_loss": round(best, 4), "elapsed_s": round(elapsed, 1)})
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        return TrainedModel(name or config.model, config, model.cpu(), temperatures, record)
    finally:
        torch.set_num_threads(previous_threads)


_CARD_PURPOSE = {
    "tabular": "gated-attention MIL on per-structure DVH instances (Ilse et al. 2018), one attention branch per task",
    "tabular_mean": "baseline: the tabular MIL with mean pooling instead of attention",
    "spatial": "hierarchical voxel -> patch -> region -> patient attention MIL on 3-D dose/CT patches",
    "fused": "tabular and spatial MIL encoders fused per task (the default model of the worker)",
}


def write_model_card(model: TrainedModel, folder: Path, evaluation: dict | None = None) -> None:
    """MODEL_CARD.md next to the weights: data, training, metrics (when an evaluation row is given), use, limits."""
    r, c = model.record, model.config
    data = r.get("data", {})
    lines = [
        f"# Model card: {model.name} (rtqa-node ml, version {MODEL_VERSION})", "",
        f"What: {_CARD_PURPOSE.get(c.model, c.model)}. Outputs: QA verdict (per_protocol / minor / major, trained "
        "on the reviewers' soft labels), severe xerostomia, severe dysphagia, local control; probabilities "
        "temperature-scaled on the validation patients; attention over instances (and, for spatial models, a "
        "per-voxel risk map).", "",
        "## Data",
        f"- Synthetic head-and-neck cohort from `rtqa_node.synth` (`simulate_patient`), seed {data.get('seed')}, "
        f"{data.get('patients')} patients, {data.get('sites')} sites, generator source digest "
        f"{data.get('synth_digest', 'not recorded')} (`ml.dataset._SOURCE_DIGEST`); patient-level split: "
        f"{r.get('train_patients')} train / {r.get('val_patients')} validation (split seed {c.seed}).",
        "- Labels: three simulated reviewers' verdicts per plan; outcomes drawn from the generator's dose-response "
        "models (see docs/architecture.md, Synthetic cohort). No patient data.", "",
        "## Training",
        f"- {r.get('epochs_run')} epochs run, best epoch {r.get('best_epoch')} (validation loss {r.get('best_val_loss')}); "
        f"AdamW lr {c.learning_rate}, weight decay {c.weight_decay}, batch {c.batch_size}, early stopping patience "
        f"{c.patience}; {r.get('train_time_s')} s on {r.get('device')} ({r.get('threads')} thread(s)).",
        f"- Temperatures (verdict, xerostomia, dysphagia, local control): {[round(t, 3) for t in model.temperatures]}.",
        "- Hyperparameters: `config.json` (also inside `model.pt`).",
    ]
    if r.get("localisation"):
        found = "; ".join(f"{f['task']}: {'/'.join(f['organs'])} at {f['centre']} (sigma {f['sigma']}, validation "
                          f"gain {f['validation_gain_nats']} nats)" for f in r["localisation"])
        lines.append(f"- Spatial attention focused by a dose-response scan of the training patients (`ml.localise`; "
                     f"centre in the organ frame, units of the organ's spread per axis): {found}.")
    elif "spatial" in r.get("initialised_from", []):
        lines.append("- Spatial encoder started from the trained spatial model (its card says where its attention is focused).")
    for task, fit in (r.get("instance_responses") or {}).items():
        if fit.get("fitted"):
            b, *slopes = fit["logistic"]
            inputs = ", ".join(f"{s} {c} {w}" for (s, c, _), w in zip(RESPONSE_INPUTS[task], slopes))
            lines.append(f"- {task} offset (`mil.InstanceResponse`) started at a logistic fit on the training "
                         f"patients: intercept {b}, {inputs} (per the bag's units: doses per 70 Gy, "
                         "log volumes per ln(1 + cc) / 5).")
    lines.append("")
    if evaluation:
        lines += ["## Metrics (held-out synthetic cohort, different seed)", ""]
        for e, m in evaluation.get("endpoints", {}).items():
            lines.append(f"- {e}: AUC {m['auc']:.3f} (95% CI {m['auc_ci95'][0]:.3f}-{m['auc_ci95'][1]:.3f}), "
                         f"ECE {m['ece']:.3f}, n {m['n']}, events {m['events']}")
        if "verdict" in evaluation:
            lines.append(f"- QA verdict: Cohen's kappa vs consensus {evaluation['verdict']['kappa_consensus']:.3f}")
        if evaluation.get("attention_in_subregion") == evaluation.get("attention_in_subregion"):
            lines.append(f"- Xerostomia risk-map attention mass inside the planted sub-region: "
                         f"{evaluation['attention_in_subregion']:.1%}")
        lines.append("")
    lines += [
        "## Intended use",
        "Research and software testing of the rtqa-node pipeline. Not for clinical decisions: it has never seen a "
        "real patient.", "",
        "## Known limits",
        "- Trained only on a synthetic phantom cohort (one protocol, HN-SYNTH-SIB-70-56, photon IMRT); structure "
        "names must be TG-263 as in that cohort, others fall into one 'unknown' embedding.",
        "- Outcome labels come from the generator's own models; performance on real outcomes is unknown.",
        "- Attention is a description of what the model weighted, not a causal explanation.",
        "- Acceptance (issue 9): models/evaluation/report.md lists the criteria and which of them this version "
        "meets.", "",
    ]
    (Path(folder) / "MODEL_CARD.md").write_text("\n".join(lines))
