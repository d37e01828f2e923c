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


class TabularMil(nn.Module):
    """Tabular MIL: encoder + task heads."""

    def __init__(self, config: TabularConfig) -> None:
        super().__init__()
        self.encoder = TabularEncoder(config)
        self.heads = TaskHeads(self.encoder.dim)

    def forward(self, x: torch.Tensor, name_index: torch.Tensor, mask: torch.Tensor) -> MilOutput:
        z, a = self.encoder(x, name_index, mask)  # (B, K, D), (B, K, N)
        return MilOutput(self.heads(z), a)
