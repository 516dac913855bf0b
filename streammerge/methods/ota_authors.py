"""OTA in the authors' own configuration language (their fork pmahdavi/ota-merge, ``merge_methods/ota.py``).

Selected when the models give ``preconditioner_path`` (their name for the second-moment file).
Per tensor and expert, in their order (v: the expert's exp_avg_sq, approximated first when the
model asks ``rank1_approx`` or ``rank``, see ``streammerge/preconditioners.py``):

    mᵢ = [vᵢ·τᵢ² ≥ Tᵢ] with a base, [vᵢ ≥ Tᵢ] without   (only for experts with a ``precond_threshold``)
    Pᵢ = cᵢ·vᵢ^p;  ``normalise: global``: Pᵢ ← Pᵢ / (mean(Pᵢ) + ε)   (mean over the whole tensor)
    wᵢ = (Pᵢ + ε)·mᵢ                                      (ε added after power and normalisation, then masked)
    with a base, τᵢ' = τᵢ, or with ``rescale`` sᵢ·mᵢ·τᵢ (sᵢ: hybrid norm of τᵢ over that of mᵢ·τᵢ, 0 when the
    masked norm is ≤ ``rescale_relative_threshold`` × the original; mask only when the norm is undefined),
    and by ``masked_task_vector_merge_method``:
        precond: θ = θ₀ + Σ wᵢτᵢ' / Σ wᵢ
        linear:  θ = θ₀ + Σ τᵢ' / N                     (τᵢ' unmasked unless ``rescale``: their code)
        ties:    θ = θ₀ + Σ [sign τᵢ' = σ]·τᵢ' / N,  σ = sign Σ τᵢ' (0 → +)
    without a base: θ = Σ wᵢθᵢ / Σ wᵢ
    with any threshold, entries with Σ wᵢ ≤ N·ε·1.1 ("fully masked", their test) take θ₀
    (``fallback_to_base`` and a base) or the experts' plain mean.

Their defaults: ε = 1e-8, power 0.5 (> 0), ``fallback_to_base`` false, a missing second moment is an
error; ``weight`` is accepted and ignored (logged). Hybrid norms (their ``_calculate_hybrid_norm``):
``model.embed_tokens.weight``/``lm_head.weight``: ℓ1→RMS = max column 2-norm / √d_out; other 2-D:
RMS→RMS = √(d_in/d_out)·σ_max (exact, or 10 power-iteration steps with ``approximate_norm``, here
from a start vector seeded by the config seed and tensor name, so runs repeat); 1-D: RMS.

Whole-tensor statistics (the ``global`` mean, the rescale factors) come from ``prepare``: the mean is
summed by ``GroupSums`` on fp64 terms (fp64 sums of fixed 2¹⁴-element units aligned to the tensor start,
each below torch's parallel grain, added in order), so it depends neither on the chunking nor on the
thread count; each rescale factor
is computed from the whole task vector of one expert at a time (one fp32 tensor plus its mask).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..threads import one_thread
from .base import SECOND_MOMENT, SECOND_MOMENT_RANK1, ChunkInputs, Rank1Chunk
from .group_sums import GroupSums
from .ota import (
    SMALLEST_SUBNORMAL,
    OtaModelParams,
    OtaParams,
    OtaRun,
    _correction,
    _count_ones,
    _linear_merge,
    _second_moment,
    ota_weight,
    saliency,
)

log = logging.getLogger(__name__)

FEED_ELEMENTS = 1 << 20  # normalise: global: terms widened to fp64 this many at a time for GroupSums
POWER_ITERATIONS = 10  # their _approximate_spectral_norm
L1_RMS_NAMES = ("lm_head.weight", "model.embed_tokens.weight")  # their exact names for the ℓ1→RMS norm
AUTHORS_GLOBAL = {"normalise": "none", "rescale": False, "approximate_norm": False,
                  "rescale_relative_threshold": 1e-6, "masked_task_vector_merge_method": "precond",
                  "ties_density": None}
AUTHORS_MODEL = {"precond_threshold": None, "rank1_approx": False, "rank": None, "weight": None}


def uses_authors_language(inputs: ChunkInputs) -> bool:
    return any(e.params.preconditioner_path is not None for e in inputs.experts)


def validate(params: OtaParams, model_params: list[OtaModelParams]) -> None:
    """Refuse what one language gives that the other does not use (raises ValueError)."""
    authors = [mp.preconditioner_path is not None for mp in model_params]
    if not any(authors):
        for key, default in AUTHORS_GLOBAL.items():
            if getattr(params, key) != default:
                raise ValueError(f"ota: {key} belongs to the OTA authors' language: give each model's second "
                                 "moments as parameters.preconditioner_path, or drop it")
        for mp in model_params:
            for key, default in AUTHORS_MODEL.items():
                if getattr(mp, key) != default:
                    raise ValueError(f"ota: per-model {key} belongs to the OTA authors' language: give each "
                                     "model's second moments as parameters.preconditioner_path, or drop it")
        return
    if not all(authors):
        raise ValueError("ota: every model needs parameters.preconditioner_path once one has it")
    if params.power <= 0:
        raise ValueError(f"ota: power must be > 0 with preconditioner_path (as the authors' code), got {params.power}")
    if params.ties_density is not None:
        raise ValueError("ota: ties_density (TIES trimming inside OTA) is not supported yet; drop it")
    if any(mp.weight is not None for mp in model_params):
        log.warning("ota: per-model weight is ignored with preconditioner_path, as in the authors' code")


# --- hybrid norms (their _calculate_hybrid_norm), on a whole fp32 tensor -------------------------------


def _spectral_norm(w: torch.Tensor, approximate: bool, generator: torch.Generator) -> torch.Tensor:
    if not approximate:
        return torch.linalg.norm(w, ord=2)
    d_in = w.shape[1]
    v = torch.randn(d_in, generator=generator, dtype=w.dtype)
    v = v / torch.linalg.norm(v)
    for _ in range(POWER_ITERATIONS):
        v = w.T @ (w @ v)
        n = torch.linalg.norm(v)
        if n == 0:
            return torch.tensor(0.0)
        v = v / n
    return torch.linalg.norm(w @ v)


def hybrid_norm(t: torch.Tensor, name: str, approximate: bool = False, seed: int = 0) -> float:
    """Their hybrid operator norm of ``t`` (fp32, full shape); NaN where they give none (0-D, 3-D+)."""
    if t.numel() == 0:
        return 0.0
    if name in L1_RMS_NAMES:
        if t.ndim != 2:
            return float("nan")
        return float((1 / torch.sqrt(torch.tensor(t.shape[0]))) * torch.linalg.norm(t, ord=2, dim=0).max())
    if t.ndim == 2:
        d_out, d_in = t.shape
        g = torch.Generator().manual_seed(seed)
        return float(torch.sqrt(torch.tensor(d_in / d_out)) * _spectral_norm(t, approximate, g))
    if t.ndim == 1:
        return float(torch.sqrt(torch.mean(t.pow(2))))
    return float("nan")


def rescale_factor(original: float, masked: float, relative_threshold: float) -> float | None:
    """sᵢ for a masked task vector: orig/masked, 0 below the relative threshold, None (mask only) if undefined."""
    if math.isnan(original):
        return None
    if not math.isnan(masked) and masked > original * relative_threshold:
        return original / masked
    return 0.0


# --- per-tensor statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorsTensorState:
    scales: list[float] | None  # normalise: global: cᵢ / (mean(cᵢ·vᵢ^p) + ε), the folded scaling factor
    rescale: list[float | None] | None  # rescale: sᵢ per expert (None: mask only)


def _resolved(inputs: ChunkInputs) -> OtaParams:
    return inputs.params.resolved(authors=True)


def _masks_thresholds(inputs: ChunkInputs, run: OtaRun | None) -> list[float | None]:
    out = []
    for i, e in enumerate(inputs.experts):
        mp = e.params
        t = mp.precond_threshold if mp.precond_threshold is not None else mp.threshold
        if t is None and mp.density is not None:
            if run is None or run.thresholds is None:
                raise ConfigError(f"ota: expert #{i} has a density but no calibration ran")
            t = run.thresholds[i]
        out.append(t)
    return out


def _keep(inputs: ChunkInputs, v: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """mᵢ as 1.0/0.0 fp32: Fisher form with a base, raw v without."""
    if inputs.base is not None:
        return saliency(v, x).ge_(threshold)
    return v.ge(threshold).to(torch.float32)


def _needs_statistics(params: OtaParams, model_params: list[OtaModelParams]) -> bool:
    authors = any(mp.preconditioner_path is not None for mp in model_params)
    return authors and (params.normalise.lower() == "global" or params.rescale)


def prepare(chunks) -> AuthorsTensorState | None:
    """Whole-tensor statistics the authors' language needs (see the module docstring), or None."""
    known = getattr(chunks, "model_params", None), getattr(chunks, "params", None)
    if known[0] is not None and known[1] is not None and not _needs_statistics(known[1], known[0]):
        return None  # decided from the parameters, without reading a chunk
    first = next(iter(chunks()), None)
    if first is None or not uses_authors_language(first):
        return None
    p, base_known = _resolved(first), first.base is not None
    run = first.run if isinstance(first.run, OtaRun) else None
    n_experts, shape, name, seed = len(first.experts), first.shape, first.tensor, first.seed
    first_device = first.device
    factors = [e.params.scaling_factor for e in first.experts]
    if any(SECOND_MOMENT not in e.aux for e in first.experts):
        return None  # merged linearly (missing_second_moment: linear)
    del first
    scales = rescale = None
    numel = math.prod(shape)
    if p.normalise.lower() == "global" and numel:
        sums = [GroupSums(shape, "all", first_device) for _ in range(n_experts)]
        for inputs in chunks():
            for i, e in enumerate(inputs.experts):
                moment = _second_moment(inputs, i)
                correction = _correction(inputs, i) if p.bias_correction else 1.0
                v = moment.v() if moment.rank1 is None else None
                pw = moment.weight(v, e.params.scaling_factor, p.power, 0.0, correction).reshape(-1)
                for a in range(0, pw.numel(), FEED_ELEMENTS):  # fp64 terms, so each unit is summed in fp64
                    sums[i].add(inputs.start + a, pw[a : a + FEED_ELEMENTS].to(torch.float64))
                del pw, v, moment
            del inputs
        mean = [float(torch.tensor(float(s.result()[0]) / numel, dtype=torch.float32)) for s in sums]
        scales = [c / (m + p.epsilon) for c, m in zip(factors, mean, strict=True)]
    if p.rescale and base_known:
        seed32 = zlib.crc32(f"{seed}:{name}".encode())
        rescale = [_rescale_one(chunks, i, shape, name, p, run, seed32) for i in range(n_experts)]
    return AuthorsTensorState(scales, rescale) if scales is not None or rescale is not None else None


