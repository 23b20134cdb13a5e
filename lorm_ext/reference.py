"""The specification: pure-PyTorch reference of every quantity lorm_ext computes.

Short and literal on purpose, float64-capable, no streaming and no cleverness; the fused ops and the mergers
are tested against these functions. Notation (README.md, "What it computes"), per linear layer W0 (out × in):
LoRA update ΔW = B A with B (out × r) and A (r × in); client k has a Gram G_k = X_kᵀ X_k (in × in), or only
its diagonal (a vector of length in), and G = Σ_k G_k. M⁺ is the Moore–Penrose pseudo-inverse.

Singular Grams. Every solve is M G⁺ with G⁺ exactly as ``torch.pinverse(G, rcond)`` computes it (the
authors' solver): singular values at or below rcond·σ_max count as zero, with rcond = 1e-15 by default.
Dead features (all-zero columns), fewer tokens than features and diagonal Grams with zero entries are all
covered: the merged weights then have no component along the directions no client's data reaches.
Solves run in float64 unless the caller asks otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_RCOND = 1e-15


def gram_ref(x: Tensor, gram: Tensor | None = None, *, diagonal: bool = False, dtype=torch.float32) -> Tensor:
    """gram + XᵀX for X of shape (..., in), upcast to ``gram``'s dtype (or ``dtype`` for a new Gram).

    ``diagonal=True`` gives only the diagonal: the column sums of squares, a vector of length in.
    """
    dtype = gram.dtype if gram is not None else dtype
    xs = x.reshape(-1, x.shape[-1]).to(dtype)
    update = (xs * xs).sum(0) if diagonal else xs.T @ xs
    return update if gram is None else gram + update


def shrink_gram_ref(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G): α = 1 keeps G, α = 0 keeps only its diagonal (a diagonal Gram is unchanged)."""
    if gram.dim() == 1:
        return gram.clone()
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def pinv_ref(gram: Tensor, rcond: float = DEFAULT_RCOND) -> Tensor:
    """G⁺ as torch.pinverse computes it; for a diagonal Gram (a vector) the vector of inverted entries."""
    if gram.dim() == 1:
        keep = gram.abs() > rcond * gram.abs().max()
        return torch.where(keep, 1 / gram, torch.zeros_like(gram))
    return torch.pinverse(gram, rcond=rcond)


def right_solve_ref(rhs: Tensor, gram: Tensor, rcond: float = DEFAULT_RCOND) -> Tensor:
    """rhs G⁺ for one layer; G full (n × n) or diagonal (n)."""
    inverse = pinv_ref(gram, rcond)
    return rhs * inverse if gram.dim() == 1 else rhs @ inverse


def times_gram_ref(m: Tensor, gram: Tensor) -> Tensor:
    """m G for a full or diagonal Gram."""
    return m * gram if gram.dim() == 1 else m @ gram


def _sum_over_clients(tensors: Sequence[Tensor], dtype) -> Tensor:
    if len(tensors) == 0:
        raise ValueError("no clients to merge")
    return torch.stack([t.to(dtype) for t in tensors]).sum(0)


def regmean_ref(
    weights: Sequence[Tensor], grams: Sequence[Tensor], *, rcond: float = DEFAULT_RCOND, dtype=torch.float64
) -> Tensor:
    """RegMean: W = (Σ_k W_k G_k) G⁺. Also the LoRM A-step with B shared (W_k = A_k)."""
    rhs = _sum_over_clients([times_gram_ref(w.to(dtype), g.to(dtype)) for w, g in zip(weights, grams)], dtype)
    return right_solve_ref(rhs, _sum_over_clients(grams, dtype), rcond)


def a_step_ref(
    As: Sequence[Tensor],
    grams: Sequence[Tensor],
    *,
    Bs: Sequence[Tensor] | None = None,
    shared_b: Tensor | None = None,
    rcond: float = DEFAULT_RCOND,
    dtype=torch.float64,
) -> Tensor:
    """LoRM A-step. With B shared by all clients: A = (Σ_k A_k G_k) G⁺.

    With per-client B_k (``Bs``) and the server's B (``shared_b``):
    A = (BᵀB)⁺ Bᵀ (Σ_k B_k A_k G_k) G⁺, the minimiser over A of Σ_k ‖X_k (B A − B_k A_k)ᵀ‖².
    """
    if Bs is None:
        return regmean_ref(As, grams, rcond=rcond, dtype=dtype)
    if shared_b is None:
        raise ValueError("the general A-step needs the server's shared_b")
    products = [b.to(dtype) @ a.to(dtype) for b, a in zip(Bs, As)]
    merged = regmean_ref(products, grams, rcond=rcond, dtype=dtype)
    b = shared_b.to(dtype)
    return torch.pinverse(b.T @ b, rcond=rcond) @ b.T @ merged


def b_step_ref(
    Bs: Sequence[Tensor],
    shared_a: Tensor,
    grams: Sequence[Tensor],
    *,
    rcond: float = DEFAULT_RCOND,
    dtype=torch.float64,
) -> Tensor:
    """LoRM B-step with A shared: B = (Σ_k B_k P_k)(Σ_k P_k)⁺, P_k = A G_k Aᵀ (r × r, never out × in)."""
    a = shared_a.to(dtype)
    projections = [times_gram_ref(a, g.to(dtype)) @ a.T for g in grams]
    weighted = _sum_over_clients([b.to(dtype) @ p for b, p in zip(Bs, projections)], dtype)
    return right_solve_ref(weighted, _sum_over_clients(projections, dtype), rcond)


