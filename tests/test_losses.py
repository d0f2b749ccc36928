"""Loss terms and diagnostics on numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ppo_cli import losses

EPS = 0.2


def _log_probs(ratios: list[float], old: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi such that pi / pi_old equals ``ratios``."""
    old_t = torch.tensor(old, dtype=torch.float64)
    return old_t + torch.log(torch.tensor(ratios, dtype=torch.float64)), old_t


@pytest.mark.parametrize(
    ("ratio", "adv", "objective"),
    [
        (1.1, 2.0, 2.2),  # inside the range: plain rho * A
        (0.9, -1.0, -0.9),  # inside, negative advantage
        (1.5, 1.0, 1.2),  # above, A > 0: gain capped at (1 + eps) * A
        (1.5, -1.0, -1.5),  # above, A < 0: paid in full
        (0.5, 1.0, 0.5),  # below, A > 0: paid in full
        (0.5, -2.0, -1.6),  # below, A < 0: gain capped at (1 - eps) * A
    ],
)
def test_clipped_surrogate_single_cases(ratio: float, adv: float, objective: float) -> None:
    log_prob, old = _log_probs([ratio], [-1.3])
    loss = losses.clipped_surrogate_loss(log_prob, old, torch.tensor([adv], dtype=torch.float64), EPS)
    assert loss.item() == pytest.approx(-objective, abs=1e-12)


def test_clipped_surrogate_is_negated_mean() -> None:
    log_prob, old = _log_probs([1.1, 1.5, 1.5, 0.5, 0.5], [-1.0, -2.0, -0.5, -3.0, -1.2])
    adv = torch.tensor([2.0, 1.0, -1.0, 1.0, -2.0], dtype=torch.float64)
    # min terms: 2.2, 1.2, -1.5, 0.5, -1.6 -> sum 0.8, mean 0.16
    loss = losses.clipped_surrogate_loss(log_prob, old, adv, EPS)
    assert loss.item() == pytest.approx(-0.16, abs=1e-12)


def test_clipped_surrogate_gradient_vanishes_when_clipped() -> None:
    log_prob, old = _log_probs([1.5, 1.1], [-1.0, -1.0])
    log_prob.requires_grad_(True)
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    losses.clipped_surrogate_loss(log_prob, old, adv, EPS).backward()
    assert log_prob.grad is not None
    assert log_prob.grad[0].item() == 0.0
    # d/dlogp of -(rho * A)/2 = -rho * A / 2
    assert log_prob.grad[1].item() == pytest.approx(-1.1 / 2, abs=1e-12)


def test_value_loss_unclipped() -> None:
    values = torch.tensor([1.0, 2.0, 3.0])
    returns = torch.tensor([0.0, 2.0, 5.0])
    # squared errors 1, 0, 4 -> mean 5/3 -> half is 5/6
    loss = losses.value_loss(values, torch.full((3,), 99.0), returns, None)
    assert loss.item() == pytest.approx(5.0 / 6.0, rel=1e-6)


