"""Evaluation metrics against hand-computed values, and the evaluation on a small synthetic cohort: every model
and baseline in one table, every issue-9 criterion evaluated (whether it passes depends on cohort size; the
full-size run is benchmarks/evaluate_models.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtqa_node.ml.evaluate import auc, cohen_kappa, ece, evaluate, net_benefit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_auc_kappa_ece_and_net_benefit_match_hand_computed_values():
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert auc(y, np.array([0.1, 0.35, 0.3, 0.4])) == 0.75
    a = np.array([0, 1, 2, 0, 1, 2])
    assert cohen_kappa(a, a) == 1.0
    # 2x2 example: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5 -> kappa 0.4
    r1 = np.array([0] * 5 + [1] * 5)
    r2 = np.array([0, 0, 0, 0, 1, 0, 0, 1, 1, 1])
    assert abs(cohen_kappa(r1, r2) - 0.4) < 1e-12
    assert ece(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == 0.0
    assert abs(ece(np.array([1, 1, 1, 1]), np.full(4, 0.75)) - 0.25) < 1e-12
    # threshold 0.5: 2 TP, 1 FP of 4 -> 2/4 - 1/4 * 1 = 0.25
    nb = net_benefit(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.7, 0.1]), np.array([0.5]))
    assert abs(nb[0] - 0.25) < 1e-12


def test_evaluation_on_a_small_cohort_lists_every_model_and_baseline_and_every_criterion(tmp_path):
    from rtqa_node.ml.dataset import simulate_cohort
    from rtqa_node.ml.train import TrainConfig, train

    cohort = simulate_cohort(patients=8, seed=21, sites=2)
    train_c, test_c = cohort.subset(np.arange(5)), cohort.subset(np.arange(5, 8))
    models = [train(train_c, TrainConfig(model=k, epochs=1, batch_size=4, val_fraction=0.4), name=k)
              for k in ("tabular", "tabular_mean", "spatial", "fused")]
    result = evaluate(models, train_c, test_c, out_dir=tmp_path / "report")
    names = [r["model"] for r in result.rows]
    assert names[:4] == ["tabular", "tabular_mean", "spatial", "fused"]
    assert any(n.startswith("rule_only") for n in names) and any(n.startswith("published") for n in names)
    assert any(n.startswith("logistic") for n in names)
    assert len(result.criteria) == 5 and all(isinstance(c["passed"], bool) and c["detail"] for c in result.criteria)
    for f in ("report.md", "reliability.png", "decision_curve.png", "evaluation.json"):
        assert (tmp_path / "report" / f).stat().st_size > 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| fused |" in text and "pairwise kappa" in text


def test_fused_model_starts_from_the_unimodal_encoders():
    from rtqa_node.ml.dataset import simulate_cohort
    from rtqa_node.ml.train import TrainConfig, train

    cohort = simulate_cohort(patients=6, seed=22, sites=2)
    config = {"epochs": 1, "batch_size": 4, "val_fraction": 0.4}
    unimodal = {k: train(cohort, TrainConfig(model=k, **config), name=k) for k in ("tabular", "spatial")}
    # learning rate 0: the fused encoders keep exactly the weights they started from
    fused = train(cohort, TrainConfig(model="fused", learning_rate=0.0, **config), name="fused", init=unimodal)
    assert fused.record["initialised_from"] == ["tabular", "spatial"]
    for k, trained in unimodal.items():
        start, now = trained.module.encoder.state_dict(), getattr(fused.module, k).state_dict()
        assert start.keys() == now.keys() and all(torch.equal(start[n], now[n]) for n in start)
    scratch = train(cohort, TrainConfig(model="fused", learning_rate=0.0, **config), name="fused")
    assert scratch.record["initialised_from"] == []
    assert not torch.equal(scratch.module.spatial.where[0].weight, unimodal["spatial"].module.encoder.where[0].weight)
    with pytest.raises(ValueError, match="split seed"):
        train(cohort, TrainConfig(model="fused", seed=5, **config), init=unimodal)


def test_evaluation_names_its_cohorts_and_refuses_overlapping_patients(tmp_path):
    from rtqa_node.cli import main
    from rtqa_node.ml.evaluate import describe_cohorts

    train = {"source": "synthetic", "seed": 1, "patients": 1200, "sites": 3}
    assert "internal" in describe_cohorts(train, {**train, "patients": 600, "first": 1200})
    assert "patients 1200-1799" in describe_cohorts(train, {**train, "patients": 600, "first": 1200})
    assert "external" in describe_cohorts(train, {**train, "seed": 2, "patients": 600})
    # the committed models were trained on seed 1, patients 0-1199: the same seed needs --first >= 1200
    assert main(["evaluate", "--patients", "10", "--seed", "1", "--first", "1000", "--out", str(tmp_path)]) == 2
