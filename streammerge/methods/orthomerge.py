"""OrthoMerge (arXiv 2602.05943): merge rotations in the Lie algebra; Orthogonal-Residual Decoupling.

**Merge rule** (``GeneratorMerge``; one output tensor / adapter key, all its blocks together). With
generators Qᵢ, θᵢ = ‖Qᵢ‖_F, uᵢ = Qᵢ/θᵢ:

    Q̄ = agg(θ₁ … θ_N) · d/‖d‖,   d = Σ wᵢuᵢ
    agg  (``norm_aggregate``):      mean | median | max   (median is torch's: the lower middle value)
    wᵢ   (``direction_weighting``): theta: wᵢ = θᵢ, so d = Σ Qᵢ — the direction of the plain sum, each
                                    expert counted by its rotation's size (the paper's rule
                                    Q̄ = (c/N)·ΣQᵢ, c = Σθᵢ/‖ΣQᵢ‖, when agg = mean);
                                    uniform: wᵢ = 1, so d = Σ Qᵢ/θᵢ — every expert's direction counts
                                    the same, however small its rotation.

This is the authors' ``merge_cayley_Q_list`` (theta_agg, direction_weight), which also clamps θᵢ at
1e-8 when dividing. A linear combination of skew matrices is skew, so their final ½(Q̄ − Q̄ᵀ) changes
nothing, and the rule gives the same result on PEFT's upper-triangle vectors as on the matrices (the
norms differ by √2 for every expert alike). **Guard** (missing in the reference): where
‖d‖ <= 1e-6·Σ‖wᵢuᵢ‖ (the experts' directions cancel, or all θᵢ = 0) the direction is noise, and Q̄ = 0,
the identity rotation; ``result`` reports it. Q̄ goes back through the same Cayley map the inputs use.

**OFT adapters**: ``oft_generator`` (PEFT's COFT projection applied first, as PEFT does before every
use), the merge rule, ``oft_rotation_blocks`` (exact Cayley or Cayley–Neumann, as the adapter's config
says) and ``fold_oft`` (W·Rᵀ for Linear, W·R for Embedding, as PEFT's ``merge``). Adapter tensors that
are not rotations (biases, ``modules_to_save``) are averaged over the adapters that have them, as the
reference does.

**Orthogonal-Residual Decoupling** (``decouple_merge``), for full fine-tunes and LoRA experts, per
weight matrix W₀ (d_out, d_in):

    Rᵢ = procrustes_rotation(W₀, Tᵢ)    regularised polar factor of W₀ᵀTᵢ + εI, reflections Kabsch-fixed;
                                        variant G: Tᵢ = Wᵢ
                                        variant C: Tᵢ = W₀ + mᵢ⊙Δᵢ, Δᵢ = Wᵢ − W₀, mᵢ keeps the output rows
                                        whose cosine with the mean Δ̄'s row is < 0 (strictly; the rows
                                        where expert i *conflicts* with the consensus) — as the authors'
                                        ``cos_sim < CONFLICT_THRESHOLD (0.0)``
    Qᵢ = inverse_cayley(Rᵢ)            the reference's Aᵢ = (Rᵢ + I)⁻¹(Rᵢ − I) is −Qᵢ; the merge rule is odd
                                        (Q̄(−Q) = −Q̄(Q)) and R̄ = (I − Ā)⁻¹(I + Ā) = cayley(Q̄), so both
                                        conventions give the same R̄
    ρᵢ = Wᵢ − W₀Rᵢ,   W = W₀·cayley(Q̄) + λ·merge(ρ₁ … ρ_N)    (``ord_residuals``)

(Rᵢ and Qᵢ come from one fused call, ``procrustes_generator``; where a rotation has an angle near π,
Qᵢ is clamped, reported, and Rᵢ = cayley(Qᵢ) is used in ρᵢ so that Wᵢ = W₀Rᵢ + ρᵢ stays exact.)
Tensors that do not take the orthogonal part (``takes_orthogonal_part``) get W = W₀ + λ·merge(τ).
Memory: each Qᵢ is folded into a running Σwᵢuᵢ and each Rᵢ into the residual merger (or ΣRᵢ) as soon as
it is known, so one expert and one rotation are alive at a time, plus accumulators of one matrix each;
variant C reads the experts twice (Δ̄ first).

**Paths**: wide matrices (d_out <= d_in/2) take the subspace path (``ord_subspace``: the same result
from a k × k polar factor, k <= d_out + rank(Tᵢ − W₀), and a low-rank merge), the others the dense one
(d_in × d_in); ``DecoupleReport`` counts both and the run report names them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import ConfigError
from ..threads import one_thread
from . import ord_subspace
from .base import ChunkInputs, MergeMethod, NoParams
from .oft import coft_project, fold_oft, oft_generator, oft_rotation_blocks  # noqa: F401  (re-exported)
from .ord_residuals import ResidualMethod, residual_merge
from .ord_subspace import OrdPath
from .orthogonal import NeumannConvention, cayley, procrustes_generator, work_dtype

log = logging.getLogger(__name__)

NormAggregate = Literal["mean", "median", "max"]
DirectionWeighting = Literal["theta", "uniform"]
CANCEL_RTOL = 1e-6  # ‖Σwᵢuᵢ‖ below this fraction of Σ‖wᵢuᵢ‖: the directions cancel, Q̄ = 0
THETA_FLOOR = 1e-8  # the reference's clamp on θᵢ when normalising

EMBEDDING_MODULES = ("embed_tokens", "embed_in", "word_embeddings", "wte", "wpe", "embeddings")
LM_HEAD_MODULES = ("lm_head", "embed_out")


@dataclass(frozen=True)
class OrthoMergeParams:
    variant: Literal["G", "C"] = "G"  # ORD target: the expert (G) or its conflicting rows only (C)
    residual_method: ResidualMethod = "task_arithmetic"  # how the residuals ρᵢ are merged
    lambda_: float = 1.0  # scale of the merged residual (paper: 1/N for task_arithmetic, 1 for ties/tsvm)
    density: float = 0.2  # ties: fraction of each residual's entries kept (paper: top 20 %)
    norm_aggregate: NormAggregate = "mean"  # merged rotation size from the experts' ‖Qᵢ‖
    direction_weighting: DirectionWeighting = "theta"  # theta: direction of ΣQᵢ; uniform: of ΣQᵢ/‖Qᵢ‖
    procrustes_eps: float = 1e-3  # ε·I added to W₀ᵀTᵢ, relative to its RMS singular value
    cayley_min_sigma: float = 1e-2  # σ_min(R + I) below this: angles near π, generator clamped (reported)
    orthogonal_embeddings: bool = False  # give embedding matrices the orthogonal part too
    orthogonal_lm_head: bool = False  # give lm_head the orthogonal part too
    output: Literal["model", "adapter"] = "model"  # OFT experts: the merged model, or a merged PEFT adapter

    def __post_init__(self):
        for name, value, allowed in (
            ("variant", self.variant, ("G", "C")),
            ("residual_method", self.residual_method, ("task_arithmetic", "ties", "tsvm")),
            ("norm_aggregate", self.norm_aggregate, ("mean", "median", "max")),
            ("direction_weighting", self.direction_weighting, ("theta", "uniform")),
            ("output", self.output, ("model", "adapter")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not math.isfinite(self.lambda_):
            raise ValueError(f"lambda must be a finite number, got {self.lambda_!r}")
        if not 0 <= self.procrustes_eps < 1:
            raise ValueError(f"procrustes_eps must be in [0, 1), got {self.procrustes_eps!r}")
        if not 0 < self.cayley_min_sigma < 2:
            raise ValueError(f"cayley_min_sigma must be in (0, 2), got {self.cayley_min_sigma!r}")


def _module_name(name: str) -> str:
    """'model.layers.0.mlp.down_proj.weight' -> 'down_proj'."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def takes_orthogonal_part(name: str, shape: tuple[int, ...], params: OrthoMergeParams) -> bool:
    """Whether ORD gives tensor ``name`` a rotation (else only its task vectors are merged).

    Default: 2-D ``*.weight`` tensors except norms (a module name containing 'norm' or 'ln_'),
    embeddings (module ``embed_tokens``, ``embed_in``, ``word_embeddings``, ``wte``, ``wpe``,
    ``embeddings``) and the output head (``lm_head``, ``embed_out``); those two by option.
    """
    if len(shape) != 2 or not name.endswith("weight"):
        return False
    module = _module_name(name)
    if "norm" in module or module.startswith("ln_"):
        return False
    if module in EMBEDDING_MODULES:
        return params.orthogonal_embeddings
    if module in LM_HEAD_MODULES:
        return params.orthogonal_lm_head
    return True


