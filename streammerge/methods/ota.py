"""OTA merging with Fast Fisher Grafting (REFERENCE §3): experts averaged with curvature weights.

    vᵢ   expert i's Adam second moment (exp_avg_sq) for this tensor, fp32, as stored
    wᵢ = cᵢ·v̄ᵢ^p + ε,  v̄ᵢ = vᵢ (or vᵢ / (1 − β₂^step) with ``bias_correction``)
    sᵢ = vᵢ ⊙ τᵢ²,  mᵢ = [sᵢ ≥ Tᵢ]           FFG saliency and mask (only for experts with density/threshold)
    θ  = θ₀ + Σ wᵢmᵢτᵢ / Σ wᵢmᵢ               a masked entry leaves numerator and denominator
         where Σ wᵢmᵢ = 0 (every expert masked): θ₀ (``fallback_to_base``) or the plain mean of the θᵢ
    no base model: θ = Σ wᵢθᵢ / Σ wᵢ          (FFG needs τ, hence a base)

cᵢ = ``scaling_factor``, p = ``power``. The saliency uses the stored v, never v^p, and not the bias
correction, so absolute thresholds keep the meaning they have in the authors' configs (the correction
is a per-expert constant and does not change which entries a ``density`` keeps). No λ, as in the paper.

**epsilon** defaults to 1e-26 (the authors' configs), not their code's 1e-8: with p = 0.5 a typical
fine-tuning v of 1e-14..1e-10 gives v^p of 1e-7..1e-5, so 1e-8 would shift weights by up to 10 %.
1e-26 is negligible for any v > 1e-40 at p ≤ 0.5 and still keeps Σ wᵢ > 0 where every vᵢ is 0
(then the experts are averaged evenly). For p > 1, lower it (fp32 keeps values down to ~1e-38).

**FFG thresholds.** ``threshold`` is absolute (the authors' per-model values). ``density`` is the
fraction of the expert's entries kept over the whole model: ``OtaRun.observe`` runs a first streaming
pass over every tensor's chunks, adding each expert's saliency to a 2¹⁸-bin histogram of the fp32 bit
pattern (non-negative floats order like their bits: 1024 bins per octave) and ``OtaRun.calibrate``
picks Tᵢ, interpolating inside the bin holding the requested quantile. ``merge`` counts the entries it
keeps, so the density achieved is exact and reported (``OtaRun.report``); it is within ±0.5 % of the
request on continuous saliency distributions (tests/test_ota.py). Entries tied at Tᵢ are all kept.

**Tensors without a second moment** (an expert's sidecar lacks the tensor): with
``missing_second_moment: linear`` (default) the whole tensor is merged as θ = θ₀ + Σ cᵢτᵢ / Σ cᵢ
(= Σ cᵢθᵢ / Σ cᵢ; without a base the latter), unmasked, logged, listed in ``OtaRun.report`` and
left out of the density counts; with ``error`` it is a ``ConfigError``.

Engine contract: ``ExpertInput.aux[SECOND_MOMENT]`` loads expert i's v for the chunk (fp32, shaped
like the chunk) and is absent (or returns None) when that expert has none for this tensor;
``aux[BIAS_CORRECTION]`` (needed only with ``bias_correction``) returns 1 / (1 − β₂^step) as a 0-d
tensor, or None when the step or β₂ is unknown (see ``bias_correction_factor``). ``inputs.run`` is
the merge's one ``OtaRun`` (calibrated first when any expert has a ``density``), or None when no
expert uses ``density``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import struct
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError, StreamMergeError
from .base import SECOND_MOMENT, SECOND_MOMENT_RANK1, ChunkInputs, MergeMethod, Rank1Chunk
from .base import SECOND_MOMENT_BIAS_CORRECTION as BIAS_CORRECTION

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")


HIST_SHIFT = 13  # bins = the upper 18 bits of a non-negative fp32: 8 exponent + 10 mantissa bits
HIST_BINS = 1 << (31 - HIST_SHIFT)
SMALLEST_SUBNORMAL = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23  # 1.4e-45: > 0, below every sum of w


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class OtaParams:
    power: float = 0.5  # p in wᵢ = cᵢ·vᵢ^p + ε
    epsilon: float | None = None  # ε: 1e-26 (see the module docstring for why not 1e-8); the authors' language: 1e-8
    fallback_to_base: bool | None = None  # all experts masked at an entry: θ₀ (true) or the experts' mean;
    #                                       default true, the authors' language false
    bias_correction: bool = False  # divide v by 1 − β₂^step (step and β₂ from each expert's sidecar)
    # a tensor without v: merge linearly, or fail; default linear, the authors' language error
    missing_second_moment: Literal["linear", "error"] | None = None
    # the OTA authors' language only (models given with preconditioner_path; see ota_authors.py)
    normalise: Literal["none", "global"] = "none"
    rescale: bool = False
    approximate_norm: bool = False
    rescale_relative_threshold: float = 1e-6
    masked_task_vector_merge_method: Literal["precond", "linear", "ties"] = "precond"
    ties_density: float | None = None

    def __post_init__(self):
        if not _number(self.power) or self.power < 0:
            raise ValueError(f"ota: power must be a number >= 0, got {self.power!r}")
        if self.epsilon is not None and (not _number(self.epsilon) or self.epsilon <= 0):
            raise ValueError(f"ota: epsilon must be a number > 0 (it keeps Σ wᵢ positive), got {self.epsilon!r}")
        if self.missing_second_moment not in (None, "linear", "error"):
            raise ValueError(
                f"ota: missing_second_moment must be 'linear' or 'error', got {self.missing_second_moment!r}"
            )
        if not isinstance(self.normalise, str) or self.normalise.lower() not in ("none", "global"):
            raise ValueError(f"ota: normalise must be 'none' or 'global', got {self.normalise!r}")
        if self.masked_task_vector_merge_method not in ("precond", "linear", "ties"):
            raise ValueError("ota: masked_task_vector_merge_method must be 'precond', 'linear' or 'ties', got "
                             f"{self.masked_task_vector_merge_method!r}")
        if not _number(self.rescale_relative_threshold):
            raise ValueError(
                f"ota: rescale_relative_threshold must be a number, got {self.rescale_relative_threshold!r}"
            )
        if self.ties_density is not None and not (_number(self.ties_density) and 0 <= self.ties_density):
            raise ValueError(f"ota: ties_density must be a number >= 0, got {self.ties_density!r}")

    def resolved(self, authors: bool) -> OtaParams:
        """These parameters with the unset defaults of streammerge's language, or the authors' (``authors``)."""
        return dataclasses.replace(
            self,
            epsilon=self.epsilon if self.epsilon is not None else (1e-8 if authors else 1e-26),
            fallback_to_base=self.fallback_to_base if self.fallback_to_base is not None else not authors,
            missing_second_moment=self.missing_second_moment or ("error" if authors else "linear"),
        )


@dataclass(frozen=True)
class OtaModelParams:
    scaling_factor: float = 1.0  # cᵢ
    density: float | None = None  # FFG: fraction of this expert's entries kept over the whole model, in (0, 1]
    threshold: float | None = None  # FFG: absolute saliency threshold Tᵢ (instead of density)
    # the OTA authors' language (see ota_authors.py); preconditioner_path selects it
    preconditioner_path: str | None = None  # the expert's second-moment file (opened by the planner)
    precond_threshold: float | None = None  # FFG threshold: v·τ² ≥ T with a base, v ≥ T without
    rank1_approx: bool = False  # approximate 2-D v by r·(c/Σv) at merge time
    rank: int | None = None  # approximate 2-D v (not embeddings) by its rank-K truncated SVD, clamped at 0
    weight: float | None = None  # accepted and ignored, as the authors' code does

    def __post_init__(self):
        if not _number(self.scaling_factor) or self.scaling_factor < 0:
            raise ValueError(f"ota: scaling_factor must be a number >= 0, got {self.scaling_factor!r}")
        if self.density is not None and not (_number(self.density) and 0 < self.density <= 1):
            raise ValueError(f"ota: density must be a number in (0, 1], got {self.density!r}")
        if self.threshold is not None and not (_number(self.threshold) and self.threshold >= 0):
            raise ValueError(f"ota: threshold must be a number >= 0, got {self.threshold!r}")
        if self.precond_threshold is not None and not _number(self.precond_threshold):
            raise ValueError(f"ota: precond_threshold must be a finite number, got {self.precond_threshold!r}")
        if self.density is not None and self.threshold is not None:
            raise ValueError("ota: give an expert either density or threshold, not both")
        given = [k for k in ("density", "threshold", "precond_threshold") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"ota: give an expert one of density, threshold, precond_threshold, not {' and '.join(given)}"
            )
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"ota: rank must be a positive integer, got {self.rank!r}")
        if self.preconditioner_path is not None and not isinstance(self.preconditioner_path, str):
            raise ValueError(f"ota: preconditioner_path must be a path, got {self.preconditioner_path!r}")


# --- pure formulas (fp32 tensors in, fresh fp32 tensors out) -----------------------------------------


def bias_correction_factor(step: int, beta2: float) -> float:
    """1 / (1 − β₂^step): Adam's second-moment bias correction (step >= 1, 0 < β₂ < 1)."""
    if step < 1 or not 0 < beta2 < 1:
        raise ValueError(f"bias correction needs step >= 1 and 0 < beta2 < 1, got step={step}, beta2={beta2}")
    return 1.0 / (1.0 - beta2**step)