def _rescale_one(chunks, i: int, shape, name: str, p: OtaParams, run: OtaRun | None, seed: int) -> float | None:
    """sᵢ for expert i: its whole task vector (and mask) gathered chunk by chunk, one expert at a time."""
    numel = math.prod(shape)
    tv = torch.empty(numel, dtype=torch.float32)
    mask = None
    for inputs in chunks():
        x = inputs.experts[i].delta(inputs.base)
        lo, hi = inputs.start, inputs.start + x.numel()
        tv[lo:hi] = x.reshape(-1)
        t = _masks_thresholds(inputs, run)[i]
        if t is not None:
            if mask is None:
                mask = torch.ones(numel, dtype=torch.float32)
            v = _second_moment(inputs, i).v().view(x.shape)
            mask[lo:hi] = _keep(inputs, v, x, t).reshape(-1)
            del v
        del x, inputs
    tv = tv.view(shape)
    original = hybrid_norm(tv, name, p.approximate_norm, seed)
    if math.isnan(original) or mask is None:
        return None if math.isnan(original) else 1.0
    tv.mul_(mask.view(shape))
    del mask
    return rescale_factor(original, hybrid_norm(tv, name, p.approximate_norm, seed), p.rescale_relative_threshold)


# --- the chunk-level merge ------------------------------------------------------------------------------


