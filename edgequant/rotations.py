"""Orthogonal transforms and how to fold them into a Llama-style model without changing its function.

Building blocks (all float64, row-vector convention: a transform ``M`` maps ``x`` to ``x @ M``):

* :func:`hadamard`: an orthonormal Hadamard matrix of order n, from Sylvester doubling and
  Paley's construction (order q + 1 for a prime q = 3 mod 4): 64, 576 = 8 * 72, 1536 = 128 * 12.
* :func:`householder`: the reflection ``I - 2 w w^T / w^T w``; :func:`reflection_onto` picks
  ``w`` so that a vector lands on a target of the same length.
* :func:`givens_onto`: 2x2 rotations on coordinate pairs (0,1), (2,3)..., each turning one
  pair of a vector onto the same pair of a target.

Where a transform goes (the model must be untied and norm-folded first, :func:`prepare`):

* the residual stream, ``h -> h @ M``: the embedding rows, every matrix reading the stream
  (q/k/v, gate/up, the output head: ``W -> W @ M``) and every matrix writing it (o, down:
  ``W -> M^T @ W``). RMSNorm without a weight commutes with an orthogonal ``M``.
* the value heads, one ``M_g`` per KV group: the rows of v for that group (``W_v -> M_g^T W_v``)
  and o's columns of every query head reading it (``W_o[:, h] -> W_o[:, h] @ M_g``).
* the input of down: SwiGLU is not linear, so this one stays *online* (applied to the
  activations at run time); llama.cpp cannot run it, so it exists in the simulation only.

A method may also choose to keep transforms online that could be folded: RUQuant's published
placement gives every input site of every block its own transform (see
:mod:`edgequant.methods.ruquant`); that too is simulated, and builds ship the folded placement.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .adapters import adapter, adapter_of
from .smoothing import kv_grouping


# --- matrices ------------------------------------------------------------------------------------


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _paley(order: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    q = order - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if k in residues else -1 for k in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # skew-symmetric since q = 3 mod 4
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(order, dtype=torch.float64)


@lru_cache(maxsize=None)
def _hadamard_pm1(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order n, or None when these two constructions cannot make one."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0 and (half := _hadamard_pm1(n // 2)) is not None:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley(n)
    return None


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order ``n`` (entries +-1/sqrt(n))."""
    h = _hadamard_pm1(n)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester and Paley constructions")
    return h / n**0.5


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """QuaRot's randomised Hadamard: random signs on the rows, then the Hadamard matrix."""
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return signs[:, None] * hadamard(n)


def householder(w: torch.Tensor) -> torch.Tensor:
    """``I - 2 w w^T / (w^T w)``: symmetric, orthogonal, its own inverse."""
    w = w.double()
    return torch.eye(len(w), dtype=torch.float64) - 2 * torch.outer(w, w) / w.dot(w).clamp(min=1e-30)


def reflection_onto(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The Householder vector sending ``u`` to ``t`` (rescaled to ``u``'s length)."""
    t = t.double() * (u.double().norm() / t.double().norm().clamp(min=1e-30))
    return u.double() - t


def pair_angles(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per coordinate pair (2i, 2i+1), the angle turning ``u``'s pair to the direction of ``t``'s."""
    u, t = u.double().reshape(-1, 2), t.double().reshape(-1, 2)
    return torch.atan2(t[:, 1], t[:, 0]) - torch.atan2(u[:, 1], u[:, 0])


def turn_pairs(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``G @ x`` for the block-diagonal Givens rotations ``G`` of ``angle``, without forming ``G``."""
    pairs = x.reshape(len(angle), 2, -1)
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    return torch.stack([c * pairs[:, 0] - s * pairs[:, 1], s * pairs[:, 0] + c * pairs[:, 1]], 1).reshape(x.shape)


def givens_onto(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Block-diagonal 2x2 rotations (as a matrix ``G``, ``G @ u``) turning each pair
    ``(u[2i], u[2i+1])`` to the direction of ``(t[2i], t[2i+1])``."""
    return turn_pairs(torch.eye(len(u), dtype=torch.float64), pair_angles(u, t))


def reflect(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``householder(w) @ x`` as a rank-1 update."""
    return x - 2 * torch.outer(w, w @ x) / w.dot(w).clamp(min=1e-30)


def block_diagonal(r: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return torch.block_diag(*[r] * n_blocks)


def is_orthogonal(m: torch.Tensor, tol: float = 1e-9) -> bool:
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    return bool((m @ m.T - eye).abs().max() < tol)


# --- folding into the model ----------------------------------------------------------------------


@torch.no_grad()
def untie(model) -> None:
    """Give the output head its own copy of the embedding (a rotation treats the two differently)."""
    if model.config.tie_word_embeddings:
        family = adapter_of(model)
        family.head(model).weight = torch.nn.Parameter(family.embedding(model).weight.detach().clone())
        model.config.tie_word_embeddings = False


@torch.no_grad()
def fold_norms(model) -> None:
    """Move every RMSNorm's weight into the matrices it feeds; the norms become plain x / rms(x)."""
    family = adapter_of(model)
    for layer in family.layers(model):
        for g in family.residual_groups:
            _fold_norm(family.module(layer, g.into), [family.module(layer, c) for c in g.consumers])
    _fold_norm(family.final_norm(model), [family.head(model)])


def _fold_norm(norm, linears) -> None:
    gamma = norm.weight.double()
    for lin in linears:
        lin.weight.copy_(lin.weight.double() * gamma)
    norm.weight.fill_(1.0)


def prepare(model) -> None:
    """Untie and fold the norms: the model can then take residual rotations."""
    untie(model)
    fold_norms(model)


def readers(model) -> list[torch.nn.Linear]:
    """Every matrix that reads the residual stream (through a weightless norm)."""
    family = adapter_of(model)
    return [lin for layer in family.layers(model) for lin in family.readers(layer)] + [family.head(model)]


@torch.no_grad()
def rotate_residual(model, m: torch.Tensor) -> None:
    """``h -> h @ m`` everywhere on the residual stream (after :func:`prepare`)."""
    family = adapter_of(model)
    emb = family.embedding(model).weight
    emb.copy_(emb.double() @ m)
    for lin in readers(model):
        lin.weight.copy_(lin.weight.double() @ m)
    for layer in family.layers(model):
        for lin in family.writers(layer):
            lin.weight.copy_(m.T @ lin.weight.double())
            if lin.bias is not None:
                lin.bias.copy_(lin.bias.double() @ m)


@torch.no_grad()
def rotate_value_heads(layer, config, per_group: list[torch.Tensor]) -> None:
    """Each KV group's value vectors ``v -> v @ M_g``; o's columns undo it per query head."""
    group, head_dim = kv_grouping(config)
    family = adapter(config.model_type)
    v, o = family.module(layer, "v"), family.module(layer, "o")
    for g, m in enumerate(per_group):
        rows = slice(g * head_dim, (g + 1) * head_dim)
        v.weight[rows] = m.T @ v.weight[rows].double()
        if v.bias is not None:
            v.bias[rows] = v.bias[rows].double() @ m
        for h in range(g * group, (g + 1) * group):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            o.weight[:, cols] = o.weight[:, cols].double() @ m
