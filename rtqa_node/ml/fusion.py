"""Late fusion of the tabular and spatial bag embeddings, per task branch: z_k = MLP([z_tab_k ; z_spatial_k]),
then the task heads, plus the spatial encoder's dose-response offset on the toxicity logits
(``spatial.DoseResponse``) and logistic offsets on named tabular instances for local control and dysphagia
(``mil.InstanceResponse``). Both encoders keep their own attention, so the fused model explains itself with both the top organs/metrics and the risk map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rtqa_node.ml.mil import RESPONSE_INPUTS, InstanceResponse, TabularConfig, TabularEncoder, TaskHeads
from rtqa_node.ml.spatial import DoseResponse, SpatialConfig, SpatialEncoder, SpatialOutput


@dataclass(frozen=True)
class FusedOutput:
    """logits (B, LOGITS); tabular_attention (B, K, N_tab); spatial: the spatial encoder's attentions."""

    logits: torch.Tensor
    tabular_attention: torch.Tensor
    spatial: SpatialOutput


class FusedMil(nn.Module):
    def __init__(self, tabular: TabularConfig, spatial: SpatialConfig, hidden: int = 64) -> None:
        super().__init__()
        self.tabular = TabularEncoder(tabular)
        self.spatial = SpatialEncoder(spatial)
        self.fuse = nn.Sequential(nn.Linear(self.tabular.dim + self.spatial.dim, hidden), nn.ReLU())
        self.heads = TaskHeads(hidden)
        self.dose_response = DoseResponse()  # on the spatial encoder's pooled dose (spatial.DoseResponse)
        # logistic offsets on named tabular instances: local control, dysphagia (mil.InstanceResponse)
        self.instance_responses = nn.ModuleDict({task: InstanceResponse(task) for task in RESPONSE_INPUTS})

    def forward(self, x, name_index, tab_mask, voxels, features, region, spa_mask) -> FusedOutput:
        zt, at = self.tabular(x, name_index, tab_mask)  # (B, K, Dt), (B, K, Nt)
        zs, so = self.spatial(voxels, features, region, spa_mask)  # (B, K, Ds)
        z = self.fuse(torch.cat([zt, zs], dim=-1))  # (B, K, H)
        logits = (self.heads(z) + self.dose_response(so.pooled_dose, so.organ_dose)
                  + sum(r(x, name_index, tab_mask) for r in self.instance_responses.values()))
        return FusedOutput(logits, at, so)
