"""Dose-response scan (ml.localise): on a toy cohort whose xerostomia events depend on the dose inside a small
planted blob of the parotids, the scan finds the parotids and the blob's position, rejects an endpoint whose
events are noise, and the focused branch puts most of its mass on the blob."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from rtqa_node.ml import localise
from rtqa_node.ml.bags import PATCH_FEATURES, PATCH_SHAPE, SPATIAL_CHANNELS, SPATIAL_ORGANS
from rtqa_node.ml.dataset import DVH_COLUMNS, Cohort
from rtqa_node.ml.mil import TASKS
from rtqa_node.ml.spatial import SpatialConfig, SpatialEncoder, organ_frame_positions
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


def _organ_spread(cohort: Cohort) -> np.ndarray:
    """Per axis, the RMS organ-relative position over the toy's organ voxels (the organ frame's unit)."""
    pos = np.moveaxis(cohort.spa_voxels[:, :, 3:6].astype(np.float64), 2, -1).reshape(-1, 3)
    return np.sqrt((pos ** 2).mean(0))


def test_scan_finds_the_planted_blob_and_rejects_noise(toy):
    cohort, _, _, findings = toy
    by_task = {f.task: f for f in findings}
    assert set(by_task) == {"xerostomia_severe"}, [f.to_dict() for f in findings]  # dysphagia is noise here
    f = by_task["xerostomia_severe"]
    assert [SPATIAL_ORGANS[r] for r in f.regions] == ["Parotid_L", "Parotid_R"]
    found = np.asarray(f.centre) * _organ_spread(cohort)  # the organ frame back to organ-relative units
    assert np.linalg.norm(found - BLOB_CENTRE) <= 0.15, (f.to_dict(), found)
    assert f.validation_gain >= localise.ScanConfig().min_validation_gain


def _batch(cohort: Cohort, idx: np.ndarray) -> list[torch.Tensor]:
    return [torch.as_tensor(a[idx]) for a in (cohort.spa_voxels.astype(np.float32), cohort.spa_features,
                                               cohort.spa_region, cohort.spa_mask)]


def test_focused_branch_puts_its_mass_on_the_blob_and_leaves_the_others(toy):
    cohort, _, _, findings = toy
    torch.manual_seed(0)
    encoder = SpatialEncoder(SpatialConfig()).eval()  # no dropout: outputs comparable between calls
    idx = np.arange(20)
    batch = _batch(cohort, idx)
    blob = torch.as_tensor(cohort.subregion[idx].reshape(len(idx), cohort.subregion.shape[1], -1) > 0)
    xer, dys = TASKS.index("xerostomia_severe"), TASKS.index("dysphagia_severe")

    def mass_on_blob(branch: int) -> float:
        with torch.no_grad():
            _, out = encoder(*batch)
        return float((out.voxel_attention[:, branch] * blob).sum((1, 2)).mean())

    before = mass_on_blob(xer), mass_on_blob(dys)
    localise.focus(encoder, findings)
    share = float(blob.float().mean())  # the blob's share of the voxels: uniform attention's mass on it
    assert before[0] < 2 * share
    assert mass_on_blob(xer) > 0.5 and mass_on_blob(xer) > 4 * share, (before, mass_on_blob(xer), share)
    assert mass_on_blob(dys) == pytest.approx(before[1], abs=1e-6)  # an unfocused branch is unchanged
    # the focus is part of the saved state: a fresh encoder loading it attends the same way
    again = SpatialEncoder(SpatialConfig()).eval()
    again.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        a, b = encoder(*batch)[1].voxel_attention[:, xer], again(*batch)[1].voxel_attention[:, xer]
    assert torch.allclose(a, b, atol=1e-6)


def test_focused_branch_attends_to_its_organs_only_and_falls_back_without_them():
    torch.manual_seed(0)
    encoder = SpatialEncoder(SpatialConfig()).eval()
    parotids = (SPATIAL_ORGANS.index("Parotid_L"), SPATIAL_ORGANS.index("Parotid_R"))
    encoder.set_focus(TASKS.index("xerostomia_severe"), parotids, (0.0, 0.0, 0.0), 0.5)
    voxels = torch.rand(2, 4, len(SPATIAL_CHANNELS), Z, Y, X) - 0.5
    voxels[:, :, 2] = 1.0
    region = torch.tensor([[0, 1, 4, 5], [4, 5, 6, 6]])  # patient 1 has no parotid
    features = torch.zeros(2, 4, len(PATCH_FEATURES))
    with torch.no_grad():
        _, out = encoder(voxels, features, region, torch.ones(2, 4, dtype=torch.bool))
    ra = out.region_attention[:, TASKS.index("xerostomia_severe")]
    assert float(ra[0, list(parotids)].sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(ra[1].sum()) == pytest.approx(1.0, abs=1e-6) and float(ra[1, [4, 5, 6]].sum()) > 0.99
    verdict = out.region_attention[0, TASKS.index("qa_verdict")]
    assert float(verdict[[4, 5]].sum()) > 0.0  # other branches still see every organ


def test_focus_needs_position_attention_in_the_organ_frame():
    for config in (SpatialConfig(voxel_attention="content"), SpatialConfig(position_frame="mm")):
        with pytest.raises(ValueError, match="focus needs"):
            SpatialEncoder(config).set_focus(1, (0, 1), (0.0, 0.0, 0.0), 0.3)


def test_no_finding_leaves_the_encoder_unchanged():
    encoder = SpatialEncoder(SpatialConfig())
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    localise.focus(encoder, [])
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())


def test_organ_frame_does_not_depend_on_the_organ_size(toy):
    """A gland twice as large (positions x 2) is the same gland in the organ frame; the spread is per axis."""
    cohort, *_ = toy
    voxels, _, region, mask = _batch(cohort, np.arange(3))
    larger = voxels.clone()
    larger[:, :, 3:6] *= torch.tensor([2.0, 1.5, 3.0])[:, None, None, None]
    a, b = organ_frame_positions(voxels, region, mask), organ_frame_positions(larger, region, mask)
    assert torch.allclose(a, b, atol=1e-5)
    inside = voxels[:, :, 2] > 0  # (B, N, Z, Y, X)
    rms = torch.sqrt((a.permute(0, 1, 3, 4, 5, 2)[inside] ** 2).mean(0))
    assert torch.allclose(rms, torch.ones(3), atol=1e-4)


def test_organ_families_pair_left_and_right():
    families = localise.organ_families()
    names = [[SPATIAL_ORGANS[i] for i in f] for f in families]
    assert ["Parotid_L", "Parotid_R"] in names and ["Glnd_Submand_L", "Glnd_Submand_R"] in names
    assert sorted(i for f in families for i in f) == list(range(len(SPATIAL_ORGANS)))


def test_training_focuses_the_spatial_attention_where_the_scan_found(toy):
    from rtqa_node.ml.train import TrainConfig, train

    cohort, *_ = toy
    config = {"model": "spatial", "epochs": 1, "batch_size": 64, "val_fraction": 0.25}
    model = train(cohort, TrainConfig(**config), name="spatial")
    assert [f["task"] for f in model.record["localisation"]] == ["xerostomia_severe"]
    assert model.record["localisation"][0]["organs"] == ["Parotid_L", "Parotid_R"]
    branch = TASKS.index("xerostomia_severe")
    encoder = model.module.encoder
    assert float(encoder.focus_sigma[branch]) == pytest.approx(model.record["localisation"][0]["sigma"])
    assert torch.allclose(encoder.focus_centre[branch], torch.tensor(model.record["localisation"][0]["centre"]),
                          atol=1e-3)  # kept through training: a buffer, not a parameter
    plain = train(cohort, TrainConfig(**config, localise=False), name="spatial")
    assert plain.record["localisation"] is None


def test_the_scans_logistic_fit_starts_the_dose_response_offset(toy):
    """After start_dose_response the xerostomia logit is exactly the scan's logistic on the model's own doses
    (the head's last layer is zero), and organ_dose is the region-attention-weighted whole-organ mean."""
    from rtqa_node.ml.evaluate import auc
    from rtqa_node.ml.mil import VERDICT_CLASSES
    from rtqa_node.ml.spatial import SpatialMil

    cohort, _, val_idx, findings = toy
    (f,) = findings
    torch.manual_seed(0)
    model = SpatialMil(SpatialConfig()).eval()
    localise.focus(model.encoder, findings)
    localise.start_dose_response(model, findings)
    batch = _batch(cohort, val_idx)
    with torch.no_grad():
        out = model(*batch)
    xer = TASKS.index("xerostomia_severe")
    intercept, organ_slope, slope = f.logistic
    assert slope > 0  # the toy's events rise with the blob's dose
    expected = (intercept + max(organ_slope, 1e-3) * out.organ_dose[:, xer] + slope * out.pooled_dose[:, xer])
    logit = out.logits[:, len(VERDICT_CLASSES) + 0]
    assert torch.allclose(logit, expected.float(), atol=1e-4)
    assert auc(cohort.events[val_idx, 0], logit.numpy()) > 0.8  # the held-out patients: the fit carries over

    voxels, _, region, _ = batch
    occ, dose = voxels[:, :, 2], voxels[:, :, 0]
    means = torch.stack([(occ * dose * (region == r)[..., None, None, None]).sum((1, 2, 3, 4))
                         / (occ * (region == r)[..., None, None, None]).sum((1, 2, 3, 4)).clamp(min=1e-6)
                         for r in range(len(SPATIAL_ORGANS))], 1)  # (B, R)
    assert torch.allclose(out.organ_dose[:, xer], (out.region_attention[:, xer] * means).sum(1), atol=1e-5)