def ota_weight(v: torch.Tensor, scaling_factor: float, power: float, epsilon: float) -> torch.Tensor:
    """wᵢ = cᵢ·vᵢ^p + ε (a new tensor, v's shape)."""
    w = v.sqrt() if power == 0.5 else v.pow(power)
    if scaling_factor != 1.0:
        w.mul_(scaling_factor)
    return w.add_(epsilon)


def saliency(v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """FFG saliency sᵢ = vᵢ ⊙ τᵢ² (a new tensor)."""
    return delta.square().mul_(v)


def ffg_mask(s: torch.Tensor, threshold: float) -> torch.Tensor:
    """mᵢ = [sᵢ ≥ Tᵢ] (bool)."""
    return s >= threshold


# --- global FFG calibration ---------------------------------------------------------------------------


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _fp32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


class SaliencyHistogram:
    """Counts of non-negative fp32 values by the upper 18 bits of their bit pattern (1024 bins per octave)."""

    def __init__(self, device: torch.device = _CPU):
        self.counts = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)

    @staticmethod
    def bin_counts(s: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """Per-bin counts (int64, HIST_BINS) of a non-negative fp32 tensor (``consume``: reuse its memory)."""
        # the upper 18 bits below the sign: an arithmetic shift, then the sign's copies masked off
        # (-0.0 counts as 0)
        bits = s.reshape(-1).view(torch.int32)
        bits = bits.bitwise_right_shift_(HIST_SHIFT) if consume and s.is_contiguous() else bits >> HIST_SHIFT
        bits &= HIST_BINS - 1
        return torch.bincount(bits, minlength=HIST_BINS)

    def add(self, s: torch.Tensor) -> None:
        self.counts += self.bin_counts(s).to(self.counts.device)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def threshold(self, density: float) -> float | None:
        """T with about ``density``·total values ≥ T (None: keep all). Linear inside the quantile's bin."""
        total = self.total
        if density >= 1 or total == 0:
            return None
        target = density * total  # entries to keep (fractional)
        from_top = self.counts.flip(0).cumsum(0).to("cpu", torch.float64)  # from_top[j]: values in the top j+1 bins
        j = min(int(torch.searchsorted(from_top, torch.tensor([target], dtype=torch.float64))), HIST_BINS - 1)
        b = HIST_BINS - 1 - j  # the bin holding the target quantile
        above = int(from_top[j - 1]) if j > 0 else 0
        in_bin = int(from_top[j]) - above
        lo = _bits_to_float(b << HIST_SHIFT)
        if b == HIST_BINS - 1 or in_bin == 0:
            return lo
        hi = _bits_to_float((b + 1) << HIST_SHIFT)
        frac = min(max((target - above) / in_bin, 0.0), 1.0)
        return _fp32(hi - frac * (hi - lo))


class OtaRun:
    """An OTA merge's whole-model state: FFG calibration (pass 1), then what the merge pass kept.

    Pass 1, only when some expert has ``density``: ``observe(inputs)`` for every chunk of every merged
    tensor, then ``calibrate()``. Pass 2: ``merge`` with ``inputs.run = run``. Then ``report()``.
    """

    def __init__(self, n_experts: int, device: torch.device = _CPU):
        self.histograms = [SaliencyHistogram(device) for _ in range(n_experts)]
        self.densities: list[float | None] = [None] * n_experts
        self._resolved = [False] * n_experts
        self.thresholds: list[float | None] | None = None  # per expert, after calibrate()
        self.kept = [0] * n_experts  # entries with mᵢ = 1 (experts with a threshold)
        self.seen = [0] * n_experts  # entries the mask was evaluated on
        self.all_masked = 0  # entries where every expert was masked (took the fallback)
        self.missing: dict[str, list[int]] = {}  # tensor -> experts lacking v (merged linearly)

    def _density(self, inputs: ChunkInputs, i: int) -> float | None:
        density = inputs.experts[i].params.density
        known = self.densities[i]
        if not self._resolved[i] and self.thresholds is None:
            self.densities[i], self._resolved[i] = density, True
        elif density != known:
            raise ConfigError(
                f"ota: expert #{i}: density is a whole-model fraction and must be one value for every tensor "
                f"({known} elsewhere, {density} for {inputs.tensor}); use threshold for per-tensor values"
            )
        return density

    def needs_calibration(self, model_params: list[OtaModelParams]) -> bool:
        """A calibration pass is needed when some expert asks for a whole-model ``density``."""
        return any(mp.density is not None for mp in model_params)

    def observe(self, inputs: ChunkInputs) -> None:
        """Calibration pass: add this chunk's saliency of every expert that has a ``density``."""
        if inputs.base is None:
            if any(e.params.density is not None for e in inputs.experts):
                raise ConfigError("ota: density (FFG) needs a base_model: the saliency is v·(θᵢ − θ₀)²")
            return
        densities = [self._density(inputs, i) for i in range(len(inputs.experts))]
        if any(SECOND_MOMENT not in e.aux for e in inputs.experts):
            return  # merged linearly (see merge): not part of any expert's density
        pending = []
        for i, density in enumerate(densities):
            if density is None:
                continue
            moment = _second_moment(inputs, i, check=False)  # checked by the merge pass before anything uses it
            if moment is None:
                return
            v = moment.v()
            s = inputs.experts[i].delta(inputs.base).square_().mul_(v)  # saliency(v, τ), in τ's buffer
            del v
            pending.append((i, SaliencyHistogram.bin_counts(s, consume=True)))
            del s
        for i, counts in pending:  # committed only once every expert had v for this chunk
            self.histograms[i].counts += counts.to(self.histograms[i].counts.device)

    def reduce_calibration(self, all_reduce_sum_, all_gather) -> None:
        """Distributed merge: several processes each observed part of the model. Sum their histograms (exact
        integer counts: the thresholds equal one process's) and agree on each expert's density."""
        for h in self.histograms:
            all_reduce_sum_(h.counts)
        seen = all_gather(list(zip(self._resolved, self.densities, strict=True)))
        for i in range(len(self.densities)):
            values = {d for per_rank in seen for resolved, d in [per_rank[i]] if resolved}
            if len(values) > 1:
                raise ConfigError(
                    f"ota: expert #{i}: density is a whole-model fraction and must be one value for every tensor "
                    f"(found {', '.join(map(str, sorted(values)))}); use threshold for per-tensor values"
                )
            if values:
                self.densities[i], self._resolved[i] = values.pop(), True

    def absorb(self, other: OtaRun) -> None:
        """Add another process's merge-pass counts (a distributed merge's report)."""
        for i in range(len(self.kept)):
            self.kept[i] += other.kept[i]
            self.seen[i] += other.seen[i]
        self.all_masked += other.all_masked
        for name, lacking in other.missing.items():
            self.missing.setdefault(name, lacking)

    def __getstate__(self) -> dict:
        """Sent between processes for ``absorb``: the counts, not the histograms (device tensors)."""
        return {**self.__dict__, "histograms": []}

    def calibrate(self) -> list[float | None]:
        """Fix each density expert's threshold from its histogram. Returns the thresholds (None: no mask)."""
        pairs = zip(self.histograms, self.densities, strict=True)
        self.thresholds = [None if d is None else h.threshold(d) for h, d in pairs]
        for i, (d, t) in enumerate(zip(self.densities, self.thresholds, strict=False)):
            if d is not None and self.histograms[i].total == 0:
                log.warning(
                    "ota: expert #%d has density %g but no tensor with second moments for every expert; "
                    "nothing is masked",
                    i,
                    d,
                )
            elif d is not None:
                log.info(
                    "ota: expert #%d: density %.4g -> saliency threshold %s over %d entries",
                    i,
                    d,
                    "none" if t is None else f"{t:.6g}",
                    self.histograms[i].total,
                )
        return self.thresholds

    def report(self) -> list[str]:
        """Human-readable lines: density achieved per masked expert, fallbacks used."""
        lines = []
        for i, (kept, seen) in enumerate(zip(self.kept, self.seen, strict=False)):
            if seen:
                want = f"density {self.densities[i]:.4g} requested, " if self.densities[i] is not None else ""
                t = self.thresholds[i] if self.thresholds and self.thresholds[i] is not None else None
                at = f" at threshold {t:.6g}" if t is not None else ""
                lines.append(f"expert #{i}: {want}kept {kept / seen:.4%} of {seen:,} entries{at}")
        if self.all_masked:
            lines.append(f"{self.all_masked:,} entries had every expert masked and took the fallback")
        if self.missing:
            names = list(self.missing)
            lines.append(
                f"{len(names)} tensors lacked a second moment for some expert and were merged linearly: "
                + ", ".join(names[:5])
                + (" ..." if len(names) > 5 else "")
            )
        return lines


# --- the chunk-level merge ------------------------------------------------------------------------------


class _Moment:
    """One expert's second moment for the current chunk: a dense tensor, or rank-1 factors that give
    ``v`` and ``w = c·v^p + ε`` in one pass each (no full-size sqrt, no per-chunk range check).
    ``shape`` is the chunk's (that of the expert's chunk it weighs)."""

    def __init__(self, shape: torch.Size, dense: torch.Tensor | None = None, rank1: Rank1Chunk | None = None):
        self.shape, self.dense, self.rank1 = shape, dense, rank1

    def v(self) -> torch.Tensor:
        """vᵢ for the chunk, fp32 (the caller may modify it)."""
        return self.dense if self.dense is not None else self.rank1.expand().reshape(self.shape)

    def weight(
        self, v: torch.Tensor | None, scaling_factor: float, power: float, epsilon: float, correction: float = 1.0
    ) -> torch.Tensor:
        """wᵢ = cᵢ·(k·vᵢ)^p + ε (k: bias correction). ``v``: the dense v, consumed (modified in place)."""
        if self.rank1 is None:
            if correction != 1.0:
                v *= correction
            return ota_weight(v, scaling_factor, power, epsilon)
        f = self.rank1  # (k·r ⊗ c)^p = (k·r)^p ⊗ c^p for non-negative factors
        rows = f.rows * correction if correction != 1.0 else f.rows
        rows, cols = (rows.sqrt(), f.cols.sqrt()) if power == 0.5 else (rows.pow(power), f.cols.pow(power))
        if scaling_factor != 1.0:
            rows = rows * scaling_factor
        return f.expand(rows, cols, plus=epsilon).reshape(self.shape)


def _second_moment(inputs: ChunkInputs, i: int, check: bool = True) -> _Moment | None:
    """Expert i's second moment for this chunk (None: its sidecar lacks the tensor). Dense values are
    checked (non-negative, finite) unless ``check`` is off; rank-1 factors are checked by the sidecar."""
    aux = inputs.experts[i].aux
    shape = inputs.base.shape if inputs.base is not None else None
    rank1_loader = aux.get(SECOND_MOMENT_RANK1)
    rank1 = rank1_loader() if rank1_loader is not None else None
    if rank1 is not None:
        shape = shape if shape is not None else torch.Size([rank1.count])  # flat: the caller reshapes to θᵢ's
        if rank1.count != math.prod(shape):
            raise StreamMergeError(
                f"ota: {inputs.tensor}: expert #{i}'s second moment has {rank1.count} elements, "
                f"the tensor chunk {math.prod(shape)}; the sidecar belongs to another model"
            )
        return _Moment(shape, rank1=rank1)
    loader = aux.get(SECOND_MOMENT)
    v = loader() if loader is not None else None
    if v is None:
        return None
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise StreamMergeError(
            f"ota: {inputs.tensor}: expert #{i}'s second moment has shape {list(v.shape)}, "
            f"the tensor chunk {list(shape)}; the sidecar belongs to another model"
        )
    v = v.to(device=inputs.device, dtype=torch.float32)
    if check and v.numel():
        lo, hi = torch.aminmax(v)
        if not (lo >= 0 and torch.isfinite(hi)):
            raise StreamMergeError(
                f"ota: {inputs.tensor}: expert #{i}'s second moment has negative, NaN or infinite "
                f"values (min {float(lo):g}, max {float(hi):g}); its sidecar is corrupt"
            )
    return _Moment(v.shape, dense=v)


def _correction(inputs: ChunkInputs, i: int) -> float:
    loader = inputs.experts[i].aux.get(BIAS_CORRECTION)
    factor = loader() if loader is not None else None
    if factor is None:
        raise ConfigError(
            f"ota: bias_correction: expert #{i} has no step count or beta2 for {inputs.tensor}; "
            "its sidecar does not record them (set bias_correction: false)"
        )
    return float(factor)


def _thresholds(inputs: ChunkInputs, run: OtaRun | None) -> list[float | None]:
    out = []
    for i, expert in enumerate(inputs.experts):
        if expert.params.density is None:
            out.append(expert.params.threshold)
            continue
        if run is None or run.thresholds is None:
            raise ConfigError(f"ota: expert #{i} has a density but no calibration ran (OtaRun.observe + calibrate)")
        if run.densities[i] != expert.params.density:
            raise ConfigError(
                f"ota: expert #{i}: density {expert.params.density} for {inputs.tensor} differs from "
                f"the calibrated {run.densities[i]}; density must be one value for the whole model"
            )
        out.append(run.thresholds[i])
    return out


def _count_ones(keep: torch.Tensor) -> int:
    """How many entries of a 1.0/0.0 tensor are 1: an fp32 sum is exact below 2²⁴ entries (every partial
    sum is an integer fp32 holds) and far cheaper than a float64 one or count_nonzero on floats."""
    return int(keep.sum() if keep.numel() < 1 << 24 else keep.sum(dtype=torch.float64))


def _curvature_merge(inputs: ChunkInputs, thresholds: list[float | None], run: OtaRun | None) -> torch.Tensor | int:
    """The OTA/FFG formula, expert by expert; or the index of the first expert without a second moment."""
    p, base = inputs.params, inputs.base
    masking = any(t is not None for t in thresholds)
    num = den = mean = None
    counts: list[tuple[int, int, int]] = []  # (expert, kept, seen)
    for i, expert in enumerate(inputs.experts):
        moment = _second_moment(inputs, i)
        if moment is None:
            return i
        x = expert.delta(base) if base is not None else expert.load()  # τᵢ, or θᵢ without a base
        if masking and not p.fallback_to_base and mean is None:
            mean = torch.zeros_like(x)
        v = moment.v().view(x.shape) if thresholds[i] is not None or moment.rank1 is None else None
        keep = None
        if thresholds[i] is not None:
            # mᵢ as 1.0/0.0 in the saliency's own buffer: a float multiply below, where a bool mask
            # would take torch's slow mixed-dtype path (masked_fill/where are slower still)
            keep = saliency(v, x).ge_(thresholds[i])
            counts.append((i, _count_ones(keep), keep.numel()))
        correction = _correction(inputs, i) if p.bias_correction else 1.0
        w = moment.weight(v, expert.params.scaling_factor, p.power, p.epsilon, correction).view(x.shape)
        del v, moment
        if keep is not None:
            w.mul_(keep)
            del keep
        if mean is not None:
            mean += x
        if num is None:  # the first expert starts the sums (0 + a is a: no zero buffers to fill)
            num, den = w.mul(x), w
        else:
            num.addcmul_(w, x)
            den += w
        del w, x
    empty, n_empty = None, 0
    if masking:  # every expert masked: Σwᵢmᵢ = 0 and Σwᵢmᵢτᵢ = ±0 there
        empty = den == 0
        n_empty = int(torch.count_nonzero(empty))
        if n_empty and mean is None:
            den.clamp_(min=SMALLEST_SUBNORMAL)  # ±0 / tiny = ±0: the fallback to the base, no NaN, no select
        if run is not None:
            run.all_masked += n_empty
    merged = num.div_(den)
    if n_empty and mean is not None:
        merged = torch.where(empty, mean.div_(len(inputs.experts)), merged)
    if run is not None:
        for i, kept, seen in counts:
            run.kept[i] += kept
            run.seen[i] += seen
    return merged.add_(base) if base is not None else merged


def _linear_merge(inputs: ChunkInputs) -> torch.Tensor:
    """θ₀ + Σ cᵢτᵢ / Σ cᵢ (no base: Σ cᵢθᵢ / Σ cᵢ): the rule for a tensor without second moments."""
    weights = [e.params.scaling_factor for e in inputs.experts]
    if sum(weights) == 0:
        raise ConfigError(f"ota: {inputs.tensor} has no second moment and the scaling_factors sum to 0")
    out = None
    for expert, c in zip(inputs.experts, weights, strict=False):
        x = expert.delta(inputs.base) if inputs.base is not None else expert.load()
        x *= c
        out = x if out is None else out.add_(x)
    out /= sum(weights)
    return out.add_(inputs.base) if inputs.base is not None else out


def merge(inputs: ChunkInputs) -> torch.Tensor:
    """OTA (+ FFG) for one chunk; see the module docstring. fp32 in, fp32 out, the chunk's shape."""
    from . import ota_authors  # the authors' language: models given with preconditioner_path

    if ota_authors.uses_authors_language(inputs):
        return ota_authors.merge(inputs)
    inputs = dataclasses.replace(inputs, params=inputs.params.resolved(authors=False))
    run = inputs.run if isinstance(inputs.run, OtaRun) else None
    if not inputs.experts:
        if inputs.base is None:
            raise ConfigError(f"ota: no models to merge for {inputs.tensor}")
        return inputs.base.clone()
    thresholds = _thresholds(inputs, run)
    if inputs.base is None and any(t is not None for t in thresholds):
        raise ConfigError("ota: density/threshold (FFG) need a base_model: the saliency is v·(θᵢ − θ₀)²")
    merged = _curvature_merge(inputs, thresholds, run)
    if isinstance(merged, torch.Tensor):
        return merged
    lacking = sorted({merged} | {i for i, e in enumerate(inputs.experts) if SECOND_MOMENT not in e.aux})
    if inputs.params.missing_second_moment == "error":
        raise ConfigError(
            f"ota: no second moment for {inputs.tensor} in the sidecar of expert(s) "
            f"{', '.join(f'#{i}' for i in lacking)} (missing_second_moment: error)"
        )
    if run is not None and inputs.tensor not in run.missing:
        run.missing[inputs.tensor] = lacking
        log.warning(
            "ota: %s: no second moment for expert(s) %s; merged linearly by scaling_factor", inputs.tensor, lacking
        )
    return _linear_merge(inputs)


def _prepare(chunks):
    from . import ota_authors

    return ota_authors.prepare(chunks)


def _validate(params: OtaParams, model_params: list[OtaModelParams]) -> None:
    from . import ota_authors

    ota_authors.validate(params, model_params)


METHOD = MergeMethod(
    "ota", merge, OtaParams, OtaModelParams, base_model="optional", prepare=_prepare, start_run=OtaRun,
    model_keys=frozenset({"sidecar"}), validate=_validate,
)