@pytest.mark.parametrize(
    ("value", "old", "ret", "expected"),
    [
        # clipped term larger: V clipped to 0.5, (0.5 - 3)^2 = 6.25 > (2 - 3)^2 = 1
        (2.0, 0.0, 3.0, 0.5 * 6.25),
        # unclipped term larger: (2 - 0)^2 = 4 > (0.5 - 0)^2 = 0.25
        (2.0, 0.0, 0.0, 0.5 * 4.0),
        # inside the clip range both agree: (1.2 - 2)^2 = 0.64
        (1.2, 1.0, 2.0, 0.5 * 0.64),
        # clipped from below: V_old + clip(-3, -0.5, 0.5) = 0.5, (0.5 + 2)^2 = 6.25 > 0
        (-2.0, 1.0, -2.0, 0.5 * 6.25),
    ],
)
def test_value_loss_clipped_max_form(value: float, old: float, ret: float, expected: float) -> None:
    loss = losses.value_loss(
        torch.tensor([value], dtype=torch.float64),
        torch.tensor([old], dtype=torch.float64),
        torch.tensor([ret], dtype=torch.float64),
        0.5,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_value_loss_clipped_batch_mean() -> None:
    values = torch.tensor([2.0, 2.0, 1.2], dtype=torch.float64)
    old = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    returns = torch.tensor([3.0, 0.0, 2.0], dtype=torch.float64)
    # max terms 6.25, 4, 0.64 -> mean 3.63 -> half 1.815
    loss = losses.value_loss(values, old, returns, 0.5)
    assert loss.item() == pytest.approx(1.815, abs=1e-12)
    # Clipping can only make the loss larger than the unclipped one (0.5 * (1 + 4 + 0.64) / 3).
    assert loss.item() > losses.value_loss(values, old, returns, None).item()


def test_kl_estimates_hand_numbers() -> None:
    old = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    log_prob = old + torch.tensor([0.5, -0.5], dtype=torch.float64)
    k1, k2, k3 = losses.kl_estimates(log_prob, old)
    assert k1.item() == pytest.approx(0.0, abs=1e-12)
    assert k2.item() == pytest.approx(0.125, abs=1e-12)  # mean(0.5 * 0.25)
    expected_k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5)) / 2
    assert k3.item() == pytest.approx(expected_k3, abs=1e-12)

    # A single sample with ratio 2: k1 = -ln 2, k2 = 0.5 ln^2 2, k3 = (2 - 1) - ln 2.
    k1, k2, k3 = losses.kl_estimates(
        torch.tensor([math.log(2.0)], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    )
    assert k1.item() == pytest.approx(-math.log(2.0), abs=1e-12)
    assert k2.item() == pytest.approx(0.5 * math.log(2.0) ** 2, abs=1e-12)
    assert k3.item() == pytest.approx(1.0 - math.log(2.0), abs=1e-12)


def test_kl_estimates_non_negative_k2_k3_and_zero_at_equality() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        old = torch.randn(16, generator=g)
        new = old + torch.randn(16, generator=g)
        _, k2, k3 = losses.kl_estimates(new, old)
        assert k2.item() >= 0.0
        assert k3.item() >= 0.0
    same = torch.randn(8, generator=g)
    assert all(k.item() == 0.0 for k in losses.kl_estimates(same, same.clone()))


@pytest.mark.parametrize("family", ["categorical", "gaussian"])
def test_sample_estimators_track_the_exact_kl(family: str) -> None:
    """With many samples from pi_old, k1 and k3 converge to the closed-form KL; k2 is close."""
    g = torch.Generator().manual_seed(1)
    if family == "categorical":
        old = torch.distributions.Categorical(logits=torch.tensor([0.0, 1.0, -1.0]))
        new = torch.distributions.Categorical(logits=torch.tensor([0.3, 0.6, -0.8]))
        exact = torch.distributions.kl_divergence(old, new).item()
        actions = torch.multinomial(old.probs, 200_000, replacement=True, generator=g)
        log_old, log_new = old.log_prob(actions), new.log_prob(actions)
    else:
        old_n = torch.distributions.Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]))
        new_n = torch.distributions.Normal(torch.tensor([0.2, 0.8]), torch.tensor([0.9, 0.6]))
        exact = torch.distributions.kl_divergence(old_n, new_n).sum().item()
        actions = old_n.mean + old_n.stddev * torch.randn(200_000, 2, generator=g)
        log_old, log_new = old_n.log_prob(actions).sum(-1), new_n.log_prob(actions).sum(-1)
    k1, k2, k3 = losses.kl_estimates(log_new.double(), log_old.double())
    assert k1.item() == pytest.approx(exact, rel=0.05)
    assert k3.item() == pytest.approx(exact, rel=0.05)
    assert k2.item() == pytest.approx(exact, rel=0.25)


def test_clip_fraction() -> None:
    log_prob, old = _log_probs([1.0, 1.1, 1.25, 0.75, 0.85], [0.0, -1.0, -2.0, -3.0, -4.0])
    # outside [0.8, 1.2]: 1.25 and 0.75 -> 2 / 5
    assert losses.clip_fraction(log_prob, old, EPS).item() == pytest.approx(0.4)
    assert losses.clip_fraction(old, old, EPS).item() == 0.0


def test_explained_variance() -> None:
    targets = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert losses.explained_variance(targets.clone(), targets) == pytest.approx(1.0)
    constant = torch.full_like(targets, targets.mean().item())
    assert losses.explained_variance(constant, targets) == pytest.approx(0.0, abs=1e-7)
    # residuals (0, 0, 0, -1): var 0.25; var of targets 5/3 -> 1 - 0.15 = 0.85
    pred = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert losses.explained_variance(pred, targets) == pytest.approx(0.85, rel=1e-6)
    # worse than a constant is negative
    assert losses.explained_variance(-targets, targets) < 0.0
    assert math.isnan(losses.explained_variance(targets, torch.ones(4)))


def test_normalize_advantages() -> None:
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(257, generator=g, dtype=torch.float64) * 7.0 + 3.0
    out = losses.normalize_advantages(adv)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-10)
    assert out.std().item() == pytest.approx(1.0, abs=1e-6)
    # an affine map of the input: order and relative spacing are kept
    torch.testing.assert_close(out, (adv - adv.mean()) / adv.std(), rtol=1e-6, atol=1e-8)
    single = losses.normalize_advantages(torch.tensor([5.0]))
    assert single.tolist() == [0.0]