# elements of one tile of the merge: its few buffers stay in the CPU's cache, and a tile's dozen small ops
# cost little beside their arithmetic (the merge runs on one thread, see ``merge``)
TILE_ELEMENTS = (1 << 17) - 1


@dataclass
class _ExpertChunk:
    """One expert's inputs for the whole chunk, read once; the merge slices tiles from them (flat, fp32
    unless ``stored``)."""

    shape: torch.Size  # the chunk's, as loaded
    stored: torch.Tensor | None  # the chunk as stored (bf16/fp16/fp32), widened and less the base per tile
    stored_range: Callable[[int, int], torch.Tensor] | None  # or read tile by tile: (lo, count) -> as stored
    loaded: torch.Tensor | None  # θᵢ in fp32 (``load``): without a base, or for the fully masked mean
    dense: torch.Tensor | None  # v (dense second moments)
    rank1: Rank1Chunk | None  # v as factors (``rank1_approx``)
    w_rows: torch.Tensor | None  # rank-1: cᵢ·(k·r)^p over the chunk's rows, so that w = w_rows ⊗ w_cols + ε
    w_cols: torch.Tensor | None
    threshold: float | None
    scale: float
    correction: float
    rescale: float | None


def _expert_chunk(inputs: ChunkInputs, i: int, moment, p: OtaParams, state, threshold: float | None,
                  need_theta: bool, by_tile: bool = False) -> _ExpertChunk:
    """Expert i's inputs for the chunk: read now, or (``by_tile``: see ``_by_tile_moments``) only the
    second-moment factors now and the weights tile by tile."""
    e, base = inputs.experts[i], inputs.base
    stored = loaded = stored_range = None
    if by_tile:
        stored_range, shape = e.load_stored_range, base.shape
    else:
        if base is not None and e.load_stored is not None:
            stored = e.load_stored()
            if stored.dtype not in WIDENED:
                stored = None  # ``ExpertInput.delta``'s fallback: the fp32 load
        if stored is None or need_theta:
            loaded = e.load()
        shape = stored.shape if stored is not None else loaded.shape
    scale = state.scales[i] if state is not None and state.scales is not None else e.params.scaling_factor
    correction = _correction(inputs, i) if p.bias_correction else 1.0
    w_rows = w_cols = None
    if moment.rank1 is not None:  # _Moment.weight's factors, once per chunk: (k·r ⊗ c)^p = (k·r)^p ⊗ c^p
        f = moment.rank1
        rows = f.rows * correction if correction != 1.0 else f.rows
        w_rows, w_cols = (rows.sqrt(), f.cols.sqrt()) if p.power == 0.5 else (rows.pow(p.power), f.cols.pow(p.power))
        if scale != 1.0:
            w_rows = w_rows * scale
    rescale = state.rescale[i] if state is not None and state.rescale is not None else None
    dense = moment.dense
    if dense is not None and dense.numel() != math.prod(shape):
        raise ConfigError(f"ota: {inputs.tensor}: expert #{i}'s second moment has {dense.numel()} elements, "
                          f"its tensor chunk {math.prod(shape)}; the preconditioner belongs to another model")
    return _ExpertChunk(shape, _flat(stored), stored_range, _flat(loaded), _flat(dense), moment.rank1, w_rows,
                        w_cols, threshold, scale, correction, rescale)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _rank1_tile(f: Rank1Chunk, rows: torch.Tensor, cols: torch.Tensor, lo: int, hi: int,
                plus: float | None = None) -> torch.Tensor:
    """Chunk elements [lo, hi) of ``rows ⊗ cols (+ plus)``: the same bits as ``Rank1Chunk.expand`` there."""
    n = cols.numel()
    first, last = f.offset + lo, f.offset + hi
    r0, r1 = first // n, (last - 1) // n + 1
    full = torch.outer(rows[r0:r1], cols)
    if plus is not None:
        full.add_(plus)
    return full.reshape(-1)[first - r0 * n : last - r0 * n]