class GeneratorMerge:
    """The merge rule over generators added one at a time (any shape, all elements form one vector)."""

    def __init__(self, norm_aggregate: NormAggregate = "mean", direction_weighting: DirectionWeighting = "theta"):
        self.norm_aggregate = norm_aggregate
        self.direction_weighting = direction_weighting
        self.norms: list[float] = []  # θᵢ
        self._direction: torch.Tensor | None = None  # Σ wᵢuᵢ
        self._bound = 0.0  # Σ ‖wᵢuᵢ‖

    def add(self, q: torch.Tensor) -> None:
        theta = float(torch.linalg.vector_norm(q))
        self.norms.append(theta)
        if self.direction_weighting == "theta":  # wᵢuᵢ = θᵢ·Qᵢ/max(θᵢ, floor)
            factor = theta / max(theta, THETA_FLOOR)
        else:
            factor = 1.0 / max(theta, THETA_FLOOR)
        self._bound += theta * factor
        if self._direction is None:
            self._direction = q * factor
        else:
            self._direction.add_(q, alpha=factor)

    def grow(self, size: int) -> None:
        """Zero-pad a square direction accumulator to (size, size): the subspace path's joint basis grew
        by new trailing axes (``ord_subspace.JointGenerators``)."""
        d = self._direction
        if d is not None and d.shape[-1] < size:
            grown = d.new_zeros(size, size)
            grown[: d.shape[0], : d.shape[1]] = d
            self._direction = grown

    def result(self) -> tuple[torch.Tensor, bool]:
        """(Q̄, degenerate); degenerate: the directions cancelled (or all θᵢ = 0) and Q̄ = 0."""
        if self._direction is None:
            raise ValueError("no generators to merge")
        norm = float(torch.linalg.vector_norm(self._direction))
        if norm <= CANCEL_RTOL * self._bound or norm == 0.0:
            return torch.zeros_like(self._direction), True
        thetas = torch.tensor(self.norms, dtype=torch.float64)
        size = {"mean": thetas.mean, "median": thetas.median, "max": thetas.max}[self.norm_aggregate]()
        return self._direction * (float(size) / norm), False


