"""Curvature against brute force: dense Hessians of a tiny float64 transformer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from grokedge.edge.selection import ParameterSelector
from grokedge.experiments.curvature import (
    directional_curvature,
    directional_curvatures,
    finite_difference_curvature,
    flat_loss,
    hvp,
    paper_epsilon,
)
from grokedge.models import CausalTransformer

# torch.func's first forward-mode call scripts its decompositions (torch-internal warning).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

HVP_RTOL = 1e-5
FD_RTOL = 1e-4
IGNORE = -100
BATCH, LENGTH, CLASSES = 4, 6, 4


def tiny_net(dtype: torch.dtype = torch.float64) -> CausalTransformer:
    torch.manual_seed(0)
    net = CausalTransformer(
        vocab_size=3, num_classes=CLASSES, max_len=LENGTH, d_model=8, n_layers=1, n_heads=2, d_ff=16
    )
    return net.to(dtype)


def tiny_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 3, (BATCH, LENGTH), generator=g)
    labels = torch.randint(0, CLASSES, (BATCH, LENGTH), generator=g)
    labels[0, 4:] = IGNORE  # a padded row
    return {"tokens": tokens, "labels": labels, "weight": torch.ones(BATCH)}


def evaluate_params(net: torch.nn.Module):
    """A stand-in for ``GrokModule.evaluate`` (params dict, batch) -> .loss/.acc/.logits."""

    def evaluate(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        logits = functional_call(net, params, (batch["tokens"],), strict=False)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        valid = batch["labels"] != IGNORE
        acc = ((logits.argmax(-1) == batch["labels"]) & valid).sum() / valid.sum()
        return SimpleNamespace(loss=loss, acc=acc, logits=logits)

    return evaluate


@pytest.fixture(scope="module")
def setup():
    net = tiny_net()
    batch = tiny_batch()
    selector = ParameterSelector.from_module(net)  # the paper's attention weights
    params = {n: p.detach() for n, p in net.named_parameters()}
    evaluate = evaluate_params(net)

    def loss_of_selected(selected: dict[str, torch.Tensor]) -> torch.Tensor:
        return evaluate({**params, **selected}, batch).loss

    theta = selector.flatten(net)
    dense = torch.func.hessian(lambda x: loss_of_selected(selector.unflatten(x)))(theta)
    return SimpleNamespace(
        net=net,
        batch=batch,
        selector=selector,
        params=params,
        loss=loss_of_selected,
        theta=theta,
        hessian=dense,
        evaluate=evaluate,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def random_unit(p: int, seed: int) -> torch.Tensor:
    v = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def test_dense_hessian_is_a_hessian(setup):
    s = setup
    assert s.selector.p == 8 * 24 + 8 * 8  # in_proj_weight + out_proj.weight
    assert torch.allclose(s.hessian, s.hessian.T, atol=1e-12)
    # Independent route: reverse-over-reverse (double backward) H v.
    v = random_unit(s.selector.p, 0)
    x = s.theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s.loss(s.selector.unflatten(x)), x, create_graph=True)
    (hv,) = torch.autograd.grad(g @ v, x)
    assert rel_err(s.hessian @ v, hv) < 1e-10


def test_hvp_matches_dense_hessian(setup):
    s = setup
    for seed in range(2):
        v = random_unit(s.selector.p, seed)
        out = hvp(s.loss, s.selector.unflatten(s.theta), s.selector.unflatten(v))
        assert list(out) == list(s.selector.names)
        flat = torch.cat([out[n].reshape(-1) for n in s.selector.names])
        assert rel_err(flat, s.hessian @ v) < HVP_RTOL


def test_directional_curvature_matches_dense(setup):
    s = setup
    for seed in range(2):
        v = random_unit(s.selector.p, seed)
        expected = float(v @ s.hessian @ v)
        got = directional_curvature(s.loss, s.theta, v, s.selector.unflatten)
        assert abs(got - expected) <= HVP_RTOL * abs(expected)
        # The length of v does not matter: it is the curvature along its direction.
        assert directional_curvature(s.loss, s.theta, 7 * v, s.selector.unflatten) == (
            pytest.approx(got, rel=1e-12)
        )
    # Eigenvectors of the dense Hessian give its eigenvalues.
    evals, evecs = torch.linalg.eigh(s.hessian)
    top = evecs[:, [-1, 0]].T  # largest and smallest
    got = directional_curvatures(s.loss, s.theta, top, s.selector.unflatten)
    assert torch.allclose(got, evals[[-1, 0]], rtol=HVP_RTOL, atol=0)


def test_flat_loss_from_an_evaluate_closure(setup):
    """The callback path: evaluate(params, batch) + selector -> a flat loss, cast to float64."""
    s = setup
    net32 = tiny_net(torch.float32)
    loss32_as64 = flat_loss(evaluate_params(net32), s.selector, net32, s.batch, dtype=torch.float64)
    theta = s.selector.flatten(net32, dtype=torch.float64)  # = s.theta rounded to float32
    direct = s.loss(s.selector.unflatten(theta))
    assert float(loss32_as64(theta)) == pytest.approx(float(direct), rel=1e-6)
    # float64 all the way, through the closure: equals the dense reference at s.theta.
    loss64 = flat_loss(s.evaluate, s.selector, s.params, s.batch)
    v = random_unit(s.selector.p, 5)
    expected = float(v @ s.hessian @ v)
    assert directional_curvature(loss64, s.theta, v) == pytest.approx(expected, rel=HVP_RTOL)


def test_finite_difference_converges_to_exact(setup):
    s = setup
    v = random_unit(s.selector.p, 1)
    exact = float(v @ s.hessian @ v)
    flat = lambda x: s.loss(s.selector.unflatten(x))  # noqa: E731
    scale = float(s.theta.norm())
    errors = []
    for fraction in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3):
        fd = finite_difference_curvature(flat, s.theta, v, eps=fraction * scale)
        errors.append(abs(fd - exact) / abs(exact))
    # O(ε²) truncation: each step of ε ÷ ~3 cuts the error by ~10 (allow 5).
    for bigger, smaller in zip(errors, errors[1:], strict=False):
        assert smaller < bigger / 5
    assert errors[-1] < FD_RTOL
    # A center evaluated once and passed in (shared by directions) changes nothing.
    eps = 1e-3 * scale
    center = float(flat(s.theta))
    shared = finite_difference_curvature(flat, s.theta, v, eps=eps, center=center)
    assert shared == finite_difference_curvature(flat, s.theta, v, eps=eps)
    # The paper's default step (0.001 ‖θ_sel‖), and the dict form via unflatten.
    assert paper_epsilon(s.theta) == pytest.approx(1e-3 * scale)
    default = finite_difference_curvature(s.loss, s.theta, v, unflatten=s.selector.unflatten)
    assert abs(default - exact) / abs(exact) < FD_RTOL
