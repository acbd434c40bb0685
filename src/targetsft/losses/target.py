"""The structured target and the one kernel that turns it into a loss and a logit gradient.

Every method is cross-entropy against a per-token target ``Q = γ·onehot(y) + (1 − γ)·π̃`` held constant
(stop-gradient), so for each token ``loss = −Σ_a Q(a) log p(a)`` and ``∂loss/∂z = p − Q``.

A dense ``Q`` would be as large as the logits, so residuals are kept in a structured form
(:class:`Residual`): ``π̃ = s·p + u/V + dense + scatter(ids, values)``. A teacher given as top-k with its tail
completed in proportion to the student is then a scaled copy of ``p`` plus ``k`` sparse corrections, and its
gradient costs no more than plain cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

# Tail masses below this are summed over the masked row instead of as 1 − Σ_ids p (see TokenState.tail).
TAIL_EXACT_BELOW = 0.25


@dataclass
class Distribution:
    """A next-token distribution for a block of rows: dense logits ``[n, V]`` or top-k ``(ids, logprobs)``."""

    logits: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    missing: Tensor | None = None  # bool [n]: top-k rows with no distribution (ids −1): the student's own stands in

    @property
    def is_topk(self) -> bool:
        return self.topk_ids is not None

    def rows(self, index: Tensor | slice) -> Distribution:
        """The same distribution restricted to some rows."""
        if self.is_topk:
            missing = None if self.missing is None else self.missing[index]
            return Distribution(topk_ids=self.topk_ids[index], topk_logprobs=self.topk_logprobs[index], missing=missing)
        return Distribution(logits=self.logits[index])


@dataclass
class TokenState:
    """What every label-trust rule and residual may read for a block of ``n`` tokens.

    ``logp`` holds the student's log-probabilities ``log softmax(z)`` ``[n, V]`` in the compute dtype; ``p``, when
    given, is ``exp(logp)`` already computed (read-only until the rules and residuals are done with the state).
    """

    logp: Tensor
    labels: Tensor
    teacher: Distribution | None = None
    ref: Distribution | None = None
    token_weights: Tensor | None = None
    p: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def probs(self) -> Tensor:
        """``p = exp(logp)`` ``[n, V]``: the given one, else computed (not cached: callers use it once)."""
        return self.p if self.p is not None else self.logp.exp()

    @property
    def vocab_size(self) -> int:
        return self.logp.shape[-1]

    @property
    def logp_y(self) -> Tensor:
        """``log p_θ(y)`` per token ``[n]``."""
        if "logp_y" not in self._cache:
            self._cache["logp_y"] = self.logp.gather(-1, self.labels[:, None]).squeeze(-1)
        return self._cache["logp_y"]

    @property
    def p_y(self) -> Tensor:
        """``p_θ(y)`` per token ``[n]``."""
        return self.logp_y.exp()

    @property
    def ref_logp_y(self) -> Tensor:
        """``log π_ref(y)`` per token ``[n]`` from the reference's full logits (a top-k reference cannot give the
        probability of a label outside its ids, so it is refused)."""
        if "ref_logp_y" not in self._cache:
            if self.ref is None or self.ref.is_topk:
                raise ValueError("this method needs the reference's full logits (ref_logits), not a top-k form")
            ref = torch.log_softmax(self.ref.logits.to(self.logp.dtype), dim=-1)
            self._cache["ref_logp_y"] = ref.gather(-1, self.labels[:, None]).squeeze(-1)
        return self._cache["ref_logp_y"]

    def plogp(self) -> Tensor:
        """``Σ_a p(a)·log p(a)`` per row ``[n]`` (cached: the loss, the tail sums and the entropy statistic read
        it)."""
        if "plogp" not in self._cache:
            self._cache["plogp"] = _rowdot(self.probs(), self.logp)
        return self._cache["plogp"]

    def tail(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Over the tokens *not* in ``ids`` ``[n, k]``: ``log Σ p`` and ``Σ p·log p`` per row.

        ``1 − Σ_ids p`` cancels when the ids hold nearly all the mass, so rows whose tail holds less than
        ``TAIL_EXACT_BELOW`` are summed directly over the masked row (one extra pass over those rows only).
        """
        key = ("tail", id(ids))
        if key not in self._cache:
            lp = self.logp.gather(-1, ids)
            log_mass = torch.log((-torch.expm1(torch.logsumexp(lp, -1).clamp(max=0.0))).clamp(min=0.0))
            plogp = self.plogp() - (lp.exp() * lp).sum(-1)
            rows = (log_mass < math.log(TAIL_EXACT_BELOW)).nonzero().squeeze(-1)
            if rows.numel():
                masked = self.logp[rows].scatter(-1, ids[rows], torch.finfo(lp.dtype).min)
                row_mass = torch.logsumexp(masked, -1)
                log_mass = log_mass.index_put((rows,), row_mass)
                plogp = plogp.index_put((rows,), _rowdot(masked.exp(), masked))
            no_tail = log_mass < math.log(torch.finfo(lp.dtype).tiny)  # empty or underflowing tail (e.g. k = V)
            self._cache[key] = (log_mass.masked_fill(no_tail, float("-inf")), plogp.masked_fill(no_tail, 0.0))
        return self._cache[key]


