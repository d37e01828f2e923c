"""Tabular gated-attention MIL: permutation invariance, attention on real instances only, and learning a
planted signal (the label depends on one organ's dose; the model must find it and attend to it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtqa_node.ml.bags import STRUCTURE_VOCAB, TABULAR_FEATURES
from rtqa_node.ml.evaluate import auc
from rtqa_node.ml.mil import TASKS, TabularConfig, TabularMil

pytestmark = pytest.mark.usefixtures("one_torch_thread")


F = len(TABULAR_FEATURES)


def _model(pooling: str = "attention") -> TabularMil:
    torch.manual_seed(0)
    return TabularMil(TabularConfig(pooling=pooling, dropout=0.0)).eval()


@settings(max_examples=25, deadline=None)
@given(n_real=st.integers(1, 12), pad=st.integers(0, 6), seed=st.integers(0, 10_000))
def test_output_is_invariant_to_instance_order_and_padding_gets_no_attention(n_real, pad, seed):
    g = torch.Generator().manual_seed(seed)
    model = _model()
    n = n_real + pad
    x = torch.randn(1, n, F, generator=g)
    names = torch.randint(0, len(STRUCTURE_VOCAB), (1, n), generator=g)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :n_real] = True
    perm = torch.randperm(n, generator=g)
    with torch.no_grad():
        a = model(x, names, mask)
        b = model(x[:, perm], names[:, perm], mask[:, perm])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.attention[..., perm], b.attention, atol=1e-6, rtol=1e-5)
    assert a.attention.shape == (1, len(TASKS), n)
    torch.testing.assert_close(a.attention.sum(-1), torch.ones(1, len(TASKS)))
    assert torch.all(a.attention[..., n_real:] == 0)


def test_padding_values_do_not_change_the_output():
    model = _model()
    x = torch.randn(2, 10, F)
    names = torch.randint(0, len(STRUCTURE_VOCAB), (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 6:] = False
    y = x.clone()
    y[:, 6:] = 1e3 * torch.randn(2, 4, F)
    with torch.no_grad():
        torch.testing.assert_close(model(x, names, mask).logits, model(y, names, mask).logits)


def _planted_cohort(n: int, seed: int):
    """Bags of 8 organs with random features; the label is 1 when Parotid_L's feature 2 (mean dose) > 0."""
    rng = np.random.default_rng(seed)
    organs = [STRUCTURE_VOCAB.index(o) for o in ("Parotid_L", "Parotid_R", "SpinalCord", "Larynx", "PTV_70",
                                                   "Brainstem", "Cavity_Oral", "Musc_Constrict")]
    x = rng.normal(size=(n, 10, F)).astype(np.float32)
    names = np.zeros((n, 10), dtype=np.int64)
    mask = np.zeros((n, 10), dtype=bool)
    target_pos = np.zeros(n, dtype=np.int64)
    for i in range(n):
        k = rng.integers(5, 9)  # bags of different sizes, organs in random order
        chosen = rng.permutation(organs)[:k]
        if organs[0] not in chosen:
            chosen[0] = organs[0]
        chosen = rng.permutation(chosen)
        names[i, :k], mask[i, :k] = chosen, True
        target_pos[i] = int(np.flatnonzero(chosen == organs[0])[0])
    y = (x[np.arange(n), target_pos, 2] > 0).astype(np.float32)
    return (torch.as_tensor(x), torch.as_tensor(names), torch.as_tensor(mask), torch.as_tensor(y),
            torch.as_tensor(target_pos))


def test_tabular_mil_learns_a_planted_signal_and_attends_to_its_instance():
    torch.manual_seed(0)
    x, names, mask, y, _ = _planted_cohort(300, seed=1)
    xt, nt, mt, yt, pos = _planted_cohort(200, seed=2)
    model = TabularMil(TabularConfig(dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    branch = TASKS.index("xerostomia_severe")
    logit = 3 + branch - 1  # logits: 3 verdict classes, then one per binary target
    for epoch in range(12):
        for i in torch.randperm(300).split(50):
            out = model(x[i], names[i], mask[i])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, logit], y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(xt, nt, mt)
    assert auc(yt.numpy(), out.logits[:, logit].numpy()) > 0.9
    on_target = out.attention[torch.arange(200), branch, pos]
    assert float(on_target.mean()) > 0.5  # 5-8 instances per bag: uniform weight would be 0.12-0.2


def test_instance_response_reads_its_named_instances_and_fills_a_missing_one():
    """The local-control offset: b + softplus(u) x D98(CTV_70) - softplus(v) x log volume(GTV_70), read by name
    whatever the instance order, the training mean where a structure is missing; starts at a fitted logistic."""
    from rtqa_node.ml.mil import LOGITS, VERDICT_CLASSES, InstanceResponse

    tr = InstanceResponse("local_control")
    tr.initialise(intercept=0.5, slopes=[2.0, -0.7], fill=[0.9, 3.0])
    x = torch.zeros(2, 4, len(TABULAR_FEATURES))
    names = torch.tensor([[STRUCTURE_VOCAB.index("GTV_70"), STRUCTURE_VOCAB.index("CTV_70"), 0, 0],
                          [STRUCTURE_VOCAB.index("CTV_70"), STRUCTURE_VOCAB.index("GTV_70"), 0, 0]])
    d98, logvol = TABULAR_FEATURES.index("d98"), TABULAR_FEATURES.index("log_volume_cc")
    x[0, 0, logvol], x[0, 1, d98] = 2.5, 0.95
    x[1, 0, d98] = 0.8
    x[0, 2:, :] = 99.0  # padding and other structures must not leak in
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])  # patient 1: GTV masked out
    out = tr(x, names, mask)
    assert out.shape == (2, LOGITS)
    slot = len(VERDICT_CLASSES) + 2
    assert torch.allclose(out[:, slot], torch.tensor([0.5 + 2.0 * 0.95 - 0.7 * 2.5, 0.5 + 2.0 * 0.8 - 0.7 * 3.0]),
                          atol=1e-5)
    assert torch.count_nonzero(out[:, :slot]) == 0  # the other logits are untouched
    tr.initialise(intercept=0.0, slopes=[-1.0, 1.0], fill=[0.9, 3.0])  # wrong signs start at ~0, not flipped
    assert float(tr(x, names, mask)[:, slot].abs().max()) < 0.01


def test_the_dysphagia_offset_reads_the_constrictor_and_supraglottic_means_into_the_dysphagia_logit():
    from rtqa_node.ml.mil import BINARY_TARGETS, LOGITS, VERDICT_CLASSES, InstanceResponse

    r = InstanceResponse("dysphagia_severe")
    r.initialise(intercept=-5.5, slopes=[3.5, 2.2], fill=[0.6, 0.5])
    x = torch.zeros(1, 3, len(TABULAR_FEATURES))
    names = torch.tensor([[STRUCTURE_VOCAB.index("Larynx_SG"), STRUCTURE_VOCAB.index("Parotid_L"),
                           STRUCTURE_VOCAB.index("Musc_Constrict_S")]])
    mean = TABULAR_FEATURES.index("mean")
    x[0, :, mean] = torch.tensor([0.4, 0.9, 0.7])  # the parotid's mean must not count
    out = r(x, names, torch.ones(1, 3, dtype=torch.bool))
    slot = len(VERDICT_CLASSES) + BINARY_TARGETS.index("dysphagia_severe")
    assert torch.allclose(out[0, slot], torch.tensor(-5.5 + 3.5 * 0.7 + 2.2 * 0.4), atol=1e-5)
    assert torch.count_nonzero(out) == 1 and out.shape == (1, LOGITS)
