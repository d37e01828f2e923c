"""Dose-response scan (ml.localise): on a toy cohort whose xerostomia events depend on the dose inside a small
planted blob of the parotids, the scan finds the parotids and the blob's position, rejects an endpoint whose
events are noise, and the initialised position attention puts most of the branch's mass on the blob."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from rtqa_node.ml import localise
from rtqa_node.ml.bags import PATCH_FEATURES, PATCH_SHAPE, SPATIAL_CHANNELS, SPATIAL_ORGANS
from rtqa_node.ml.dataset import DVH_COLUMNS, Cohort
from rtqa_node.ml.mil import TASKS
from rtqa_node.ml.spatial import SpatialConfig, SpatialEncoder
from rtqa_node.ml.train import split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Z, Y, X = PATCH_SHAPE
BLOB_CENTRE = np.array([0.0, -0.4, 0.3])  # the block is only 8 voxels (+-0.35) deep in z
BLOB_RADIUS = 0.25
SPACING = 0.1  # organ-relative units per voxel (3 mm at bags.POSITION_SCALE_MM), as a 3 mm dose grid


def _toy_cohort(n: int, seed: int) -> Cohort:
    """Each patient: both parotids (regions 0 and 1), each a 2 x 2 x 2 block of patches with organ-relative
    positions SPACING apart (lateral mirrored, as the bags do). Gland dose: a per-gland level plus a gradient and
    noise; inside the blob the dose is scaled by its own factor (as the generator's stem-cell modulation).
    Xerostomia events follow the blob's mean dose; dysphagia events are coin flips."""
    rng = np.random.default_rng(seed)
    regions = (SPATIAL_ORGANS.index("Parotid_L"), SPATIAL_ORGANS.index("Parotid_R"))
    ns = 16
    v = np.zeros((n, ns, len(SPATIAL_CHANNELS), Z, Y, X), dtype=np.float32)
    region = np.zeros((n, ns), dtype=np.int64)
    mask = np.ones((n, ns), dtype=bool)
    blob = np.zeros((n, ns, Z, Y, X), dtype=bool)
    blob_dose = np.zeros(n)
    blocks = [(a, b, c) for a in range(2) for b in range(2) for c in range(2)]
    for i in range(n):
        doses = []
        for g, r in enumerate(regions):
            level, slope, k = rng.uniform(0.2, 0.8), rng.normal(0, 0.1, 3), rng.uniform(-0.4, 0.5)
            for j, (a, b, c) in enumerate(blocks):
                s = g * len(blocks) + j
                zz, yy, xx = np.meshgrid(*((np.arange(n_) + o * n_ - n_ + 0.5) * SPACING
                                           for n_, o in zip(PATCH_SHAPE, (a, b, c))), indexing="ij")
                pos = np.stack([zz, yy, xx])
                inside = ((pos - BLOB_CENTRE[:, None, None, None]) ** 2).sum(0) < BLOB_RADIUS ** 2
                d = level + np.tensordot(slope, pos, 1) + 0.03 * rng.normal(size=(Z, Y, X))
                d = np.where(inside, d * (1 + k), d)
                v[i, s, 0], v[i, s, 2], v[i, s, 3:6] = d, 1.0, pos
                region[i, s], blob[i, s] = r, inside
                doses.append(d[inside])
        blob_dose[i] = np.concatenate(doses).mean()
    p = 1 / (1 + np.exp(-12 * (blob_dose - 0.55)))
    events = np.stack([rng.random(n) < p, rng.random(n) < 0.3, np.full(n, np.nan)], 1).astype(np.float32)
    shapes = {"tab_x": (n, 1, 17), "tab_name_index": (n, 1), "tab_mask": (n, 1), "spa_features": (n, ns, len(PATCH_FEATURES)),
              "spa_origin": (n, ns, 3), "dvh": (n, len(DVH_COLUMNS) + 1), "reviewers": (n, 3), "consensus": (n,),
              "true_verdict": (n,), "oracle": (n, 3), "stem_cell_share": (n,), "stem_cell_cause": (n,), "site": (n,)}
    integer = {"tab_name_index", "spa_origin", "reviewers", "consensus", "true_verdict", "site"}
    arrays = {f.name: np.zeros(shapes[f.name], dtype=np.int64 if f.name in integer else np.float32)
              for f in fields(Cohort) if f.name in shapes}
    arrays["tab_mask"] = np.ones(shapes["tab_mask"], dtype=bool)
    return Cohort(**arrays, spa_voxels=v.astype(np.float16), spa_region=region, spa_mask=mask,
                  subregion=blob.astype(np.uint8), has_subregion=np.ones(n, dtype=bool), events=events,
                  folder=np.array([f"p{i}" for i in range(n)]))


@pytest.fixture(scope="module")
def toy():
    cohort = _toy_cohort(300, seed=3)
    train_idx, val_idx = split(len(cohort), val_fraction=0.25, seed=0)
    return cohort, train_idx, val_idx, localise.scan(cohort, train_idx, val_idx)


def test_scan_finds_the_planted_blob_and_rejects_noise(toy):
    _, _, _, findings = toy
    by_task = {f.task: f for f in findings}
    assert set(by_task) == {"xerostomia_severe"}, [f.to_dict() for f in findings]  # dysphagia is noise here
    f = by_task["xerostomia_severe"]
    assert [SPATIAL_ORGANS[r] for r in f.regions] == ["Parotid_L", "Parotid_R"]
    assert np.linalg.norm(np.asarray(f.centre) - BLOB_CENTRE) <= 0.15, f.to_dict()
    assert f.validation_gain >= localise.ScanConfig().min_validation_gain


def test_initialised_attention_puts_the_branch_mass_on_the_blob(toy):
    cohort, train_idx, _, findings = toy
    torch.manual_seed(0)
    encoder = SpatialEncoder(SpatialConfig())
    idx = np.arange(20)
    batch = [torch.as_tensor(a[idx]) for a in (cohort.spa_voxels.astype(np.float32), cohort.spa_features,
                                                cohort.spa_region, cohort.spa_mask)]
    blob = torch.as_tensor(cohort.subregion[idx].reshape(len(idx), cohort.subregion.shape[1], -1) > 0)
    branch = TASKS.index("xerostomia_severe")

    def mass_on_blob() -> float:
        with torch.no_grad():
            _, out = encoder(*batch)
        return float((out.voxel_attention[:, branch] * blob).sum((1, 2)).mean())

    before = mass_on_blob()
    mse = localise.initialise_attention(encoder, findings, cohort, train_idx)
    after = mass_on_blob()
    share = float(blob.float().mean())  # the blob's share of the voxels: uniform attention's mass on it
    assert before < 2 * share
    assert after > 0.5 and after > 4 * share, (before, after, share, mse)
    # the other branches' scores were kept
    with torch.no_grad():
        _, out = encoder(*batch)
    dys = TASKS.index("dysphagia_severe")
    assert float((out.voxel_attention[:, dys] * blob).sum((1, 2)).mean()) < 2 * share


def test_no_finding_leaves_the_encoder_unchanged(toy):
    cohort, train_idx, _, _ = toy
    encoder = SpatialEncoder(SpatialConfig())
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert np.isnan(localise.initialise_attention(encoder, [], cohort, train_idx))
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())