_ROWDOT_COLUMNS = 8192


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_j a[i, j]·b[i, j]`` per row, to the rounding of ``a``'s dtype: blocks of 8,192 columns multiplied and summed
    by torch's pairwise reduction in float64, so no ``[n, V]`` temporary (a ``bmm`` row dot accumulates 49k terms in
    one float32 register: 1e-3 relative error on peaked rows)."""
    out = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[-1], _ROWDOT_COLUMNS):
        out += (a[:, s : s + _ROWDOT_COLUMNS] * b[:, s : s + _ROWDOT_COLUMNS]).sum(-1, dtype=torch.float64)
    return out.to(a.dtype)


@dataclass
class Residual:
    """A distribution over the vocabulary in structured form, per row.

    ``π̃ = self_coef·p·1{a ∉ self_skip} + uniform/V + dense + scatter(sparse_ids, sparse_values)``; missing parts
    are zero. ``self_coef`` and ``uniform`` are ``[n]``, ``dense`` is ``[n, V]``, ``sparse_*`` and ``self_skip``
    are ``[n, k]``. ``self_skip`` (a top-k teacher's ids) keeps the student's share off the ids, so that a large
    ``self_coef`` never has to be cancelled there.
    """

    self_coef: Tensor | None = None
    uniform: Tensor | None = None
    dense: Tensor | None = None
    sparse_ids: Tensor | None = None
    sparse_values: Tensor | None = None
    self_skip: Tensor | None = None

    def scaled(self, c: Tensor) -> Residual:
        """``c·π̃`` for a per-row factor ``c`` ``[n]``."""

        def mul(x: Tensor | None, per_row: Tensor) -> Tensor | None:
            return None if x is None else x * per_row

        col = c.unsqueeze(-1)
        return Residual(
            self_coef=mul(self.self_coef, c),
            uniform=mul(self.uniform, c),
            dense=mul(self.dense, col),
            sparse_ids=self.sparse_ids,
            sparse_values=mul(self.sparse_values, col),
            self_skip=self.self_skip,
        )

    def with_sparse(self, ids: Tensor, values: Tensor) -> Residual:
        """Add sparse entries ``[n, j]``."""
        if self.sparse_ids is None:
            return replace(self, sparse_ids=ids, sparse_values=values)
        return replace(
            self,
            sparse_ids=torch.cat([self.sparse_ids, ids], -1),
            sparse_values=torch.cat([self.sparse_values, values], -1),
        )

    def at(self, state: TokenState, ids: Tensor) -> Tensor:
        """``π̃`` at the given token ids ``[n, j]``."""
        out = torch.zeros(ids.shape, dtype=state.logp.dtype, device=ids.device)
        if self.self_coef is not None:
            p_ids = state.logp.gather(-1, ids).exp()
            if self.self_skip is not None:
                p_ids = p_ids * ~(self.self_skip.unsqueeze(-2) == ids.unsqueeze(-1)).any(-1)
            out = out + self.self_coef[:, None] * p_ids
        if self.uniform is not None:
            out = out + self.uniform[:, None] / state.vocab_size
        if self.dense is not None:
            out = out + self.dense.gather(-1, ids)
        if self.sparse_ids is not None:
            match = (self.sparse_ids.unsqueeze(-2) == ids.unsqueeze(-1)).to(out.dtype)  # [n, j, k]
            out = out + (match * self.sparse_values.unsqueeze(-2)).sum(-1)
        return out

    def to_dense(self, state: TokenState) -> Tensor:
        """The residual as a dense ``[n, V]`` tensor (analysis and logging only)."""
        out = torch.zeros_like(state.logp)
        if self.self_coef is not None:
            out += self.self_coef[:, None] * state.probs()
            if self.self_skip is not None:
                out.scatter_(-1, self.self_skip, 0.0)
        if self.uniform is not None:
            out += self.uniform[:, None] / state.vocab_size
        if self.dense is not None:
            out += self.dense
        if self.sparse_ids is not None:
            out.scatter_add_(-1, self.sparse_ids, self.sparse_values)
        return out

    def entropy(self, state: TokenState) -> Tensor:
        """``H(π̃) = −Σ_a π̃(a) log π̃(a)`` per row (logging), without a dense ``[n, V]`` residual where the form
        allows: ``c·p`` gives ``−c·Σ p log p − c log c``; ``c·p`` off ``k`` distinct ids plus values ``v`` on them
        gives ``−c·Σ_tail p log p − m·c log c − Σ v log v`` (``m`` the student's tail mass; the ids of a top-k
        teacher, distinct as its input check requires); ``u/V`` gives ``−u log(u/V)``."""
        parts = {
            name
            for name in ("self_coef", "uniform", "dense", "sparse_ids", "self_skip")
            if getattr(self, name) is not None
        }
        if parts == {"uniform"}:
            return -torch.special.xlogy(self.uniform, self.uniform / state.vocab_size)
        if parts == {"self_coef"}:
            c = self.self_coef
            return -c * state.plogp() - torch.special.xlogy(c, c)
        ids = self.self_skip
        if parts == {"self_coef", "sparse_ids", "self_skip"} and self.sparse_ids is ids:  # a top-k teacher's ids
            c = self.self_coef
            log_mass, plogp = state.tail(ids)
            tail = c * plogp + torch.special.xlogy(c, c) * log_mass.exp()
            return -tail - torch.special.xlogy(self.sparse_values, self.sparse_values).sum(-1)
        return _entropy(self.to_dense(state))

    def cross_entropy(self, state: TokenState) -> Tensor:
        """``−Σ_a π̃(a) log p(a)`` per row."""
        logp = state.logp
        out = torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
        if self.self_coef is not None:
            plogp = state.plogp() if self.self_skip is None else state.tail(self.self_skip)[1]
            out = out - self.self_coef * plogp
        if self.uniform is not None:
            out = out - self.uniform * logp.mean(-1)
        if self.dense is not None:
            out = out - _rowdot(self.dense, logp)
        if self.sparse_ids is not None:
            out = out - (self.sparse_values * logp.gather(-1, self.sparse_ids)).sum(-1)
        return out

    def subtract_from(self, grad: Tensor, state: TokenState) -> None:
        """``grad ← grad − π̃`` where ``grad`` holds ``p``: the self part scales it in place (restored exactly on
        ``self_skip``), the other parts are subtracted."""
        if self.self_coef is not None:
            grad.mul_((1.0 - self.self_coef)[:, None])
            if self.self_skip is not None:
                grad.scatter_(-1, self.self_skip, state.logp.gather(-1, self.self_skip).exp())
        if self.uniform is not None:
            grad.sub_(self.uniform[:, None] / grad.shape[-1])
        if self.dense is not None:
            grad.sub_(self.dense)
        if self.sparse_ids is not None:
            grad.scatter_add_(-1, self.sparse_ids, -self.sparse_values)

    def exclude_label(self, state: TokenState) -> Residual:
        """``π̃' = (π̃ − π̃(y)·onehot(y)) / (1 − π̃(y))``: the residual with the label's own mass removed.

        Rows whose residual sits entirely on the label (``1 − π̃(y) < tiny``) keep ``π̃`` unchanged.
        """
        y = state.labels[:, None]
        r_y = self.at(state, y).squeeze(-1)
        rest = 1.0 - r_y
        ok = rest > torch.finfo(rest.dtype).eps
        inv = torch.where(ok, 1.0 / torch.where(ok, rest, 1.0), 1.0)
        fix = torch.where(ok, -r_y * inv, 0.0)
        return self.scaled(inv).with_sparse(y, fix[:, None])


class TrustRule(Protocol):
    """A label-trust rule: ``γ`` per token ``[n]`` in ``[0, 1]`` (also used for per-token loss scales)."""

    needs: frozenset[str]

    def __call__(self, state: TokenState) -> Tensor: ...


class ResidualRule(Protocol):
    """A residual rule: the distribution ``π̃`` that receives the mass ``1 − γ``."""

    needs: frozenset[str]

    def __call__(self, state: TokenState) -> Residual: ...


@dataclass(frozen=True)
class Target:
    """A designed target ``Q = γ·onehot(y) + (1 − γ)·π̃``: a label-trust rule and a residual rule.

    ``exclude_label`` removes the label's own share from ``π̃`` before mixing. ``scale`` multiplies each
    token's loss and gradient (for methods whose original loss is ``c_t·CE(Q, p)``, e.g. SFT+KL).
    """

    trust: TrustRule
    residual: ResidualRule | None = None
    exclude_label: bool = False
    scale: TrustRule | None = None

    @property
    def needs(self) -> frozenset[str]:
        """Inputs this target reads beyond logits and labels: ``teacher``, ``ref``, ``token_weights``."""
        out = set(self.trust.needs)
        for rule in (self.residual, self.scale):
            if rule is not None:
                out |= rule.needs
        return frozenset(out)

    def residual_for(self, state: TokenState) -> Residual | None:
        if self.residual is None:
            return None
        residual = self.residual(state)
        return residual.exclude_label(state) if self.exclude_label else residual


STAT_NAMES = ("gamma", "p_label", "nll", "q_label", "residual_entropy", "accuracy")


@dataclass
class TargetStats:
    """Sums over tokens of what ``return_stats`` reports; divide by ``count`` for means.

    The sums stay where the loss ran (0-dim float64 tensors once a block is added), so collecting them reads nothing
    back from an accelerator; :meth:`means` reads them all at once.
    """

    count: float = 0.0
    gamma: float | Tensor = 0.0
    p_label: float | Tensor = 0.0
    nll: float | Tensor = 0.0
    q_label: float | Tensor = 0.0
    residual_entropy: float | Tensor = 0.0
    accuracy: float | Tensor = 0.0

    def add(self, other: TargetStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def sums(self) -> dict[str, float]:
        """The sums as floats, read back in one transfer."""
        values = [getattr(self, name) for name in STAT_NAMES]
        device = next((v.device for v in values if isinstance(v, Tensor)), None)
        if device is not None:
            values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]).tolist()
        return dict(zip(STAT_NAMES, (float(v) for v in values)))

    def means(self) -> dict[str, float]:
        """Per-token means: γ, p(y), NLL = −log p(y), Q(y), H(π̃) in nats, argmax accuracy; and ``tokens``."""
        n = max(self.count, 1.0)
        return {**{name: v / n for name, v in self.sums().items()}, "tokens": self.count}


def _entropy(dist: Tensor) -> Tensor:
    return -torch.special.xlogy(dist, dist).sum(-1)


def loss_and_grad(
    box: list[Tensor],
    labels: Tensor,
    target: Target,
    *,
    teacher: Distribution | None = None,
    ref: Distribution | None = None,
    token_weights: Tensor | None = None,
    need_grad: bool = True,
    stats: TargetStats | None = None,
    workspace: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token ``CE(Q, p)`` and the logit gradient ``p − Q`` for a block of rows.

    ``box`` holds one tensor, the block's logits ``[n, V]`` in the compute dtype; it is emptied so the logits can
    be freed as soon as ``log softmax`` has been taken. ``workspace``, a spare ``[n, V]`` buffer of that dtype, lets
    a chunked caller reuse memory instead: ``log p`` goes there and ``p`` (then the gradient) into the logits'
    own storage, so nothing of size ``[n, V]`` is allocated (on CPU each such allocation is fresh pages).
    Returns ``(loss [n], grad [n, V] or None)``, both unscaled by any reduction weight.
    """
    z = box.pop()
    logp = torch.log_softmax(z, dim=-1, out=workspace)
    p_out = z if workspace is not None else None  # where p = exp(log p) goes: the logits' storage, or new memory
    del z
    p = torch.exp(logp, out=p_out) if need_grad else None  # becomes the gradient, in place, once the loss is known
    state = TokenState(logp=logp, labels=labels, teacher=teacher, ref=ref, token_weights=token_weights, p=p)
    gamma = target.trust(state).to(logp.dtype)
    residual = target.residual_for(state)
    q_res = residual.scaled(1.0 - gamma) if residual is not None else None

    if p is None and q_res is not None and q_res.self_coef is not None and q_res.self_skip is None:
        state.p = torch.exp(logp, out=p_out)  # Σ p log p needs p: into the spare storage, if any
    loss = -gamma * state.logp_y
    if q_res is not None:
        loss = loss + q_res.cross_entropy(state)
    row_scale = target.scale(state).to(logp.dtype) if target.scale is not None else None
    if row_scale is not None:
        loss = loss * row_scale

    if stats is not None:  # device-side sums: nothing is read back here
        q_y = gamma + (q_res.at(state, labels[:, None]).squeeze(-1) if q_res is not None else 0.0)
        block = TargetStats(
            count=float(labels.numel()),
            gamma=gamma.sum(dtype=torch.float64),
            p_label=state.p_y.sum(dtype=torch.float64),
            nll=-state.logp_y.sum(dtype=torch.float64),
            q_label=q_y.sum(dtype=torch.float64),
            residual_entropy=residual.entropy(state).sum(dtype=torch.float64) if residual is not None else 0.0,
            accuracy=(logp.argmax(-1) == labels).sum(dtype=torch.float64),
        )
        stats.add(block)

    if not need_grad:
        return loss, None
    grad = p
    if q_res is not None:
        q_res.subtract_from(grad, state)
    del logp, state
    grad.scatter_add_(-1, labels[:, None], -gamma[:, None])
    if row_scale is not None:
        grad.mul_(row_scale[:, None])
    return loss, grad


def dense_target(state: TokenState, target: Target) -> Tensor:
    """The dense target ``Q = γ·onehot(y) + (1 − γ)·π̃`` ``[n, V]`` (before any per-row loss scale)."""
    gamma = target.trust(state).to(state.logp.dtype)
    residual = target.residual_for(state)
    q = torch.zeros_like(state.logp) if residual is None else residual.scaled(1.0 - gamma).to_dense(state)
    q.scatter_add_(-1, state.labels[:, None], gamma[:, None])
    return q
