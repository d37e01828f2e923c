"""Hierarchical spatial MIL: attention sums to 1 at every level and is 0 on padding; in a toy cohort whose
label depends only on the dose inside a small planted sub-region, the model learns it and its voxel attention
(the risk map) concentrates there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtqa_node.ml.bags import PATCH_FEATURES, PATCH_SHAPE, SPATIAL_CHANNELS
from rtqa_node.ml.evaluate import auc
from rtqa_node.ml.mil import LOGITS, TASKS
from rtqa_node.ml.spatial import DoseResponse, SpatialConfig, SpatialMil, attention_entropy
from rtqa_node.ml.train import TrainConfig, entropy_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")


Z, Y, X = PATCH_SHAPE
BRANCH = TASKS.index("xerostomia_severe")
LOGIT = 3 + BRANCH - 1


def _toy(n: int, seed: int, patches: int = 8):
    """Each patient: `patches` patches tiling a 2 x 2 x 2 block of one organ (region 0) plus padding. Voxel
    positions (organ-relative) are channels 3-5; the planted sub-region is the 2 x 4 x 4 voxel corner of the
    patch at block (0, 0, 0). Dose is random per patch and per voxel; the label is 1 when the planted
    sub-region's mean dose exceeds the median."""
    rng = np.random.default_rng(seed)
    n_pad = 2
    v = np.zeros((n, patches + n_pad, len(SPATIAL_CHANNELS), Z, Y, X), dtype=np.float32)
    feats = np.zeros((n, patches + n_pad, len(PATCH_FEATURES)), dtype=np.float32)
    region = np.zeros((n, patches + n_pad), dtype=np.int64)
    mask = np.zeros((n, patches + n_pad), dtype=bool)
    planted = np.zeros((n, patches + n_pad, Z, Y, X), dtype=bool)
    blocks = [(a, b, c) for a in range(2) for b in range(2) for c in range(2)]
    for i in range(n):
        for j, (a, b, c) in enumerate(blocks):
            base = rng.uniform(0.1, 0.9)
            v[i, j, 0] = base + 0.15 * rng.normal(size=(Z, Y, X))
            v[i, j, 1] = 0.04 + 0.01 * rng.normal(size=(Z, Y, X))
            v[i, j, 2] = 1.0
            zz, yy, xx = np.meshgrid(np.arange(Z) + a * Z, np.arange(Y) + b * Y, np.arange(X) + c * X, indexing="ij")
            v[i, j, 3], v[i, j, 4], v[i, j, 5] = (zz - Z) / 4.0, (yy - Y) / 8.0, (xx - X) / 8.0
            feats[i, j, 0] = 1.0
            feats[i, j, -3:] = ((a - 0.5), (b - 0.5), (c - 0.5))
            mask[i, j] = True
        planted[i, 0, :2, :4, :4] = True
    perm = [rng.permutation(patches + n_pad) for _ in range(n)]  # order must not matter
    v = np.stack([v[i, p] for i, p in enumerate(perm)])
    feats = np.stack([feats[i, p] for i, p in enumerate(perm)])
    mask = np.stack([mask[i, p] for i, p in enumerate(perm)])
    planted = np.stack([planted[i, p] for i, p in enumerate(perm)])
    sub_dose = np.array([v[i, :, 0][planted[i]].mean() for i in range(n)])
    y = (sub_dose > np.median(sub_dose)).astype(np.float32)
    t = torch.as_tensor
    return t(v), t(feats), t(region), t(mask), t(y), t(planted)


def test_attention_sums_to_one_and_is_zero_on_padding():
    torch.manual_seed(0)
    v, f, r, m, _, _ = _toy(3, seed=0)
    r = torch.randint(0, 3, r.shape)
    out = SpatialMil(SpatialConfig()).eval()(v, f, r, m)
    k = len(TASKS)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, k))
    torch.testing.assert_close(out.voxel_attention.sum((-1, -2)), torch.ones(3, k))
    torch.testing.assert_close(out.region_attention.sum(-1), torch.ones(3, k))
    assert torch.all(out.attention.masked_select(~m[:, None, :].expand(-1, k, -1)) == 0)
    absent = ~torch.stack([(r == q).logical_and(m).any(-1) for q in range(out.region_attention.shape[-1])], -1)
    assert torch.all(out.region_attention.masked_select(absent[:, None, :].expand(-1, k, -1)) == 0)


def _train_on_toy(entropy_weight_at) -> tuple[float, float]:
    """Train a spatial model on the toy cohort with the entropy weight ``entropy_weight_at(epoch)``; return the
    held-out AUC and the mean share of the voxel attention inside the planted sub-region."""
    torch.manual_seed(0)
    v, f, r, m, y, _ = _toy(120, seed=1)
    vt, ft, rt, mt, yt, planted = _toy(80, seed=2)
    model = SpatialMil(SpatialConfig(dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(20):
        weight = entropy_weight_at(epoch)
        for i in torch.randperm(len(y)).split(16):
            out = model(v[i], f[i], r[i], m[i])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, LOGIT], y[i])
            loss = loss + weight * attention_entropy(out.voxel_attention[:, BRANCH:BRANCH + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(vt, ft, rt, mt)
    mass = out.voxel_attention[:, BRANCH].flatten(2)  # (B, N, V)
    inside = (mass * planted.flatten(2)).sum((1, 2))
    return auc(yt.numpy(), out.logits[:, LOGIT].numpy()), float(inside.mean())


def test_spatial_mil_learns_a_planted_subregion_and_its_risk_map_concentrates_there():
    config = TrainConfig(model="spatial")
    auc_value, inside = _train_on_toy(lambda epoch: entropy_weight(config, epoch))  # the warm-up, as train.py
    assert auc_value > 0.85
    # the sub-region is 32 of 2048 organ voxels (1.6 %); the issue asks for >= 70 % of the mass
    assert inside > 0.7


def test_dose_response_term_keeps_attention_from_collapsing_under_an_early_entropy_prior(monkeypatch):
    """With the entropy prior from epoch 0, the attention concentrates before the outcome has shaped it, unless
    the logit reads the attention-pooled dose directly (spatial.DoseResponse): that gives the voxel attention a
    gradient towards the voxels whose dose carries the signal from the first step. (train.py still warms the
    prior up: the fused model's heads see the tabular encoder too.)"""
    _, inside = _train_on_toy(lambda epoch: 0.05)
    assert inside > 0.7
    monkeypatch.setattr(DoseResponse, "forward", lambda self, pooled, organ: pooled.new_zeros(pooled.shape[0], LOGITS))
    _, inside = _train_on_toy(lambda epoch: 0.05)
    assert inside < 0.2
