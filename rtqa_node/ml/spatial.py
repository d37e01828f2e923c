"""Hierarchical spatial MIL: voxel -> patch -> region -> patient attention on 3-D patches of dose and CT.

A small 3-D CNN turns each patch (channels: dose, CT, organ occupancy, organ-relative position) into per-voxel
features (the values); per task branch k, a voxel attention (softmax over the patch's organ voxels) pools them
into a patch embedding; attention pools patches within each region (the organ a patch touches most) and then
gated attention (Ilse et al. 2018) pools regions into the patient embedding. The product of the three attentions
is a distribution over voxels that sums to 1: the risk map (which voxels drove the prediction), scattered back on
the dose grid with ``bags.risk_map``.

Where the voxel and patch attention come from (``SpatialConfig.voxel_attention``):
- ``"position"`` (default): the voxel score is a function of anatomy alone, the voxel's organ-relative position
  and its region's organ (a per-voxel MLP); a patch's score is the log-sum-exp of its organ voxels' scores, so
  patch x voxel attention is exactly one softmax over all the organ voxels of a region, written hierarchically.
  Attention then answers "which part of which organ matters" and the values carry the dose there: a sub-organ
  dose-response (the parotid stem-cell hypothesis) becomes a weighted mean dose the heads can read. On the
  synthetic cohort this learned the planted sub-region where content-driven attention did not (models/README.md).
- ``"content"``: voxel scores from the CNN features (dose included) and a gated patch score on the patch
  embedding: attention may follow the dose itself (hot spots), at the cost of needing far more patients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rtqa_node.ml.bags import PATCH_FEATURES, SPATIAL_CHANNELS, SPATIAL_ORGANS
from rtqa_node.ml.mil import TASKS, GatedScore, TaskHeads, masked_softmax

ORGAN_CHANNEL = SPATIAL_CHANNELS.index("organ")
POSITION_CHANNELS = tuple(SPATIAL_CHANNELS.index(c) for c in ("z", "y", "lateral"))


@dataclass(frozen=True)
class SpatialConfig:
    channels: int = len(SPATIAL_CHANNELS)
    patch_features: int = len(PATCH_FEATURES)
    regions: int = len(SPATIAL_ORGANS)
    conv: int = 12
    hidden: int = 48
    attention_hidden: int = 24
    dropout: float = 0.1
    voxel_attention: str = "position"  # "position" | "content" (module docstring)
    where_hidden: int = 32

    def __post_init__(self) -> None:
        if self.voxel_attention not in ("position", "content"):
            raise ValueError(f"voxel_attention must be 'position' or 'content', got {self.voxel_attention!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SpatialOutput:
    """logits (B, LOGITS); attention (B, K, N) patch mass per task branch (sums to 1 over real patches);
    region_attention (B, K, R); voxel_attention (B, K, N, V) voxel mass (sums to 1 over all voxels of a bag)."""

    logits: torch.Tensor
    attention: torch.Tensor
    region_attention: torch.Tensor
    voxel_attention: torch.Tensor


class _Score(GatedScore):
    """Gated attention score for embeddings (..., D) -> (...)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h).squeeze(-1)


