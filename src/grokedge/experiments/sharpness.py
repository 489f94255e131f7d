"""The Hessian's top eigenvalues (sharpness) and their eigenvectors' overlap with the edge.

Sharpness is the largest eigenvalue λ₁ of the loss Hessian H at θ (loss units per squared
parameter unit, like :mod:`grokedge.experiments.curvature`). The selected parameters run
to millions, so H (p × p) is never formed: ARPACK's implicitly restarted Lanczos
(``scipy.sparse.linalg.eigsh``, ``which="LA"``: largest algebraic) needs H only through
products H·v, each an exact forward-over-reverse Hessian-vector product (``torch.func``
``jvp(grad(f))``, :func:`grokedge.experiments.curvature.hvp`) that costs about two or three
gradients and no p × p memory. For the top k ≤ 5 eigenpairs ARPACK keeps
ncv = max(2k + 1, 20) Lanczos vectors (ncv · p float64 numbers) and typically converges in
a few dozen HVPs (up to about a hundred when the top eigenvalues are close together).

:func:`edge_hessian_overlap` then says how much of the spectral edge v₁ (a direction in
the same parameter space) lies in each top curvature direction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from grokedge.checks import check_float, check_int, check_optional_int, not_allowed
from grokedge.experiments.curvature import hvp as dict_hvp

_KEY = "theta"  # the single entry of the dict that curvature.hvp differentiates


def flat_hvp(loss_fn: Callable[[Tensor], Tensor], theta: Tensor) -> Callable[[Tensor], Tensor]:
    """``v [p] -> H v [p]``: the exact Hessian-vector product of ``loss_fn`` at ``theta``.

    Args:
        loss_fn: flat parameters [p] -> scalar loss (e.g. :func:`curvature.flat_loss`),
            differentiable under ``torch.func`` transforms.
        theta: [p] the point (detached here; its dtype and device are those of the HVP).
    Returns:
        A function of v [p] (cast to ``theta``'s dtype; same device) returning H v [p] in
        loss units per squared parameter unit times v's units.
    """
    if theta.ndim != 1:
        raise not_allowed("theta.shape", list(theta.shape), "a flat vector [p]")
    point = {_KEY: theta.detach()}

    def dict_loss(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(params[_KEY])

    def matvec(v: Tensor) -> Tensor:
        if v.shape != theta.shape:
            raise not_allowed("v.shape", list(v.shape), f"the shape of theta, {list(theta.shape)}")
        return dict_hvp(dict_loss, point, {_KEY: v})[_KEY]

    return matvec


def top_hessian_eigenpairs(
    hvp: Callable[[Tensor], Tensor],
    theta: Tensor,
    k: int,
    *,
    tol: float,
    max_iter: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The k largest (algebraic) Hessian eigenvalues and their eigenvectors, by Lanczos.

    Only ``hvp`` is called (once per Lanczos step, with a vector [p] of ``theta``'s dtype
    and device); the Hessian is never materialised. ARPACK works in float64 numpy, so a
    float32 ``hvp`` limits the attainable accuracy to float32's.

    Args:
        hvp: v [p] -> H v [p] (e.g. :func:`flat_hvp`).
        theta: [p] the point; only its size, dtype and device are used.
        k: how many eigenpairs, 1 <= k < p (ARPACK needs k < p).
        tol: ARPACK's relative accuracy of the Ritz values (0: machine precision).
        max_iter: ARPACK's limit on restarts (None: its default, 10 · p).
        seed: seeds the Lanczos start vector v0 (standard normal [p]), so that a call
            is deterministic.
    Returns:
        (eigenvalues [k] float64, descending, in loss units per squared parameter unit;
        eigenvectors [p, k] float64 on the CPU, unit-norm orthogonal columns, column i
        belonging to eigenvalue i, each with an arbitrary sign).
    Raises:
        ValueError naming the argument for a bad k, tol, max_iter or seed, or when ``hvp``
        returns a non-finite or wrongly shaped vector; scipy's ``ArpackNoConvergence``
        when ``max_iter`` restarts do not reach ``tol``.
    """
    if theta.ndim != 1:
        raise not_allowed("theta.shape", list(theta.shape), "a flat vector [p]")
    p = theta.numel()
    check_int("k", k, 1, p - 1)
    check_float("tol", tol, minimum=0.0)
    check_optional_int("max_iter", max_iter, 1)
    check_int("seed", seed, 0)

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        hv = hvp(v.to(dtype=theta.dtype, device=theta.device)).detach()
        if hv.shape != (p,):
            raise not_allowed("hvp(v).shape", list(hv.shape), f"[{p}] like theta")
        out = hv.to(device="cpu", dtype=torch.float64).numpy()
        if not np.isfinite(out).all():
            raise not_allowed("hvp(v)", "non-finite values", "a finite Hessian-vector product")
        return out

    operator = LinearOperator((p, p), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(p)
    values, vectors = eigsh(operator, k=k, which="LA", tol=tol, maxiter=max_iter, v0=v0)
    order = np.argsort(values)[::-1]  # ARPACK returns them ascending
    eigenvalues = torch.from_numpy(np.ascontiguousarray(values[order]))
    eigenvectors = torch.from_numpy(np.ascontiguousarray(vectors[:, order]))
    # ARPACK's Ritz vectors are unit-norm to round-off; renormalise so overlaps stay in [0, 1].
    eigenvectors = eigenvectors / torch.linalg.vector_norm(eigenvectors, dim=0, keepdim=True)
    return eigenvalues, eigenvectors


def edge_hessian_overlap(eigenvectors: Tensor, direction: Tensor) -> Tensor:
    """[k] float64: cos²(direction, eigenvector i), the share of the unit direction's squared
    length along each Hessian eigenvector (in [0, 1]; sign-free, since eigenvectors have an
    arbitrary sign).

    Args:
        eigenvectors: [p, k] one eigenvector per column (normalised here as well).
        direction: [p] e.g. the update edge v₁ (normalised here; any nonzero length).
    Returns:
        [k] float64 on ``eigenvectors``' device. Their sum is <= 1 for orthonormal columns,
        with equality when the direction lies in their span.
    """
    if eigenvectors.ndim != 2 or eigenvectors.shape[1] < 1:
        raise not_allowed("eigenvectors.shape", list(eigenvectors.shape), "[p, k] with k >= 1")
    p = eigenvectors.shape[0]
    if direction.shape != (p,):
        raise not_allowed("direction.shape", list(direction.shape), f"[{p}] like eigenvectors")
    basis = eigenvectors.detach().to(torch.float64)
    d = direction.detach().to(device=basis.device, dtype=torch.float64)
    d_norm = torch.linalg.vector_norm(d)
    if not bool(torch.isfinite(d_norm)) or float(d_norm) == 0.0:
        raise not_allowed("direction", f"norm {float(d_norm)}", "a finite nonzero vector")
    col_norms = torch.linalg.vector_norm(basis, dim=0)
    if not bool(torch.all(col_norms > 0)):
        raise not_allowed("eigenvectors", "a zero column", "nonzero columns")
    cosines = (d / d_norm) @ basis / col_norms
    return cosines.square().clamp(0.0, 1.0)  # clamp: round-off only