def test_organ_families_pair_left_and_right():
    families = localise.organ_families()
    names = [[SPATIAL_ORGANS[i] for i in f] for f in families]
    assert ["Parotid_L", "Parotid_R"] in names and ["Glnd_Submand_L", "Glnd_Submand_R"] in names
    assert sorted(i for f in families for i in f) == list(range(len(SPATIAL_ORGANS)))


def test_training_starts_the_spatial_attention_from_the_scan(toy):
    from rtqa_node.ml.train import TrainConfig, train

    cohort, *_ = toy
    config = {"model": "spatial", "epochs": 1, "batch_size": 64, "val_fraction": 0.25}
    model = train(cohort, TrainConfig(**config), name="spatial")
    assert [f["task"] for f in model.record["localisation"]] == ["xerostomia_severe"]
    assert model.record["localisation"][0]["organs"] == ["Parotid_L", "Parotid_R"]
    plain = train(cohort, TrainConfig(**config, localise=False), name="spatial")
    assert plain.record["localisation"] is None


def test_pointwise_evaluation_matches_the_convolutions():
    torch.manual_seed(1)
    where = SpatialEncoder(SpatialConfig()).where
    x = torch.randn(50, where[0].in_channels)
    expected = where(x[:, :, None, None, None]).flatten(1)
    assert torch.allclose(localise._pointwise(where, x), expected, atol=1e-5)