def merge_generators(
    generators: Sequence[torch.Tensor],
    norm_aggregate: NormAggregate = "mean",
    direction_weighting: DirectionWeighting = "theta",
) -> tuple[torch.Tensor, bool]:
    """The merge rule over a list: skew matrices (..., b, b) or PEFT vectors (r, b(b−1)/2) alike."""
    merge = GeneratorMerge(norm_aggregate, direction_weighting)
    for q in generators:
        merge.add(q)
    return merge.result()


# --- Orthogonal-Residual Decoupling --------------------------------------------------------------

Expert = torch.Tensor | Callable[[], torch.Tensor]  # a weight, or a loader returning it in fresh memory


@dataclass
class DecoupleReport:
    """What ``decouple_merge`` noticed, accumulated over calls (the engine logs a summary)."""

    matrices: int = 0  # tensors that took the orthogonal part
    residual_only: int = 0  # tensors merged as task vectors only
    clamped: list[tuple[str, int, float]] = field(default_factory=list)  # (tensor, expert, σ_min(R+I))
    cancelled: list[str] = field(default_factory=list)  # tensors whose merged generator was set to 0
    min_sigma: float = math.inf  # smallest σ_min(R + I) seen
    subspace: int = 0  # matrices decoupled by the subspace path (``ord_subspace``)
    largest_k: tuple[int, int] = (0, 0)  # (k, d_in) of the subspace path's largest per-expert basis
    fallback: list[str] = field(default_factory=list)  # subspace path given up for dense (reflection off it)


def _load(expert: Expert, like: torch.Tensor) -> torch.Tensor:
    """A tensor this call may modify, with ``like``'s dtype and device: a loader's result as is (fresh
    memory by contract), a given tensor copied."""
    if callable(expert):
        return expert().to(device=like.device, dtype=like.dtype)
    return expert.to(device=like.device, dtype=like.dtype, copy=True)