class SpatialEncoder(nn.Module):
    def __init__(self, config: SpatialConfig) -> None:
        super().__init__()
        self.config = config
        c = config.conv
        self.cnn = nn.Sequential(
            nn.Conv3d(config.channels, c, 3, padding=1), nn.ReLU(),
            nn.Conv3d(c, c, 1), nn.ReLU(),  # a second 3x3x3 layer tripled CPU time for no gain here
        )
        k = len(TASKS)
        if config.voxel_attention == "position":
            # where to look from anatomy alone: organ-relative position (3 channels) + the region's organ (one-hot)
            w = config.where_hidden
            self.where = nn.Sequential(nn.Conv3d(len(POSITION_CHANNELS) + config.regions, w, 1), nn.SiLU(),
                                       nn.Conv3d(w, w, 1), nn.SiLU(), nn.Conv3d(w, k, 1))
        else:
            self.voxel_score = nn.Conv3d(c, k, 1)
        self.embed = nn.Sequential(nn.Linear(c + config.patch_features, config.hidden), nn.ReLU(),
                                   nn.Dropout(config.dropout), nn.Linear(config.hidden, config.hidden), nn.ReLU())
        self.patch_score = _Score(config.hidden, config.attention_hidden)
        self.region_score = _Score(config.hidden, config.attention_hidden)
        self.region_bias = nn.Parameter(torch.zeros(k, config.regions))  # a learned prior per branch and organ
        self.region_embedding = nn.Embedding(config.regions, config.hidden)
        self.dim = config.hidden

    def forward(self, voxels: torch.Tensor, features: torch.Tensor, region: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, SpatialOutput]:
        """voxels (B, N, C, Z, Y, X), features (B, N, P), region (B, N) int, mask (B, N) bool
        -> z (B, K, D) and the attentions (logits left empty)."""
        B, N = mask.shape
        K, R = len(TASKS), self.config.regions
        flat = voxels.flatten(0, 1)  # (B*N, C, Z, Y, X)
        f = self.cnn(flat)  # (B*N, c, Z, Y, X)
        organ = (voxels[:, :, ORGAN_CHANNEL].flatten(0, 1).flatten(1) > 0)  # (B*N, V): voxels of the patch's organ
        organ = organ | ~organ.any(-1, keepdim=True)  # a patch without organ voxels pools all its voxels
        if self.config.voxel_attention == "position":
            onehot = nn.functional.one_hot(region.flatten(), R).to(flat.dtype)  # (B*N, R)
            where = torch.cat([flat[:, list(POSITION_CHANNELS)],
                               onehot[:, :, None, None, None].expand(-1, -1, *flat.shape[2:])], dim=1)
            s = self.where(where).flatten(2)  # (B*N, K, V)
        else:
            s = self.voxel_score(f).flatten(2)  # (B*N, K, V)
        alpha = masked_softmax(s, organ[:, None, :])  # (B*N, K, V)
        e = torch.einsum("pkv,pcv->pkc", alpha, f.flatten(2))  # (B*N, K, c)
        e = e.view(B, N, K, -1).transpose(1, 2)  # (B, K, N, c)
        h = self.embed(torch.cat([e, features[:, None].expand(-1, K, -1, -1)], dim=-1))  # (B, K, N, D)
        in_region = (region[:, None, :] == torch.arange(R, device=region.device)[None, :, None]) & mask[:, None, :]
        # patch attention within each region: (B, K, R, N)
        if self.config.voxel_attention == "position":
            # log-sum-exp of the voxel scores: patch x voxel attention = one softmax over the region's organ voxels
            p_score = s.masked_fill(~organ[:, None, :], float("-inf")).logsumexp(-1)  # (B*N, K)
            p_score = p_score.view(B, N, K).transpose(1, 2)  # (B, K, N)
        else:
            p_score = self.patch_score(h)  # (B, K, N)
        a_patch = masked_softmax(p_score[:, :, None, :].expand(-1, -1, R, -1), in_region[:, None])  # (B, K, R, N)
        g = torch.einsum("bkrn,bknd->bkrd", a_patch, h) + self.region_embedding.weight[None, None]  # (B, K, R, D)
        present = in_region.any(-1)  # (B, R)
        a_region = masked_softmax(self.region_score(g) + self.region_bias[None], present[:, None, :])  # (B, K, R)
        z = torch.einsum("bkr,bkrd->bkd", a_region, g)  # (B, K, D)
        patch_mass = torch.einsum("bkr,bkrn->bkn", a_region, a_patch)  # (B, K, N)
        voxel_mass = patch_mass[..., None] * alpha.view(B, N, K, -1).transpose(1, 2)  # (B, K, N, V)
        return z, SpatialOutput(torch.empty(0), patch_mass, a_region, voxel_mass)


class SpatialMil(nn.Module):
    def __init__(self, config: SpatialConfig) -> None:
        super().__init__()
        self.encoder = SpatialEncoder(config)
        self.heads = TaskHeads(self.encoder.dim)

    def forward(self, voxels, features, region, mask) -> SpatialOutput:
        z, out = self.encoder(voxels, features, region, mask)
        return SpatialOutput(self.heads(z), out.attention, out.region_attention, out.voxel_attention)


def attention_entropy(voxel_attention: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-branch voxel distributions (B, K, N, V) -> scalar. Used as a sparsity
    prior: MIL attention need not concentrate when pooled features already carry the signal, and a risk map
    is only useful when it does."""
    p = voxel_attention.flatten(2)  # (B, K, N*V)
    return -(p * torch.log(p.clamp(min=1e-12))).sum(-1).mean()