def _tiles(count: int, chunk: _ExpertChunk, device: torch.device) -> list[tuple[int, int]]:
    """[lo, hi) tiles of a chunk of ``count`` elements: on the CPU, with rank-1 factors, whole rows of the
    tensor (about TILE_ELEMENTS each), so that no tile expands rows it does not use, else TILE_ELEMENTS
    each; on an accelerator the whole chunk (small kernels would cost launches, not save memory traffic)."""
    if device.type != "cpu":
        return [(0, count)] if count else []
    f = chunk.rank1  # the first expert's factors (tiles of any other cut give the same bits)
    if f is None or count == 0:
        return [(lo, min(lo + TILE_ELEMENTS, count)) for lo in range(0, count, TILE_ELEMENTS)]
    n = f.cols.numel()
    step = max(1, TILE_ELEMENTS // n) * n
    head = (-f.offset) % n  # elements before the chunk's first row boundary
    cuts = [0, *range(head, count, step), count]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False) if hi > lo]


def merge(inputs: ChunkInputs) -> torch.Tensor:
    """The authors' OTA for one chunk (see the module docstring). fp32 in, fp32 out, the chunk's shape.

    Each expert's ten or so elementwise passes run tile by tile (``_tiles``) on data in the CPU cache.
    With rank-1 second moments and a base (``_merge_by_tile``), every expert's terms of one tile are
    added into tile-long sums and the tile finished before the next, each expert's weights read a tile
    at a time; otherwise experts are taken one at a time (one expert's chunk in memory, as the engine
    plans), adding into whole-chunk sums that are then finished tile by tile. Each entry's value depends
    only on that entry's inputs, in the same order of operations, so either order and any tile size give
    the bytes whole-chunk passes give, and so does any thread count. The passes run on one thread:
    split across threads, each tile's hand-offs cost more than its arithmetic on a loaded machine."""
    with one_thread():
        return _merge_chunk(inputs)


