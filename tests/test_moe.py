"""The MoE layer of mlatlas.nn.moe: routing, balancing and dispatch against hand computations."""

import pytest
import torch

from mlatlas.nn.layers import SwiGLU
from mlatlas.nn.moe import (
    MoE,
    balance_bias_update,
    capacity_factor,
    expert_load,
    load_balancing_loss,
    route,
    router_scores,
)


def test_one_expert_top1_is_a_dense_swiglu():
    torch.manual_seed(0)
    moe = MoE(12, 20, 1, n_shared_experts=0, num_experts_per_tok=1)
    dense = SwiGLU(12, 20)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.gate_up_proj[0, :20])
        dense.up_proj.weight.copy_(moe.experts.gate_up_proj[0, 20:])
        dense.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(moe(x), dense(x))


def test_route_topk_weights_and_normalisation_by_hand():
    s = torch.tensor([[0.1, 0.7, 0.4, 0.2],
                      [0.9, 0.3, 0.8, 0.5]])
    g, idx = route(s, None, 2)
    assert idx.tolist() == [[1, 2], [0, 2]]
    torch.testing.assert_close(g, torch.tensor([[0.7 / 1.1, 0.4 / 1.1], [0.9 / 1.7, 0.8 / 1.7]]))
    g, idx = route(s, None, 2, norm_topk_prob=False, routed_scaling_factor=2.5)
    torch.testing.assert_close(g, torch.tensor([[1.75, 1.0], [2.25, 2.0]]))


def test_group_limited_routing_by_hand():
    # Groups {0, 1}, {2, 3}, {4, 5}: sums of the two best are 0.6, 1.3, 0.95 for the token.
    s = torch.tensor([[0.55, 0.05, 0.5, 0.8, 0.9, 0.05]])
    _, idx = route(s, None, 2)
    assert idx.tolist() == [[4, 3]]
    _, idx = route(s, None, 2, n_group=3, topk_group=1)
    assert idx.tolist() == [[3, 2]]  # only group {2, 3} survives, though 0.9 and 0.55 are larger
    _, idx = route(s, None, 3, n_group=3, topk_group=2)
    assert idx.tolist() == [[4, 3, 2]]  # groups {2, 3} and {4, 5}; expert 0 (0.55) is cut


def test_bias_changes_selection_not_the_weights_formula():
    s = torch.tensor([[0.9, 0.6, 0.3]])
    bias = torch.tensor([0.0, 0.0, 0.5])
    g, idx = route(s, bias, 2)
    assert idx.tolist() == [[0, 2]]  # 0.3 + 0.5 beats 0.6
    torch.testing.assert_close(g, torch.tensor([[0.9 / 1.2, 0.3 / 1.2]]))


def test_bias_update_sign_rule_and_load_by_hand():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    load = expert_load(idx, 4)
    assert load.tolist() == [3.0, 2.0, 1.0, 0.0]  # mean 1.5
    new = balance_bias_update(torch.tensor([0.1, 0.0, 0.0, -0.1]), load, 0.01)
    torch.testing.assert_close(new, torch.tensor([0.09, -0.01, 0.01, -0.09]))
    assert capacity_factor(load, 2) == pytest.approx(3 / 1.5)
    assert balance_bias_update(torch.zeros(2), torch.tensor([2.0, 2.0]), 1.0).tolist() == [0, 0]


def test_load_balancing_loss_by_hand_and_minimum_at_uniform():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0], [1]])
    # f = (1/2, 1/2, 0), P = (0.3, 0.45, 0.25): 3 (0.15 + 0.225) = 1.125
    assert load_balancing_loss(probs, idx, 3).item() == pytest.approx(1.125)
    assert load_balancing_loss(probs, idx, 3, alpha=0.1).item() == pytest.approx(0.1125)
    # Hard routing (p one-hot on the chosen expert): E sum f_i^2 >= 1, equality iff uniform.
    E = 4
    uniform = torch.arange(8)[:, None] % E
    skewed = torch.tensor([[0], [0], [0], [1], [1], [2], [3], [3]])
    for idx, expected in ((uniform, 1.0), (skewed, 4 * (9 + 4 + 1 + 4) / 64)):
        p = torch.nn.functional.one_hot(idx[:, 0], E).float()
        assert load_balancing_loss(p, idx, E).item() == pytest.approx(expected)
    assert 4 * (9 + 4 + 1 + 4) / 64 > 1.0


def test_gradient_reaches_the_router_and_matches_finite_differences():
    torch.manual_seed(0)
    moe = MoE(6, 8, 4, n_shared_experts=1, num_experts_per_tok=2, balance="aux",
              aux_loss_alpha=0.1).double()
    x = torch.randn(10, 6, dtype=torch.float64)

    def objective():
        return moe(x).pow(2).sum() + moe.last_aux_loss

    objective().backward()
    grad = moe.gate.weight.grad.clone()
    assert grad.abs().sum() > 0
    eps, (i, j) = 1e-6, (1, 3)
    with torch.no_grad():
        moe.gate.weight[i, j] += eps
        up = objective().item()
        moe.gate.weight[i, j] -= 2 * eps
        down = objective().item()
    # A step this small keeps every selection, so the routed function is smooth there.
    assert grad[i, j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)


def test_forward_keeps_load_of_masked_tokens_and_bias_update():
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, num_experts_per_tok=2, bias_update_speed=0.5)
    x = torch.randn(2, 3, 8)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    moe(x, token_mask=mask)
    assert moe.last_load.sum().item() == 5 * 2
    load = moe.last_load.clone()
    moe.update_bias()
    torch.testing.assert_close(moe.gate.e_score_correction_bias,
                               0.5 * torch.sign(load.mean() - load))
    with pytest.raises(ValueError):
        moe(x, token_mask=mask[:, :2])


def test_softmax_scoring_routes_on_probabilities():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    s = router_scores(logits, "softmax")
    torch.testing.assert_close(s.sum(-1), torch.ones(1))
    g, idx = route(s, None, 2, norm_topk_prob=False)
    assert idx.tolist() == [[0, 2]]
    torch.testing.assert_close(g, s[:, [0, 2]])  # Switch/Mixtral weights without renormalising
    torch.testing.assert_close(router_scores(logits), logits.sigmoid())
    with pytest.raises(ValueError):
        router_scores(logits, "relu")


def test_route_rejects_bad_shapes():
    with pytest.raises(ValueError):
        route(torch.rand(3, 6), None, 2, n_group=4)
    with pytest.raises(ValueError):
        route(torch.rand(3, 6), torch.zeros(5), 2)
    with pytest.raises(ValueError):
        route(torch.rand(6), None, 2)