@pytest.mark.parametrize(
    ("kl", "expected_beta"),
    [
        (0.016, 2.0),  # above 1.5 * 0.01: doubled
        (0.015, 1.0),  # on the upper edge: unchanged
        (0.010, 1.0),  # inside the band: unchanged
        (0.01 / 1.5, 1.0),  # on the lower edge: unchanged
        (0.006, 0.5),  # below 0.01 / 1.5: halved
    ],
)
def test_adaptive_kl_coef_three_branches(kl: float, expected_beta: float) -> None:
    assert losses.adaptive_kl_coef(1.0, kl, kl_target=0.01) == pytest.approx(expected_beta)


def test_adaptive_kl_coef_factor_tolerance_and_bounds() -> None:
    assert losses.adaptive_kl_coef(1.0, 0.05, 0.01, factor=3.0, tolerance=2.0) == pytest.approx(3.0)
    assert losses.adaptive_kl_coef(1.0, 0.019, 0.01, factor=3.0, tolerance=2.0) == pytest.approx(1.0)
    assert losses.adaptive_kl_coef(8.0, 1.0, 0.01, bounds=(0.1, 10.0)) == pytest.approx(10.0)
    assert losses.adaptive_kl_coef(0.15, 0.0, 0.01, bounds=(0.1, 10.0)) == pytest.approx(0.1)


def test_surrogate_loss_hand_numbers() -> None:
    log_prob = torch.log(torch.tensor([1.5, 0.5]))
    advantages = torch.tensor([2.0, -1.0])
    # -mean(1.5 * 2, 0.5 * -1) = -(3 - 0.5) / 2
    assert losses.surrogate_loss(log_prob, torch.zeros(2), advantages).item() == pytest.approx(-1.25)


@pytest.mark.parametrize(
    ("ratio", "adv", "objective"),
    [
        (1.25, 1.0, 1.25),  # inside [0.8, 1.28] (symmetric 0.2 would cap it at 1.2)
        (1.4, 1.0, 1.28),  # above, A > 0: capped at (1 + eps_high) * A
        (1.4, -1.0, -1.4),  # above, A < 0: paid in full
        (0.7, -1.0, -0.8),  # below, A < 0: capped at (1 - eps_low) * A
        (0.7, 1.0, 0.7),  # below, A > 0: paid in full
    ],
)
def test_clipped_surrogate_asymmetric_range(ratio: float, adv: float, objective: float) -> None:
    """DAPO's clip: the ratio is clipped to [1 - 0.2, 1 + 0.28]."""
    log_prob, old = _log_probs([ratio], [-0.7])
    advantages = torch.tensor([adv], dtype=torch.float64)
    loss = losses.clipped_surrogate_loss(log_prob, old, advantages, 0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-objective, abs=1e-12)


def test_clip_fraction_counts_the_asymmetric_range() -> None:
    log_prob, old = _log_probs([0.75, 0.85, 1.25, 1.3], [-1.0] * 4)
    assert losses.clip_fraction(log_prob, old, 0.2, 0.28).item() == 0.5  # 0.75 < 0.8, 1.3 > 1.28
    assert losses.clip_fraction(log_prob, old, 0.2).item() == 0.75  # symmetric: 1.25 > 1.2 too


def test_clipped_surrogate_weighted_mean() -> None:
    log_prob, old = _log_probs([1.1, 1.5], [-1.0, -1.0])
    adv = torch.tensor([2.0, 1.0], dtype=torch.float64)
    weights = torch.tensor([0.5, 1.5], dtype=torch.float64)
    # min terms 2.2 and 1.2 -> (0.5 * 2.2 + 1.5 * 1.2) / 2 = 1.45
    assert losses.clipped_surrogate_loss(log_prob, old, adv, EPS, weights=weights).item() == pytest.approx(
        -1.45
    )


def test_episode_step_weights_by_hand() -> None:
    """Two episodes in a rollout of T = 3: lengths 3 and 1, B = 4 valid steps, G = 2."""
    valid = torch.tensor([[True, True], [True, False], [True, False]])
    expected = {
        "token_mean": [[1, 1], [1, 0], [1, 0]],
        "episode_mean": [[2 / 3, 2], [2 / 3, 0], [2 / 3, 0]],  # B / (G |o_i|): 4 / 6, 4 / 2
        "constant": [[2 / 3, 2 / 3], [2 / 3, 0], [2 / 3, 0]],  # B / (G T) = 4 / 6
    }
    for loss_agg, weights in expected.items():
        got = losses.episode_step_weights(valid, loss_agg)
        torch.testing.assert_close(got, torch.tensor(weights, dtype=torch.float32), msg=loss_agg)
        assert got[valid].mean().item() == pytest.approx(1.0 if loss_agg != "constant" else 2 / 3)


DUAL_CLIP = 3.0
# (rho, A): the dual clip binds (A < 0, rho > c); A < 0 below c; A > 0 clipped above; A < 0 clipped below
DUAL_CASES = ([4.0, 2.0, 4.0, 0.5], [-1.0, -1.0, 1.0, -2.0])