def cross_task_ref(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    grams: Sequence[Tensor],
    *,
    rcond: float = DEFAULT_RCOND,
    dtype=torch.float64,
) -> Tensor:
    """Merge across tasks t: ΔW = (Σ_t B_t A_t G_t)(Σ_t G_t)⁺."""
    return regmean_ref([b.to(dtype) @ a.to(dtype) for b, a in zip(Bs, As)], grams, rcond=rcond, dtype=dtype)


def gram_and_product_sums_ref(Bs: Sequence[Tensor], As: Sequence[Tensor], grams: Sequence[Tensor], dtype):
    """G = Σ_k G_k and N = Σ_k B_k A_k G_k: all an adapter merge needs to know about the clients."""
    products = [times_gram_ref(b.to(dtype) @ a.to(dtype), g.to(dtype)) for b, a, g in zip(Bs, As, grams)]
    return _sum_over_clients(grams, dtype), _sum_over_clients(products, dtype)


def objective_ref(delta: Tensor, deltas: Sequence[Tensor], grams: Sequence[Tensor], dtype=torch.float64) -> Tensor:
    """Σ_k tr((ΔW − ΔW_k) G_k (ΔW − ΔW_k)ᵀ) = Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖²_F."""
    total = torch.zeros((), dtype=dtype)
    for d_k, g in zip(deltas, grams):
        diff = delta.to(dtype) - d_k.to(dtype)
        total = total + (times_gram_ref(diff, g.to(dtype)) * diff).sum()
    return total


def rank_r_optimum_ref(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    grams: Sequence[Tensor],
    rank: int,
    *,
    rcond: float = DEFAULT_RCOND,
    dtype=torch.float64,
) -> tuple[Tensor, Tensor]:
    """Exact minimiser of Σ_k ‖X_k (B A − B_k A_k)ᵀ‖² over rank-``rank`` products B A.

    With G = L Lᵀ and M = (Σ_k B_k A_k G_k) G⁺ the RegMean solution, B A = [M L]_r L⁺ (truncated SVD).
    L = U Λ^½ on the positive eigenvalues above rcond·λ_max. Returned factors: B = U_r S_r (out × rank) and
    A = V_rᵀ L⁺ (rank × in), so A G Aᵀ = I.
    """
    G, N = gram_and_product_sums_ref(Bs, As, grams, dtype)
    eigenvalues, eigenvectors = (G, None) if G.dim() == 1 else torch.linalg.eigh(G)
    keep = eigenvalues > rcond * eigenvalues.abs().max()
    root_inv = torch.where(keep, eigenvalues.clamp_min(0).rsqrt(), torch.zeros_like(eigenvalues))
    # M L = N G⁺ L = N U Λ^-½; L⁺ = Λ^-½ Uᵀ (eigenvectors are the identity for a diagonal Gram).
    if eigenvectors is None:
        ML, L_pinv = N * root_inv, torch.diag(root_inv)
    else:
        ML, L_pinv = (N @ eigenvectors) * root_inv, root_inv[:, None] * eigenvectors.T
    U, S, Vh = torch.linalg.svd(ML, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank] @ L_pinv


def merge_adapters_ref(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    grams: Sequence[Tensor],
    rank: int,
    *,
    init_a: Tensor | None = None,
    max_iters: int = 500,
    tol: float = 1e-12,
    rcond: float = DEFAULT_RCOND,
    dtype=torch.float64,
) -> tuple[Tensor, Tensor, list[float]]:
    """Merge adapters of any ranks into one rank-``rank`` adapter by alternating exact B- and A-steps.

    Each step minimises Σ_k ‖X_k (B A − B_k A_k)ᵀ‖² over one factor, the other fixed:
    B-step B = (Σ_k B_k A_k G_k Aᵀ)(A G Aᵀ)⁺, A-step A = (BᵀB)⁺ Bᵀ (Σ_k B_k A_k G_k) G⁺. The objective never
    increases; iteration stops when it decreases by less than tol·objective. Default start: the top
    right singular vectors of Σ_k B_k A_k G_k. Returns B, A and the objective after each A-step.
    """
    G, N = gram_and_product_sums_ref(Bs, As, grams, dtype)
    deltas = [b.to(dtype) @ a.to(dtype) for b, a in zip(Bs, As)]
    regmean = right_solve_ref(N, G, rcond)
    A = torch.linalg.svd(N, full_matrices=False)[2][:rank] if init_a is None else init_a.to(dtype)
    history: list[float] = []
    for _ in range(max_iters):
        B = right_solve_ref(N @ A.T, times_gram_ref(A, G) @ A.T, rcond)
        A = torch.pinverse(B.T @ B, rcond=rcond) @ B.T @ regmean
        history.append(objective_ref(B @ A, deltas, grams, dtype).item())
        if len(history) > 1 and history[-2] - history[-1] <= tol * abs(history[-2]):
            break
    return B, A, history