def _merge_chunk(inputs: ChunkInputs) -> torch.Tensor:
    p, base, experts = _resolved(inputs), inputs.base, inputs.experts
    run = inputs.run if isinstance(inputs.run, OtaRun) else None
    state = inputs.state if isinstance(inputs.state, AuthorsTensorState) else None
    if not experts:
        if base is None:
            raise ConfigError(f"ota: no models to merge for {inputs.tensor}")
        return base.clone()
    thresholds = _masks_thresholds(inputs, run)
    active = any(t is not None for t in thresholds)
    need_theta = active and not (p.fallback_to_base and base is not None)
    mode = p.masked_task_vector_merge_method if base is not None else "precond"
    moments = _by_tile_moments(inputs, mode, need_theta)
    if moments is not None:
        chunks = [_expert_chunk(inputs, i, m, p, state, thresholds[i], False, by_tile=True)
                  for i, m in enumerate(moments)]
        return _merge_by_tile(inputs, p, chunks, active, mode, run)
    flat_base = base.reshape(-1) if base is not None else None
    sums: dict[str, torch.Tensor] = {}  # "num" Σwτ, "den" Σw, "acc" Στ (linear), "theta" Σθ: whole chunk
    vectors: list[torch.Tensor] = []  # ties: every expert's τ'
    kept: list[tuple[int, int]] = []
    shape = tiles = None
    for i in range(len(experts)):
        moment = _second_moment(inputs, i)
        if moment is None:
            return _missing(inputs, p, i)
        c = _expert_chunk(inputs, i, moment, p, state, thresholds[i], need_theta)
        del moment
        if tiles is None:
            shape = base.shape if base is not None else c.shape  # without a base: θ₀'s chunk as loaded
            tiles = _tiles(math.prod(shape), c, base.device if base is not None else c.loaded.device)
            for key in ("num", "den") + (("acc",) if mode == "linear" else ()) + (("theta",) if need_theta else ()):
                sums[key] = torch.empty(math.prod(shape), dtype=torch.float32, device=inputs.device)
        x_all = torch.empty_like(sums["den"]) if mode == "ties" else None
        ones = 0
        for lo, hi in tiles:
            ones += _expert_tile(inputs, p, c, i == 0, flat_base, lo, hi, mode, _cut(sums, lo, hi),
                                 x_all[lo:hi] if x_all is not None else None)
        if c.threshold is not None:
            kept.append((i, ones))
        if x_all is not None:
            vectors.append(x_all)
        del c, x_all
    count = math.prod(shape)
    out = sums["num"] if mode == "precond" else sums["acc"] if mode == "linear" else torch.empty_like(sums["den"])
    for lo, hi in tiles:
        n_fully = _finish_tile(p, len(experts), active, mode, _cut(sums, lo, hi), [x[lo:hi] for x in vectors],
                               flat_base, lo, hi, out[lo:hi])
        if run is not None:
            run.all_masked += n_fully
    if run is not None:
        for i, ones in kept:
            run.kept[i] += ones
            run.seen[i] += count
    return out.view(shape)


