"""The closed-form action distributions against torch.distributions, and their sampling."""

from __future__ import annotations

import pytest
import torch
from torch import distributions as td

from ppo_cli.distributions import Categorical, DiagonalGaussian, MultiCategorical

CPU = torch.device("cpu")


def _categorical_params() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, 5, generator=g) * 2
    return old, old + torch.randn(64, 5, generator=g)


def _gaussian_params() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    old = torch.cat([torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) * 0.5], dim=-1)
    return old, old + 0.3 * torch.randn(64, 6, generator=g)


def _reference_gaussian(params: torch.Tensor) -> td.Normal:
    mean, log_std = params.chunk(2, dim=-1)
    return td.Normal(mean, log_std.exp())


def test_categorical_matches_torch() -> None:
    dist = Categorical(5)
    old, new = _categorical_params()
    reference_old, reference_new = td.Categorical(logits=old), td.Categorical(logits=new)
    action = reference_old.sample()
    torch.testing.assert_close(dist.log_prob(old, action), reference_old.log_prob(action))
    torch.testing.assert_close(dist.entropy(old), reference_old.entropy())
    log_prob, entropy = dist.log_prob_entropy(old, action)
    torch.testing.assert_close(log_prob, reference_old.log_prob(action))
    torch.testing.assert_close(entropy, reference_old.entropy())
    torch.testing.assert_close(dist.kl(old, new), td.kl_divergence(reference_old, reference_new))
    assert dist.kl(old, old).abs().max() < 1e-6
    assert torch.equal(dist.mode(old), old.argmax(-1))


@pytest.mark.parametrize("nvec", [[3, 5, 2], [4, 4]])
def test_multi_categorical_matches_independent_torch_categoricals(nvec: list[int]) -> None:
    """Unequal components (padded table) and equal ones (a view) alike."""
    dist = MultiCategorical(nvec)
    g = torch.Generator().manual_seed(2)
    old = torch.randn(64, sum(nvec), generator=g) * 2
    new = old + torch.randn(64, sum(nvec), generator=g)
    references = [
        (td.Categorical(logits=o), td.Categorical(logits=n))
        for o, n in zip(old.split(nvec, -1), new.split(nvec, -1), strict=True)
    ]
    action = torch.stack([ref_old.sample() for ref_old, _ in references], dim=-1)
    log_prob = sum(ref_old.log_prob(action[:, k]) for k, (ref_old, _) in enumerate(references))
    entropy = sum(ref_old.entropy() for ref_old, _ in references)
    kl = sum(td.kl_divergence(ref_old, ref_new) for ref_old, ref_new in references)
    torch.testing.assert_close(dist.log_prob(old, action), log_prob)
    torch.testing.assert_close(dist.entropy(old), entropy)
    torch.testing.assert_close(dist.log_prob_entropy(old, action), (log_prob, entropy))
    torch.testing.assert_close(dist.kl(old, new), kl)
    assert dist.kl(old, old).abs().max() < 1e-6
    modes = torch.stack([part.argmax(-1) for part in old.split(nvec, -1)], dim=-1)
    assert torch.equal(dist.mode(old), modes)
    # Sampling never picks a pad: every component stays inside its own range.
    samples = dist.sample(old, dist.draw_noise((64,), CPU))
    assert samples.shape == (64, len(nvec))
    assert (samples < torch.tensor(nvec)).all() and (samples >= 0).all()


def test_gaussian_matches_torch() -> None:
    dist = DiagonalGaussian(3)
    old, new = _gaussian_params()
    reference_old, reference_new = _reference_gaussian(old), _reference_gaussian(new)
    action = reference_old.sample() * 2
    torch.testing.assert_close(dist.log_prob(old, action), reference_old.log_prob(action).sum(-1))
    torch.testing.assert_close(dist.entropy(old), reference_old.entropy().sum(-1))
    torch.testing.assert_close(dist.kl(old, new), td.kl_divergence(reference_old, reference_new).sum(-1))
    assert dist.kl(old, old).abs().max() < 1e-6
    torch.testing.assert_close(dist.mode(old), old[:, :3])


def test_gumbel_max_samples_follow_the_softmax() -> None:
    """Empirical frequencies of 200k draws (a fixed seed) within 4 standard errors of softmax."""
    dist = Categorical(4)
    logits = torch.tensor([1.5, 0.0, -1.0, 0.7])
    n = 200_000
    torch.manual_seed(0)
    actions = dist.sample(logits.expand(n, 4), dist.draw_noise((n,), CPU))
    frequencies = torch.bincount(actions, minlength=4).double() / n
    probs = logits.double().softmax(-1)
    standard_error = (probs * (1 - probs) / n).sqrt()
    assert ((frequencies - probs).abs() < 4 * standard_error).all(), (frequencies, probs)


def test_gaussian_samples_have_the_mean_and_std() -> None:
    dist = DiagonalGaussian(2)
    params = torch.tensor([0.5, -2.0, 0.0, -1.0])  # means 0.5, -2; stds 1, e^-1
    n = 200_000
    torch.manual_seed(0)
    actions = dist.sample(params.expand(n, 4), dist.draw_noise((n,), CPU))
    assert actions.shape == (n, 2)
    torch.testing.assert_close(actions.mean(0), torch.tensor([0.5, -2.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(actions.std(0), torch.tensor([1.0, 0.3679]), atol=0.005, rtol=0)


@pytest.mark.parametrize("family", ["categorical", "gaussian"])
def test_kl_gradient_vanishes_at_the_old_policy(family: str) -> None:
    """KL(pi_old || pi) has its minimum at pi = pi_old, so its gradient there is zero."""
    dist = Categorical(5) if family == "categorical" else DiagonalGaussian(3)
    old, _ = _categorical_params() if family == "categorical" else _gaussian_params()
    new = old.clone().requires_grad_(True)
    dist.kl(old, new).sum().backward()
    assert new.grad is not None and new.grad.abs().max() < 1e-5
