"""Attention-based deep multiple-instance learning on tabular instances (Ilse, Tomczak, Welling, "Attention-based
Deep Multiple Instance Learning", ICML 2018): each instance is embedded (h_k), the bag embedding is
z = sum_k a_k h_k with gated attention a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))) (eq. 9), and the
softmax runs over real instances only, so padding gets exactly zero weight and the output does not depend on
the order of the instances. ``pooling="mean"`` is the mean-pooling baseline (same encoder, uniform weights).

Several targets look at different instances (the verdict at PTV_70, SpinalCord and the plan; xerostomia at the
parotids), so the encoder has one attention branch per task (as CLAM's multi-branch attention): the bag
embedding is (B, K, D) with K = len(TASKS), and :class:`TaskHeads` reads branch k for task k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from rtqa_node.ml.bags import STRUCTURE_VOCAB, TABULAR_FEATURES

#: prediction targets, in head order after the 3-class verdict
BINARY_TARGETS = ("xerostomia_severe", "dysphagia_severe", "local_control")
VERDICT_CLASSES = ("per_protocol", "minor", "major")
#: attention branches, one per task: the verdict (3 logits) and each binary target (1 logit)
TASKS = ("qa_verdict",) + BINARY_TARGETS
LOGITS = len(VERDICT_CLASSES) + len(BINARY_TARGETS)


@dataclass(frozen=True)
class MilOutput:
    """logits: (B, LOGITS) bag-level logits (3 verdict classes, then one per BINARY_TARGETS);
    attention: (B, K, N) instance weights per task branch, each summing to 1 over the real instances."""

    logits: torch.Tensor
    attention: torch.Tensor


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` is True; exactly 0 elsewhere (and all 0 when nothing is True)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(out, nan=0.0) * mask


class GatedScore(nn.Module):
    """The gated attention score of Ilse et al. 2018, eq. 9: w^T (tanh(V h) ⊙ sigm(U h)), h (..., D) -> (..., out)."""

    def __init__(self, dim: int, hidden: int, out: int = 1) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))


class GatedAttention(GatedScore):
    """Ilse et al. 2018, eq. 9: a_k = softmax(w^T (tanh(V h_k) ⊙ sigm(U h_k))), one score per task branch."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(dim, hidden, len(TASKS))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: (B, N, D), mask: (B, N) -> attention (B, K, N), one softmax per task branch."""
        scores = super().forward(h).transpose(1, 2)  # (B, K, N)
        return masked_softmax(scores, mask[:, None, :])


@dataclass(frozen=True)
class TabularConfig:
    features: int = len(TABULAR_FEATURES)
    vocab: int = len(STRUCTURE_VOCAB)
    name_dim: int = 8
    hidden: int = 64
    attention_hidden: int = 32
    dropout: float = 0.1
    pooling: str = "attention"  # "attention" | "mean"

    def __post_init__(self) -> None:
        if self.pooling not in ("attention", "mean"):
            raise ValueError(f"pooling must be 'attention' or 'mean', got {self.pooling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class TabularEncoder(nn.Module):
    """Instance embedding (features + structure-name embedding) and attention pooling to a bag embedding."""

    def __init__(self, config: TabularConfig) -> None:
        super().__init__()
        self.config = config
        self.name_embedding = nn.Embedding(config.vocab, config.name_dim)
        self.embed = nn.Sequential(
            nn.Linear(config.features + config.name_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden), nn.ReLU(),
        )
        self.attention = GatedAttention(config.hidden, config.attention_hidden)
        self.dim = config.hidden

    def forward(self, x: torch.Tensor, name_index: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, F), name_index: (B, N), mask: (B, N) -> z (B, K, D), attention (B, K, N)."""
        h = self.embed(torch.cat([x, self.name_embedding(name_index)], dim=-1))  # (B, N, D)
        if self.config.pooling == "mean":
            m = mask.float()[:, None, :].expand(-1, len(TASKS), -1)  # (B, K, N)
            a = m / m.sum(-1, keepdim=True).clamp(min=1.0)
        else:
            a = self.attention(h, mask)  # (B, K, N)
        z = torch.einsum("bkn,bnd->bkd", a, h)  # (B, K, D)
        return z, a


class TaskHeads(nn.Module):
    """Branch k's embedding -> task k's logits: 3 for the verdict, 1 per binary target -> (B, LOGITS)."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        sizes = (len(VERDICT_CLASSES),) + (1,) * len(BINARY_TARGETS)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n))
                                   for n in sizes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, K, D) -> (B, LOGITS)
        return torch.cat([head(z[:, k]) for k, head in enumerate(self.heads)], dim=-1)