def test_dual_clip_hand_numbers_and_gradient() -> None:
    """Terms max(min(rho A, clip(rho) A), c A) for A < 0: -3 (= c A, bound), -2 (rho A), then the
    plain clipped terms 1.2 and -1.6; mean -1.35. Only the unclipped, unbound sample has a
    gradient: d/dlog pi of -(rho A) / 4 = -(2 * -1) / 4."""
    log_prob, old = _log_probs(DUAL_CASES[0], [-1.0, -0.7, -2.0, -1.5])
    log_prob.requires_grad_(True)
    adv = torch.tensor(DUAL_CASES[1], dtype=torch.float64)
    loss = losses.clipped_surrogate_loss(log_prob, old, adv, EPS, dual_clip=DUAL_CLIP)
    assert loss.item() == pytest.approx(1.35, abs=1e-12)
    loss.backward()
    assert log_prob.grad is not None
    assert log_prob.grad.tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0], abs=1e-12)
    # Without the dual clip the first term is rho * A = -4, and it has a gradient.
    plain = losses.clipped_surrogate_loss(log_prob.detach(), old, adv, EPS)
    assert plain.item() == pytest.approx(-(-4.0 - 2.0 + 1.2 - 1.6) / 4, abs=1e-12)


def test_dual_clip_fraction_counts_the_bound_samples() -> None:
    log_prob, old = _log_probs(DUAL_CASES[0], [-1.0] * 4)
    adv = torch.tensor(DUAL_CASES[1], dtype=torch.float64)
    assert losses.dual_clip_fraction(log_prob, old, adv, DUAL_CLIP).item() == 0.25


def test_spo_loss_hand_numbers() -> None:
    """rho A - |A| / (2 eps) (rho - 1)^2 with eps 0.2: 2.2 - 0.05, -0.5 - 0.625, 1.5 - 0.625."""
    log_prob, old = _log_probs([1.1, 0.5, 1.5], [-1.0, -2.0, -0.3])
    adv = torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
    loss = losses.spo_loss(log_prob, old, adv, EPS)
    assert loss.item() == pytest.approx(-(2.15 - 1.125 + 0.875) / 3, abs=1e-12)


def test_spo_gradient_at_the_old_policy_is_the_policy_gradient() -> None:
    """At pi = pi_old the penalty's gradient vanishes: SPO's first step is -mean(A grad log pi),
    the clipped surrogate's too."""
    weights = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    obs = torch.randn(6, 3, dtype=torch.float64)
    actions = torch.tensor([0, 1, 2, 3, 1, 0])
    adv = torch.randn(6, dtype=torch.float64)

    def gradient(loss_of: object) -> torch.Tensor:
        log_prob = torch.log_softmax(obs @ weights, dim=-1).gather(1, actions[:, None]).squeeze(1)
        loss = loss_of(log_prob, log_prob.detach())  # type: ignore[operator]
        (grad,) = torch.autograd.grad(loss, weights)
        return grad

    expected = gradient(lambda log_prob, old: losses.policy_gradient_loss(log_prob, adv))
    spo = gradient(lambda log_prob, old: losses.spo_loss(log_prob, old, adv, EPS))
    clipped = gradient(lambda log_prob, old: losses.clipped_surrogate_loss(log_prob, old, adv, EPS))
    torch.testing.assert_close(spo, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(clipped, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("adv", "start", "optimum"), [(1.5, 1.6, 1.2), (-0.5, 0.4, 0.8), (2.0, 1.0, 1.2)])
def test_spo_pulls_the_ratio_to_the_edge_of_the_trust_region(
    adv: float, start: float, optimum: float
) -> None:
    """Per sample SPO's objective peaks at rho = 1 + eps * sign(A), and gradient steps on it go
    there from either side; on the clipped surrogate a ratio past the clip has no gradient, so
    nothing brings it back."""
    old = torch.zeros(1, dtype=torch.float64)
    advantages = torch.tensor([adv], dtype=torch.float64)
    log_ratio = torch.tensor([math.log(start)], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([log_ratio], lr=0.05)
    for _ in range(2000):
        optimizer.zero_grad()
        losses.spo_loss(log_ratio, old, advantages, EPS).backward()
        optimizer.step()
    assert math.exp(log_ratio.item()) == pytest.approx(optimum, abs=1e-6)
    if abs(start - 1) > EPS:  # outside the clip range: the clipped surrogate leaves it there
        stuck = torch.tensor([math.log(start)], dtype=torch.float64, requires_grad=True)
        losses.clipped_surrogate_loss(stuck, old, advantages, EPS).backward()
        assert stuck.grad is not None and stuck.grad.item() == 0.0
