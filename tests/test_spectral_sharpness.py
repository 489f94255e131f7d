"""Lanczos sharpness against brute force: the dense Hessian of a tiny float64 MLP."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from grokedge.experiments.sharpness import (
    edge_hessian_overlap,
    flat_hvp,
    top_hessian_eigenpairs,
)

# torch.func's first forward-mode call scripts its decompositions (torch-internal warning).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

ATOL = 1e-5
LANCZOS_TOL = 1e-12
N_IN, N_HIDDEN, N_OUT, N_ROWS = 3, 6, 3, 16
SHAPES = [(N_HIDDEN, N_IN), (N_HIDDEN,), (N_OUT, N_HIDDEN), (N_OUT,)]
P = sum(torch.Size(s).numel() for s in SHAPES)  # 45 parameters


LossFn = Callable[[torch.Tensor], torch.Tensor]


def mlp_loss() -> tuple[torch.Tensor, LossFn]:
    """A random point θ [P] and the cross-entropy of a tanh MLP on fixed data, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ROWS, N_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_OUT, (N_ROWS,), generator=g)
    theta = torch.randn(P, generator=g, dtype=torch.float64)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for shape in SHAPES:
            n = torch.Size(shape).numel()
            parts.append(flat[start : start + n].reshape(shape))
            start += n
        w1, b1, w2, b2 = parts
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    return theta, loss


def dense_spectrum(theta: torch.Tensor, loss: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the materialised Hessian."""
    h = hessian(loss)(theta)
    values, vectors = torch.linalg.eigh((h + h.T) / 2)
    return values.flip(0), vectors.flip(1)


def test_flat_hvp_is_the_dense_hessian_times_v():
    theta, loss = mlp_loss()
    h = hessian(loss)(theta)
    v = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(flat_hvp(loss, theta)(v), h @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenpairs_match_the_dense_eigendecomposition(k: int):
    theta, loss = mlp_loss()
    dense_values, dense_vectors = dense_spectrum(theta, loss)
    # The eigenvectors are only defined up to sign when the top k + 1 eigenvalues are distinct.
    assert float((dense_values[:k] - dense_values[1 : k + 1]).min()) > 1e-3
    values, vectors = top_hessian_eigenpairs(flat_hvp(loss, theta), theta, k, tol=LANCZOS_TOL)
    assert values.dtype == vectors.dtype == torch.float64
    assert values.shape == (k,) and vectors.shape == (P, k)
    torch.testing.assert_close(values, dense_values[:k], rtol=0, atol=ATOL)
    torch.testing.assert_close(vectors.norm(dim=0), torch.ones(k, dtype=torch.float64))
    same_direction = (vectors.T @ dense_vectors[:, :k]).diagonal().abs()
    torch.testing.assert_close(
        same_direction, torch.ones(k, dtype=torch.float64), atol=ATOL, rtol=0
    )


def test_overlaps_match_dense_eigenvectors_and_brute_force_cosines():
    theta, loss = mlp_loss()
    k = 3
    _, dense_vectors = dense_spectrum(theta, loss)
    _, vectors = top_hessian_eigenpairs(flat_hvp(loss, theta), theta, k, tol=LANCZOS_TOL)
    direction = torch.randn(P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # Mostly along the second eigenvector, so the overlaps are not all small.
    direction = direction + 10 * dense_vectors[:, 1]
    overlap = edge_hessian_overlap(vectors, 7.5 * direction)
    cos2 = [
        (float(direction @ dense_vectors[:, i]) / float(direction.norm())) ** 2 for i in range(k)
    ]
    torch.testing.assert_close(overlap, torch.tensor(cos2, dtype=torch.float64), atol=ATOL, rtol=0)
    assert float(overlap[1]) > 0.5
    # A direction inside the span: overlaps sum to one; an eigenvector: a one-hot.
    inside = edge_hessian_overlap(vectors, vectors @ torch.tensor([1.0, -2.0, 0.5]).double())
    assert float(inside.sum()) == pytest.approx(1.0, abs=1e-12)
    one_hot = edge_hessian_overlap(vectors, -vectors[:, 2])
    torch.testing.assert_close(one_hot, torch.tensor([0.0, 0.0, 1.0]).double(), atol=1e-12, rtol=0)


def test_lanczos_only_calls_the_matvec_far_fewer_than_p_times():
    """A diagonal operator with a known spectrum, p = 2000: H is reachable only through hvp."""
    p, k = 2000, 4
    diagonal = torch.linspace(-1.0, 1.0, p, dtype=torch.float64)
    diagonal[:k] = torch.tensor([9.0, 7.0, 5.0, 3.0], dtype=torch.float64)
    calls: list[torch.Size] = []

    def hvp(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape)
        return diagonal * v

    theta = torch.zeros(p, dtype=torch.float64)
    values, vectors = top_hessian_eigenpairs(hvp, theta, k, tol=LANCZOS_TOL)
    torch.testing.assert_close(values, diagonal[:k], atol=1e-9, rtol=0)
    torch.testing.assert_close(
        vectors[:k].abs(), torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert set(calls) == {torch.Size([p])}
    assert len(calls) < p // 10


def test_float32_theta_gets_float32_vectors_and_is_deterministic():
    theta64, loss = mlp_loss()
    theta = theta64.float()
    seen: set[torch.dtype] = set()
    inner = flat_hvp(lambda t: loss(t.double()), theta)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        seen.add(v.dtype)
        return inner(v)

    first = top_hessian_eigenpairs(hvp, theta, 2, tol=1e-8, seed=4)
    second = top_hessian_eigenpairs(hvp, theta, 2, tol=1e-8, seed=4)
    assert seen == {torch.float32}
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    dense_values, _ = dense_spectrum(theta64, loss)
    torch.testing.assert_close(first[0], dense_values[:2], atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [0, P, P + 1, True, 1.0])
def test_bad_k_names_k(k: object):
    theta, loss = mlp_loss()
    with pytest.raises(ValueError, match=r"^k="):
        top_hessian_eigenpairs(flat_hvp(loss, theta), theta, k, tol=1e-6)


def test_bad_tol_and_max_iter_and_hvp_output_are_named():
    theta, loss = mlp_loss()
    hvp = flat_hvp(loss, theta)
    with pytest.raises(ValueError, match=r"^tol="):
        top_hessian_eigenpairs(hvp, theta, 1, tol=-1.0)
    with pytest.raises(ValueError, match=r"^max_iter="):
        top_hessian_eigenpairs(hvp, theta, 1, tol=1e-6, max_iter=0)
    with pytest.raises(ValueError, match=r"^hvp\(v\)="):
        top_hessian_eigenpairs(lambda v: v * float("nan"), theta, 1, tol=1e-6)
    with pytest.raises(ValueError, match=r"^v.shape="):
        hvp(torch.ones(P + 1, dtype=torch.float64))


def test_overlap_rejects_zero_direction_and_shape_mismatch():
    vectors = torch.eye(5, dtype=torch.float64)[:, :2]
    with pytest.raises(ValueError, match=r"^direction="):
        edge_hessian_overlap(vectors, torch.zeros(5))
    with pytest.raises(ValueError, match=r"^direction.shape="):
        edge_hessian_overlap(vectors, torch.ones(4))
    with pytest.raises(ValueError, match=r"^eigenvectors.shape="):
        edge_hessian_overlap(torch.ones(5), torch.ones(5))