def inverse_softplus(w: float, floor: float = 1e-3) -> float:
    """The raw parameter whose softplus is ``w`` (at least ``floor``: softplus never reaches 0): how the offsets
    (``InstanceResponse``, ``spatial.DoseResponse``) start a non-negative slope at a fitted value."""
    return float(np.log(np.expm1(max(w, floor))))


#: logistic offsets on named tabular instances (``InstanceResponse``), per task: (structure, TABULAR_FEATURES
#: column, sign of its slope). Local control rises with the dose covering the target and falls with the tumour's
#: volume (a TCP with a volume-dependent TCD50); severe dysphagia rises with the mean doses of the superior
#: constrictor and the supraglottic larynx (the published NTCP's two organs, ``baselines.published_models``).
RESPONSE_INPUTS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "dysphagia_severe": (("Musc_Constrict_S", "mean", 1.0), ("Larynx_SG", "mean", 1.0)),
    "local_control": (("CTV_70", "d98", 1.0), ("GTV_70", "log_volume_cc", -1.0)),
}


class InstanceResponse(nn.Module):
    """A logistic offset added to one task's logit, read from named tabular instances:
    b + sum_i sign_i x softplus(u_i) x feature_i (``RESPONSE_INPUTS[task]``). Why: every MIL variant ranked local
    control below chance on the external sites (AUC 0.44-0.52, model version 2) where a logistic on CTV_70 D98
    and GTV_70 log volume, fitted on the same training patients, reached 0.634 (published TCP 0.631); the fused
    model's dysphagia trailed a logistic on the constrictor and supraglottic means by 0.03-0.05 on three cohorts
    (version 4): the attention heads fitted site-specific patterns instead. A structure missing from a bag gets
    ``fill`` (the training mean). :meth:`initialise` starts it at a logistic fit on the training patients
    (``train.start_instance_responses``)."""

    def __init__(self, task: str) -> None:
        super().__init__()
        inputs = RESPONSE_INPUTS[task]
        self.task = task
        self.slot = len(VERDICT_CLASSES) + BINARY_TARGETS.index(task)
        self.index = [STRUCTURE_VOCAB.index(s) for s, _, _ in inputs]
        self.column = [TABULAR_FEATURES.index(c) for _, c, _ in inputs]
        self.register_buffer("sign", torch.tensor([s for _, _, s in inputs]))
        self.register_buffer("fill", torch.zeros(len(inputs)))
        self.raw_slope = nn.Parameter(torch.zeros(len(inputs)))
        self.bias = nn.Parameter(torch.zeros(()))

    def values(self, x: torch.Tensor, name_index: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, F), name_index (B, N), mask (B, N) -> the inputs (B, I) and whether each was present (B, I)."""
        sel = torch.stack([(name_index == i) & mask for i in self.index], -1).to(x.dtype)  # (B, N, I)
        total = torch.einsum("bni,bni->bi", sel, x[..., self.column])
        count = sel.sum(1)
        return total / count.clamp(min=1.0), count > 0

    def features(self, x, name_index, mask) -> torch.Tensor:
        value, present = self.values(x, name_index, mask)
        return torch.where(present, value, self.fill[None])

    def initialise(self, *, intercept: float, slopes: list[float], fill: list[float]) -> None:
        """Start at a fitted logistic on ``features`` (slopes in feature units; a slope of the wrong sign starts
        at 1e-3: softplus cannot reach 0)."""
        with torch.no_grad():
            self.bias.fill_(intercept)
            for k, (w, s) in enumerate(zip(slopes, self.sign.tolist())):
                self.raw_slope[k] = inverse_softplus(w * s)
            self.fill.copy_(torch.as_tensor(fill, dtype=self.fill.dtype))

    def forward(self, x, name_index, mask) -> torch.Tensor:
        """-> (B, LOGITS) to add to the heads' logits."""
        f = self.features(x, name_index, mask)
        out = f.new_zeros(f.shape[0], LOGITS)
        out[:, self.slot] = self.bias + (f * self.sign * nn.functional.softplus(self.raw_slope)).sum(-1)
        return out


class TabularMil(nn.Module):
    """Tabular MIL: encoder + task heads."""

    def __init__(self, config: TabularConfig) -> None:
        super().__init__()
        self.encoder = TabularEncoder(config)
        self.heads = TaskHeads(self.encoder.dim)

    def forward(self, x: torch.Tensor, name_index: torch.Tensor, mask: torch.Tensor) -> MilOutput:
        z, a = self.encoder(x, name_index, mask)  # (B, K, D), (B, K, N)
        return MilOutput(self.heads(z), a)