def _conflict_rows(delta: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
    """(d_out, 1) mask of rows whose dot product (hence cosine) with the mean delta's row is < 0."""
    return ((delta * mean_delta).sum(dim=1, keepdim=True) < 0).to(delta.dtype)


def _expert_rotation(
    base: torch.Tensor, w: torch.Tensor, mean_delta: torch.Tensor | None, params: OrthoMergeParams,
    name: str, i: int, report: DecoupleReport | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Rᵢ, Qᵢ) for expert weight ``w``: Procrustes to its target, then the guarded inverse Cayley map."""
    target = w
    if mean_delta is not None:  # variant C: only the rows that conflict with the consensus move
        delta = w - base
        target = base + delta * _conflict_rows(delta, mean_delta)
        del delta
    r, q, sigma = procrustes_generator(base, target, params.procrustes_eps, params.cayley_min_sigma)
    del target
    sigma = float(sigma)
    if sigma < params.cayley_min_sigma:  # q was clamped: use the rotation it really encodes
        r = cayley(q)
        log.warning("%s: expert %d's rotation has an angle near π (σ_min(R+I) = %.2e); generator clamped",
                    name or "tensor", i, sigma)
        if report is not None:
            report.clamped.append((name, i, sigma))
    if report is not None:
        report.min_sigma = min(report.min_sigma, sigma)
    return r, q


def decouple_merge(
    w0: torch.Tensor,
    experts: Sequence[Expert],
    params: OrthoMergeParams,
    orthogonal: bool = True,
    name: str = "",
    report: DecoupleReport | None = None,
    path: OrdPath = "auto",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Orthogonal-Residual Decoupling of one tensor; returns the merged tensor, fp32, on w0's device.

    w0: base tensor (d_out, d_in) (any shape when ``orthogonal`` is false); experts: the experts' tensors
    of the same shape, or loaders (each called once for variant G, twice for C). ``orthogonal``: whether
    this tensor takes the rotation part (``takes_orthogonal_part``); 1-D tensors never do. ``name`` only
    labels the report. ``path``: dense or subspace Procrustes (``ord_subspace.choose_path``; auto: the
    subspace path for wide matrices). Both give the same result to rounding. ``out_dtype``: the result's
    dtype (fp32 for the engine; tests compare the paths in the working dtype).

    Dense path, per expert: one matmul W₀ᵀTᵢ, one SVD (d_in × d_in), one matmul UVᵀ, one solve for Qᵢ (det Rᵢ only
    where that solve flags an eigenvalue near −1, see ``procrustes_generator``).
    With ``task_arithmetic`` the residuals are never formed: Σρᵢ = ΣWᵢ − W₀·ΣRᵢ, so
    W = W₀·(R̄ − λ·ΣRᵢ) + λ·ΣWᵢ costs one matmul in all (TIES and TSV-M need each ρᵢ: one more each).
    """
    n = len(experts)
    if n == 0:
        return w0.to(torch.float32, copy=True)
    if not orthogonal or w0.ndim != 2:
        return _residual_only(w0, experts, params, report)
    dtype = work_dtype(w0.shape[1])
    base = w0.to(dtype)
    mean_delta = None
    if params.variant == "C":  # first pass: the mean delta Δ̄
        mean_delta = torch.zeros_like(base)
        for e in experts:
            mean_delta += _load(e, base)
        mean_delta /= n
        mean_delta -= base
    if ord_subspace.choose_path(tuple(w0.shape), params.procrustes_eps, path) == "subspace":
        merged = _decouple_subspace(base, experts, mean_delta, params, name, report)
        if merged is not None:
            return merged.to(out_dtype)
        log.info("%s: a reflection's Kabsch flip falls off the subspace; dense path", name or "tensor")
        if report is not None:
            report.fallback.append(name)
    arithmetic = params.residual_method == "task_arithmetic"
    residuals = None if arithmetic else residual_merge(params.residual_method, n, params.density)
    sum_w = sum_r = None  # ΣWᵢ (d_out, d_in), ΣRᵢ (d_in, d_in): task arithmetic only
    generators = GeneratorMerge(params.norm_aggregate, params.direction_weighting)
    for i, e in enumerate(experts):
        w = _load(e, base)  # (d_out, d_in)
        r, q = _expert_rotation(base, w, mean_delta, params, name, i, report)
        generators.add(q)
        del q
        if arithmetic:
            sum_w = w if sum_w is None else sum_w.add_(w)
            sum_r = r if sum_r is None else sum_r.add_(r)
        else:
            w -= base @ r  # ρᵢ = Wᵢ − W₀Rᵢ
            residuals.add(w)
        del w, r
    q_bar, cancelled = generators.result()
    if cancelled:
        log.info("%s: the experts' generators cancel; merged rotation set to identity", name or "tensor")
        if report is not None:
            report.cancelled.append(name)
    r_bar = cayley(q_bar)  # (d_in, d_in)
    del q_bar
    if arithmetic:
        r_bar.sub_(sum_r, alpha=params.lambda_)
        del sum_r
        merged = (base @ r_bar).add_(sum_w, alpha=params.lambda_)
    else:
        merged = (base @ r_bar).add_(residuals.result(), alpha=params.lambda_)
    if report is not None:
        report.matrices += 1
    return merged.to(out_dtype)


def _decouple_subspace(
    base: torch.Tensor, experts: Sequence[Expert], mean_delta: torch.Tensor | None, params: OrthoMergeParams,
    name: str, report: DecoupleReport | None,
) -> torch.Tensor | None:
    """``decouple_merge`` by the subspace path (``ord_subspace``); None where it must give way to the dense
    path (before anything is reported). base: W₀ in ``work_dtype(d_in)``."""
    basis = ord_subspace.RowBasis(base)  # once per matrix, reused for every expert
    residuals = residual_merge(params.residual_method, len(experts), params.density)
    joint = ord_subspace.JointGenerators(basis, GeneratorMerge(params.norm_aggregate, params.direction_weighting))
    clamped, sigmas, largest_k = [], [], 0
    for i, e in enumerate(experts):
        delta = _load(e, base).sub_(base)  # Δᵢ = Wᵢ − W₀
        target = delta if mean_delta is None else delta * _conflict_rows(delta, mean_delta)
        rot = ord_subspace.expert_rotation(basis, target, params.procrustes_eps, params.cayley_min_sigma)
        del target
        if rot is None:
            return None
        largest_k = max(largest_k, rot.k)
        sigmas.append(rot.sigma)
        if rot.sigma < params.cayley_min_sigma:  # q was clamped: use the rotation it really encodes
            rot.r = ord_subspace.merged_rotation(rot.q)
            clamped.append((name, i, rot.sigma))
        joint.add(rot)
        delta -= ord_subspace.rotation_delta(basis, rot.r, rot.v)  # ρᵢ = Wᵢ − W₀Rᵢ = Δᵢ − (W₀Rᵢ − W₀)
        del rot
        residuals.add(delta)
        del delta
    for tensor, i, sigma in clamped:
        log.warning("%s: expert %d's rotation has an angle near π (σ_min(R+I) = %.2e); generator clamped",
                    tensor or "tensor", i, sigma)
    q_bar, cancelled = joint.merge.result()
    complement = joint.complement()
    del joint  # the direction accumulator (K × K)
    if cancelled:
        log.info("%s: the experts' generators cancel; merged rotation set to identity", name or "tensor")
    top = ord_subspace.merged_rotation_top(q_bar, basis.m)  # first rows of R̄ − I, J coordinates
    del q_bar
    merged = ord_subspace.rotation_delta(basis, top, complement, minus_identity=True)  # W₀R̄ − W₀
    del top
    merged.add_(base).add_(residuals.result(), alpha=params.lambda_)
    if report is not None:
        report.clamped.extend(clamped)
        report.min_sigma = min([report.min_sigma, *sigmas])
        if cancelled:
            report.cancelled.append(name)
        report.matrices += 1
        report.subspace += 1
        if largest_k > report.largest_k[0]:
            report.largest_k = (largest_k, base.shape[1])
    return merged


def _residual_only(
    w0: torch.Tensor, experts: Sequence[Expert], params: OrthoMergeParams, report: DecoupleReport | None
) -> torch.Tensor:
    """W₀ + λ·merge(τ₁ … τ_N), τᵢ = Wᵢ − W₀, fp32."""
    residuals = residual_merge(params.residual_method, len(experts), params.density)
    base = w0.to(torch.float32)
    for e in experts:
        tau = _load(e, base)
        tau -= base
        residuals.add(tau)
    if report is not None:
        report.residual_only += 1
    return base + params.lambda_ * residuals.result()


# --- the engine's entry ----------------------------------------------------------------------------

OFT_INPUT = "oft"  # ``ExpertInput.aux`` key: loader of an OFT adapter's ``OftInput`` for the tensor


@dataclass(frozen=True)
class OftInput:
    """What one OFT adapter holds for one base tensor (the engine builds it from the adapter files)."""

    generator: torch.Tensor | None  # stored oft_R vectors (n, b(b−1)/2), fp32; None: not rotated
    replacement: torch.Tensor | None  # the adapter's own copy of the base tensor (modules_to_save), fp32
    block_size: int = 0
    embedding: bool = False
    neumann_terms: int | None = None  # None: exact Cayley
    neumann_convention: NeumannConvention = "peft-0.18"
    coft_eps: float | None = None


class OrthoRun:
    """One OrthoMerge run: which path it takes, and what the numerics noticed (``report``)."""

    def __init__(self, n_experts: int, device: torch.device | None = None):
        self.decouple = DecoupleReport()
        self.path: str | None = None
        self.oft_rotated = 0  # tensors whose OFT rotations were merged
        self.oft_cancelled: list[str] = []

    def needs_calibration(self, model_params: list) -> bool:
        return False

    def observe(self, inputs: ChunkInputs) -> None:  # no calibration pass
        pass

    def calibrate(self) -> None:
        pass

    def absorb(self, other: OrthoRun) -> None:
        """Add another process's counts (a distributed merge's report)."""
        self.path = self.path or other.path
        self.oft_rotated += other.oft_rotated
        self.oft_cancelled += other.oft_cancelled
        d, o = self.decouple, other.decouple
        d.matrices += o.matrices
        d.residual_only += o.residual_only
        d.clamped += o.clamped
        d.cancelled += o.cancelled
        d.min_sigma = min(d.min_sigma, o.min_sigma)
        d.subspace += o.subspace
        d.largest_k = max(d.largest_k, o.largest_k)
        d.fallback += o.fallback

    def report(self) -> list[str]:
        lines = [self.path] if self.path else []
        d = self.decouple
        if self.oft_rotated:
            lines.append(f"{self.oft_rotated} tensors rotated by merged OFT generators")
        if self.oft_cancelled:
            lines.append(
                f"{len(self.oft_cancelled)} tensors: the adapters' generators cancel, identity rotation used "
                f"({', '.join(self.oft_cancelled[:3])}{' ...' if len(self.oft_cancelled) > 3 else ''})"
            )
        if d.matrices or d.residual_only:
            sigma = f"; smallest σ_min(Rᵢ + I) {d.min_sigma:.3g}" if d.matrices else ""
            lines.append(
                f"{d.matrices} matrices decoupled into rotation + residual, {d.residual_only} merged as "
                f"residuals only{sigma}"
            )
        if d.matrices:
            k, d_in = d.largest_k
            sub = f" (largest basis k = {k} of d_in = {d_in})" if d.subspace else ""
            fell = ""
            if d.fallback:
                fell = f", {len(d.fallback)} of them after leaving the subspace path ({d.fallback[0]})"
            lines.append(
                f"ORD Procrustes path: {d.subspace} matrices by the subspace path{sub}, "
                f"{d.matrices - d.subspace} by the dense path{fell}"
            )
        if d.clamped:
            lines.append(
                f"{len(d.clamped)} expert rotations had an angle near π and were clamped "
                f"(e.g. {d.clamped[0][0]}, expert #{d.clamped[0][1]})"
            )
        if d.cancelled:
            lines.append(f"{len(d.cancelled)} tensors: the experts' generators cancel, identity rotation used")
        return lines


def describe_path(kinds: Sequence[str], params: OrthoMergeParams) -> str:
    """Which OrthoMerge path experts of these kinds ("model", "lora", "oft") take, in words."""
    if kinds and all(k == "oft" for k in kinds):
        return (
            f"OrthoMerge path: OFT rotations of {len(kinds)} adapters merged in the Lie algebra "
            f"(norm {params.norm_aggregate}, direction {params.direction_weighting}), output {params.output}"
        )
    counts = ", ".join(
        f"{sum(k == kind for k in kinds)} {label}"
        for kind, label in (
            ("model", "full fine-tune(s)"),
            ("lora", "LoRA adapter(s)"),
            ("oft", "OFT adapter(s), folded"),
        )
        if kind in kinds
    )
    extra = f", density {params.density}" if params.residual_method == "ties" else ""
    return (
        f"OrthoMerge path: Orthogonal-Residual Decoupling, variant {params.variant}, of {counts}; residuals by "
        f"{params.residual_method} (lambda {params.lambda_}{extra})"
    )


def merge_oft(
    base: torch.Tensor, oft: Sequence[OftInput], params: OrthoMergeParams, name: str = "", run: OrthoRun | None = None
) -> torch.Tensor:
    """The OFT path for one base tensor: W₀ (the adapters' replacements averaged, else the base), with the
    merged rotation of the adapters that rotate it folded in (fp32). An adapter that lacks the tensor
    does not count, as in the reference."""
    replaced = [o.replacement for o in oft if o.replacement is not None]
    w0 = base if not replaced else torch.stack([r.to(base) for r in replaced]).mean(0)
    rotating = [o for o in oft if o.generator is not None]
    if not rotating:
        return w0.to(torch.float32, copy=True)
    first = rotating[0]
    gens = [oft_generator(o.generator.to(base.device), o.block_size, o.coft_eps) for o in rotating]
    q_bar, cancelled = merge_generators(gens, params.norm_aggregate, params.direction_weighting)
    del gens
    if params.lambda_ != 1:  # streammerge's extension: scale the merged rotation's angle
        q_bar = q_bar * params.lambda_
    if run is not None:
        run.oft_rotated += 1
        if cancelled:
            run.oft_cancelled.append(name)
    blocks = oft_rotation_blocks(q_bar, first.block_size, first.neumann_terms, first.neumann_convention, first.coft_eps)
    return fold_oft(w0, blocks, first.embedding)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    """Engine entry, one whole tensor: all experts OFT adapters -> the OFT path; else ORD on the experts'
    full weights (full fine-tunes, LoRA materialised as W₀ + s·B·A, OFT folded). Decompositions run on
    one thread, so the bytes do not depend on the thread count (``streammerge/threads.py``)."""
    with one_thread():
        return _merge(inputs)


def _merge(inputs: ChunkInputs) -> torch.Tensor:
    p: OrthoMergeParams = inputs.params
    run = inputs.run if isinstance(inputs.run, OrthoRun) else None
    kinds = [e.kind for e in inputs.experts]
    if run is not None and run.path is None:
        run.path = describe_path(kinds, p)
        log.info("%s", run.path)
    if kinds and all(k == "oft" for k in kinds):
        return merge_oft(inputs.base, [e.aux[OFT_INPUT]() for e in inputs.experts], p, inputs.tensor, run)
    if p.output != "model":
        raise ConfigError("orthomerge: output: adapter needs every model to be an OFT adapter")
    return decouple_merge(
        inputs.base,
        [e.load for e in inputs.experts],
        p,
        orthogonal=takes_orthogonal_part(inputs.tensor, inputs.shape, p),
        name=inputs.tensor,
        report=run.decouple if run is not None else None,
    )


OFT_PATH_PARAMETERS = frozenset({"lambda", "norm_aggregate", "direction_weighting", "output"})
ORD_PARAMETERS = frozenset({
    "variant", "residual_method", "lambda", "norm_aggregate", "direction_weighting", "procrustes_eps",
    "cayley_min_sigma", "orthogonal_embeddings", "orthogonal_lm_head", "output",
})


def used_parameters(kinds: list[str], given: Mapping[str, Any]) -> frozenset[str]:
    """The parameters the path for experts of ``kinds`` uses: the OFT path (all OFT adapters) merges
    generators only; ORD uses ``density`` only with ``residual_method: ties``."""
    if kinds and all(k == "oft" for k in kinds):
        return OFT_PATH_PARAMETERS
    return ORD_PARAMETERS | ({"density"} if given.get("residual_method") == "ties" else frozenset())
def working_set_bytes(name: str, shape: tuple[int, ...], n_experts: int) -> int:
    """Estimated peak bytes for one tensor (the plan's figure; default parameters): ORD's Procrustes
    working set on the path ``ord_subspace.choose_path`` takes for a matrix, else about six copies of the
    tensor (the residual-only and OFT paths), plus two fp32 copies of the tensor queued for the writer."""
    numel = math.prod(shape)
    params = OrthoMergeParams()
    ws = 6 * 4 * numel
    if takes_orthogonal_part(name, tuple(shape), params):
        d_out, d_in = shape
        path = ord_subspace.choose_path((d_out, d_in), params.procrustes_eps)
        elements = ord_subspace.working_set_elements(d_out, d_in, n_experts, path)
        ws = max(ws, elements * work_dtype(d_in).itemsize)
    return ws + 2 * 4 * numel


METHOD = MergeMethod(
    "orthomerge", merge, OrthoMergeParams, NoParams, base_model="required", elementwise=False, start_run=OrthoRun,
    used_parameters=used_parameters,
    working_set=working_set_bytes,
)