WIDENED = (torch.bfloat16, torch.float16, torch.float32)  # stored dtypes a tile widens by a plain copy


def _cut(sums: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {key: t[lo:hi] for key, t in sums.items()}


def _by_tile_moments(inputs: ChunkInputs, mode: str, need_theta: bool) -> list | None:
    """Every expert's rank-1 second moment when the chunk can be merged tile by tile across all experts
    (``_merge_by_tile``), else None: on the CPU, with a base, ``precond`` or ``linear``, no θᵢ needed,
    and every expert's weights readable a tile at a time in a dtype a copy widens."""
    base = inputs.base
    if base is None or base.device.type != "cpu" or mode == "ties" or need_theta:
        return None
    for e in inputs.experts:
        loader = e.aux.get(SECOND_MOMENT_RANK1)
        if e.load_stored_range is None or loader is None or loader() is None:
            return None
        if e.load_stored_range(0, 0).dtype not in WIDENED:
            return None
    return [_second_moment(inputs, i) for i in range(len(inputs.experts))]


def _merge_by_tile(inputs: ChunkInputs, p: OtaParams, chunks: list[_ExpertChunk], active: bool, mode: str,
                   run: OtaRun | None) -> torch.Tensor:
    """The chunk tile by tile, every expert within each tile: each expert's weights read one tile at a
    time and the sums a tile long, so everything a tile touches stays in the CPU cache, and memory does
    not grow with the number of experts (their rank-1 factors span the chunk's rows only)."""
    base = inputs.base
    flat_base, count = base.reshape(-1), base.numel()
    tiles = _tiles(count, chunks[0], base.device)
    longest = max((hi - lo for lo, hi in tiles), default=0)
    keys = ("num", "den", "acc") if mode == "linear" else ("num", "den")
    sums = {key: torch.empty(longest, dtype=torch.float32) for key in keys}  # one tile long, reused
    out = torch.empty(count, dtype=torch.float32)
    ones = [0] * len(chunks)
    for lo, hi in tiles:
        tile_sums = _cut(sums, 0, hi - lo)
        for i, c in enumerate(chunks):
            ones[i] += _expert_tile(inputs, p, c, i == 0, flat_base, lo, hi, mode, tile_sums, None)
        n_fully = _finish_tile(p, len(chunks), active, mode, tile_sums, [], flat_base, lo, hi, out[lo:hi])
        if run is not None:
            run.all_masked += n_fully
    if run is not None:
        for i, c in enumerate(chunks):
            if c.threshold is not None:
                run.kept[i] += ones[i]
                run.seen[i] += count
    return out.view(base.shape)


def _expert_tile(inputs: ChunkInputs, p: OtaParams, c: _ExpertChunk, first: bool, flat_base: torch.Tensor | None,
                 lo: int, hi: int, mode: str, sums: dict[str, torch.Tensor], x_all: torch.Tensor | None) -> int:
    """One expert's terms for chunk elements [lo, hi), added into ``sums`` and ``x_all`` (this tile of them;
    set by the first expert); returns how many entries its mask keeps."""
    base = flat_base[lo:hi] if flat_base is not None else None
    if base is None:
        x = c.loaded[lo:hi]
    elif c.stored is not None or c.stored_range is not None:  # ExpertInput.delta: a plain copy widens, then
        stored = c.stored[lo:hi] if c.stored is not None else c.stored_range(lo, hi - lo)  # fp32 subtraction
        x = torch.empty_like(base).copy_(stored).sub_(base)
        del stored
    else:
        x = c.loaded[lo:hi] - base
    if "theta" in sums:
        theta = sums["theta"]
        if first:
            theta.copy_(c.loaded[lo:hi])
        else:
            theta.add_(c.loaded[lo:hi])
    t = c.threshold
    v = None
    if c.dense is not None:
        v = c.dense[lo:hi]
    elif t is not None:
        v = _rank1_tile(c.rank1, c.rank1.rows, c.rank1.cols, lo, hi)
    keep, ones = None, 0
    if t is not None:
        keep = _keep(inputs, v, x, t)
        ones = _count_ones(keep)
    if c.dense is not None:  # _Moment.weight on dense v (consumed)
        if c.correction != 1.0:
            v *= c.correction
        w = ota_weight(v, c.scale, p.power, p.epsilon)
    else:
        w = _rank1_tile(c.rank1, c.w_rows, c.w_cols, lo, hi, plus=p.epsilon)
    del v
    if keep is not None:
        w.mul_(keep)
    if base is not None and p.rescale:
        if keep is not None:
            x.mul_(keep)
        if c.rescale is not None and c.rescale != 1.0:
            x.mul_(c.rescale)
    del keep
    num, den = sums["num"], sums["den"]
    if mode == "precond":
        if first:
            torch.mul(w, x, out=num)
        else:
            num.addcmul_(w, x)
    elif mode == "linear":
        acc = sums["acc"]
        if first:
            acc.copy_(x)
        else:
            acc.add_(x)
    else:
        x_all.copy_(x)
    if first:
        den.copy_(w)
    else:
        den.add_(w)
    return ones


def _finish_tile(p: OtaParams, n: int, active: bool, mode: str, sums: dict[str, torch.Tensor],
                 vectors: list[torch.Tensor], flat_base: torch.Tensor | None, lo: int, hi: int,
                 out: torch.Tensor) -> int:
    """The merged chunk elements [lo, hi) into ``out`` (which may be the tile of a sum), from ``sums`` and
    ``vectors`` (this tile of them); returns how many entries had every expert masked."""
    base = flat_base[lo:hi] if flat_base is not None else None
    den = sums["den"]
    fully = den <= n * p.epsilon * 1.1 if active else None
    if mode == "precond":
        merged = sums["num"].div_(den.clamp_(min=SMALLEST_SUBNORMAL) if active else den)
    elif mode == "linear":
        merged = sums["acc"].div_(n)
    else:
        merged = _ties(vectors).div_(n)
    if base is not None:
        merged = merged.add_(base)
    n_fully = 0
    if fully is not None:
        n_fully = int(torch.count_nonzero(fully))
        if n_fully:
            fallback = base if p.fallback_to_base and base is not None else sums["theta"].div_(n)
            merged = torch.where(fully, fallback, merged)
    if merged.data_ptr() != out.data_ptr():
        out.copy_(merged)
    return n_fully


def _ties(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Σ [sign τᵢ = σ]·τᵢ with σ = sign Σ τᵢ (0 → +), the authors' sign election (no trimming)."""
    total = vectors[0].clone()
    for x in vectors[1:]:
        total += x
    sign = torch.sign(total)
    sign[sign == 0] = 1
    out = torch.zeros_like(total)
    for x in vectors:
        out += x * (torch.sign(x) == sign)
    return out


def _missing(inputs: ChunkInputs, p: OtaParams, i: int) -> torch.Tensor:
    if p.missing_second_moment == "error":
        raise ConfigError(f"ota: no second moment for {inputs.tensor} in expert #{i}'s preconditioner_path "
                          "(set missing_second_moment: linear to merge such tensors linearly)")
    run = inputs.run if isinstance(inputs.run, OtaRun) else None
    if run is not None and inputs.tensor not in run.missing:
        run.missing[inputs.tensor] = [i]
        log.warning("ota: %s: no second moment for expert #%d; merged linearly by scaling_factor", inputs.tensor, i)
    return _linear_merge(inputs)
