"""OrthoMerge: the Lie-algebra merge rule against the authors' formula, OFT merges of real PEFT adapters,
and Orthogonal-Residual Decoupling against a plain list-based transcription of the reference code."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FIXTURES, load_folder
from safetensors.torch import load_file

from streammerge.io.adapter_writer import merged_adapter_config, write_adapter
from streammerge.io.peft_adapters import common_rotation_map, oft_sources, open_adapter
from streammerge.io.reader import open_checkpoint
from streammerge.methods.base import ChunkInputs, ExpertInput, NoParams
from streammerge.methods.orthogonal import skew_from_vector, vector_from_skew
from streammerge.methods.orthomerge import (
    METHOD,
    DecoupleReport,
    GeneratorMerge,
    OrthoMergeParams,
    coft_project,
    decouple_merge,
    fold_oft,
    merge_generators,
    oft_generator,
    oft_rotation_blocks,
    takes_orthogonal_part,
)

ADAPTERS = FIXTURES / "adapters"
BASE = FIXTURES / "tiny-llama-fp32-base"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_thread")


# --- reference transcriptions (Sphere-AI-Lab/OrthoMerge, merge/*.py) ------------------------------


def reference_merge_rule(
    qs: list[torch.Tensor], theta_agg: str = "mean", direction_weight: str = "theta"
) -> torch.Tensor:
    """The authors' ``merge_cayley_Q_list`` (OrthoMerge_*_TA.py), verbatim in substance."""
    stack = torch.stack(qs).reshape(len(qs), -1)
    theta = torch.linalg.vector_norm(stack, dim=1)
    u = stack / theta.clamp(min=1e-8).unsqueeze(1)
    w = theta.clone() if direction_weight == "theta" else torch.ones_like(theta)
    u_sum = (u * w.unsqueeze(1)).sum(0)
    if torch.linalg.vector_norm(u_sum) < 1e-8:
        return torch.zeros_like(qs[0])
    size = {"mean": theta.mean, "median": theta.median, "max": theta.max}[theta_agg]()
    return (u_sum / torch.linalg.vector_norm(u_sum) * size).reshape(qs[0].shape)


def reference_oft_rule(qs: list[torch.Tensor]) -> torch.Tensor:
    """The authors' OFT ``merge_cayley_Q_list`` (OrthoMerge_OFT_models.py): (c/N)·ΣQ, re-skewed."""
    stack = torch.stack(qs)
    total = stack.sum(0)
    c = torch.linalg.vector_norm(stack.reshape(len(qs), -1), dim=1).sum() / torch.linalg.vector_norm(total)
    merged = c * total / len(qs)
    return 0.5 * (merged - merged.transpose(-1, -2))


def reference_ord(
    w0,
    experts,
    variant="G",
    residual="task_arithmetic",
    lam=1.0,
    density=0.2,
    eps=1e-3,
    theta_agg="mean",
    direction_weight="theta",
):
    """Decoupling as the authors' scripts do it (all experts in memory, A = (R+I)⁻¹(R−I),
    R = (I−A)⁻¹(I+A)), plus the two fixes documented in REFERENCE §4: Procrustes of W₀ᵀT + εI and the
    Kabsch sign fix. TIES top-k per tensor (theirs: per model). fp64 throughout."""
    w0 = w0.double()
    experts = [e.double() for e in experts]
    d = w0.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    if variant == "C":
        deltas = [e - w0 for e in experts]
        mean = torch.stack(deltas).mean(0)
        targets = []
        for delta in deltas:
            cos = torch.nn.functional.cosine_similarity(delta, mean, dim=1, eps=1e-6).unsqueeze(1)
            targets.append(w0 + delta * (cos < 0.0).double())
    else:
        targets = experts
    rotations, generators = [], []
    for t in targets:
        m = w0.T @ t
        m = m + eps * torch.linalg.matrix_norm(m) / math.sqrt(d) * eye
        u, _, vh = torch.linalg.svd(m)
        if torch.linalg.det(u @ vh) < 0:
            u[:, -1] = -u[:, -1]
        r = u @ vh
        a = torch.linalg.solve(r + eye, r - eye)
        rotations.append(r)
        generators.append(0.5 * (a - a.T))
    a_bar = reference_merge_rule(generators, theta_agg, direction_weight)
    r_bar = torch.linalg.solve(eye - a_bar, eye + a_bar)
    rhos = [e - w0 @ r for e, r in zip(experts, rotations, strict=False)]
    if residual == "task_arithmetic":
        merged = sum(rhos)
    elif residual == "ties":
        kept = []
        for rho in rhos:
            k = max(1, int(density * rho.numel()))
            threshold = rho.abs().reshape(-1).kthvalue(rho.numel() - k + 1).values
            kept.append(rho * (rho.abs() >= threshold))
        total = sum(kept)
        sign = torch.sign(total)
        sign[sign == 0] = 1.0
        num, den = torch.zeros_like(total), torch.zeros_like(total)
        for t in kept:
            agree = torch.where(sign > 0, t > 0, t < 0).double()
            num += t * agree
            den += (t * agree != 0).double()
        merged = num / den.clamp(min=1)
    else:  # TSV-M, OrthoMerge_*_TSVM.py
        us, ss, vs = [], [], []
        for rho in rhos:
            u, s, vh = torch.linalg.svd(rho, full_matrices=False)
            k = max(1, int(s.shape[0] * (1.0 / len(rhos))))
            us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
        pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
        pv, _, qv = torch.linalg.svd(torch.cat(vs, 1), full_matrices=False)
        merged = (pu @ qu * torch.cat(ss)) @ (pv @ qv).T
    return w0 @ r_bar + lam * merged


# --- the merge rule ---------------------------------------------------------------------------------


def random_skews(n: int, b: int = 8, blocks: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(blocks, b, b, generator=g, dtype=torch.float64) * (0.05 * (i + 1))
        out.append(x - x.transpose(-1, -2))
    return out


@pytest.mark.parametrize("agg", ["mean", "median", "max"])
@pytest.mark.parametrize("weighting", ["theta", "uniform"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_merge_rule_equals_the_authors_formula(agg, weighting, n):
    qs = random_skews(n, seed=n)
    ours, degenerate = merge_generators(qs, agg, weighting)
    assert not degenerate
    assert torch.allclose(ours, reference_merge_rule(qs, agg, weighting), atol=1e-14)


def test_theta_mean_is_the_papers_c_over_n_rule_and_works_on_peft_vectors():
    qs = random_skews(3, seed=7)
    ours, _ = merge_generators(qs)
    assert torch.allclose(ours, reference_oft_rule(qs), atol=1e-14)
    on_vectors, _ = merge_generators([vector_from_skew(q) for q in qs])
    assert torch.allclose(skew_from_vector(on_vectors, 8), ours, atol=1e-14)


def test_uniform_weighting_ignores_rotation_sizes():
    q = random_skews(2, seed=3)
    small, large = q[0] * 1e-3, q[1]
    uniform, _ = merge_generators([small, large], "mean", "uniform")
    direction = small / small.norm() + large / large.norm()
    assert torch.allclose(uniform / uniform.norm(), direction / direction.norm(), atol=1e-12)
    theta, _ = merge_generators([small, large], "mean", "theta")
    assert torch.allclose(theta / theta.norm(), (small + large) / (small + large).norm(), atol=1e-12)
    assert float(uniform.norm()) == pytest.approx(float((small.norm() + large.norm()) / 2))


def test_median_is_the_lower_middle_value_like_the_reference():
    qs = [q / q.norm() * s for q, s in zip(random_skews(4, seed=5), (1.0, 2.0, 3.0, 4.0), strict=False)]
    merged, _ = merge_generators(qs, "median")
    assert float(merged.norm()) == pytest.approx(2.0)


def test_one_generator_is_returned_unchanged():
    (q,) = random_skews(1, seed=9)
    merged, degenerate = merge_generators([q])
    assert not degenerate and torch.allclose(merged, q, atol=1e-15)


@pytest.mark.parametrize("weighting", ["theta", "uniform"])
def test_cancelling_generators_give_the_identity_and_say_so(weighting):
    (q,) = random_skews(1, seed=2)
    merged, degenerate = merge_generators([q, -q * (1 + 1e-9)], "mean", weighting)
    assert degenerate and torch.count_nonzero(merged) == 0
    merged, degenerate = merge_generators([torch.zeros_like(q)] * 2)
    assert degenerate and torch.count_nonzero(merged) == 0
    with pytest.raises(ValueError):
        GeneratorMerge().result()


# --- OFT adapters -----------------------------------------------------------------------------------


def raw_vectors(name: str) -> dict[str, torch.Tensor]:
    return load_file(ADAPTERS / name / "adapter_model.safetensors")


@pytest.mark.parametrize("pair", [("oft-cayley-a", "oft-cayley-b"), ("oft-neumann-a", "oft-neumann-b")])
def test_two_oft_adapters_merge_to_the_reference_formula(pair):
    base = open_checkpoint(BASE)
    adapters = [open_adapter(ADAPTERS / p, base) for p in pair]
    common_rotation_map(adapters)
    raws = [raw_vectors(p) for p in pair]
    keys = 0
    for name in base.names():
        sources = oft_sources(adapters, name)
        if not sources:
            continue
        keys += 1
        b = sources[0][1].block_size
        ours, degenerate = merge_generators([oft_generator(a.generator(name), b) for a, _ in sources])
        assert not degenerate
        pairs = zip(raws, sources, strict=True)
        expected = reference_oft_rule([skew_from_vector(r[m.key].double(), b) for r, (_, m) in pairs])
        assert torch.allclose(skew_from_vector(ours, b), expected, atol=1e-12), name
    assert keys == 14 + ("cayley" in pair[0])  # 7 linear modules x 2 layers (+ embed_tokens)


def test_coft_generators_are_projected_before_merging():
    adapter = open_adapter(ADAPTERS / "oft-coft", open_checkpoint(BASE))
    eps = adapter.rotation.coft_eps
    clipped = 0
    for name, m in adapter.modules.items():
        v = adapter.generator(name).double()
        radius = eps / math.sqrt(v.shape[0])
        norms = torch.linalg.matrix_norm(skew_from_vector(v, m.block_size))
        expected = torch.where((norms <= radius)[:, None], v, v * (radius / norms)[:, None])
        assert torch.allclose(oft_generator(v, m.block_size, eps), expected, atol=1e-15)
        clipped += int((norms > radius).sum())
    assert 0 < clipped < sum(m.blocks for m in adapter.modules.values())  # the fixture clips some blocks


def test_mixed_rotation_maps_are_refused():
    base = open_checkpoint(BASE)
    with pytest.raises(Exception, match="same rotation map"):
        common_rotation_map(
            [open_adapter(ADAPTERS / "oft-cayley-a", base), open_adapter(ADAPTERS / "oft-neumann-a", base)]
        )


def fold_merged(adapters, base, params=OrthoMergeParams()):
    """What ``output: model`` writes: every base tensor, OFT-merged where the adapters rotate it."""
    rotation = common_rotation_map(adapters)
    out = {}
    for name in base.names():
        w0 = base.read(name).to(torch.float32)
        sources = oft_sources(adapters, name)
        if not sources:
            out[name] = w0
            continue
        m = sources[0][1]
        vecs = [oft_generator(a.generator(name), m.block_size, rotation.coft_eps) for a, _ in sources]
        merged, _ = merge_generators(vecs, params.norm_aggregate, params.direction_weighting)
        blocks = oft_rotation_blocks(
            merged, m.block_size, rotation.neumann_terms, rotation.neumann_convention, rotation.coft_eps
        )
        out[name] = fold_oft(w0, blocks, m.embedding)
    return out


@pytest.mark.parametrize("pair", [("oft-cayley-a", "oft-cayley-b"), ("oft-neumann-a", "oft-neumann-b")])
def test_output_adapter_loads_in_peft_and_its_merge_equals_our_fold(tmp_path, pair):
    base = open_checkpoint(BASE)
    adapters = [open_adapter(ADAPTERS / p, base) for p in pair]
    tensors = {}
    for name in base.names():
        sources = oft_sources(adapters, name)
        if sources:
            b = sources[0][1].block_size
            merged, _ = merge_generators([oft_generator(a.generator(name), b) for a, _ in sources])
            tensors[sources[0][1].key] = merged.to(torch.float32)
    write_adapter(tmp_path / "merged", merged_adapter_config(adapters), tensors)
    reread = open_adapter(tmp_path / "merged", base)  # our reader accepts what we wrote
    assert set(reread.modules) == set(adapters[0].modules)
    ours = fold_merged(adapters, base)
    assert not torch.allclose(
        ours["model.layers.0.self_attn.q_proj.weight"], base.read("model.layers.0.self_attn.q_proj.weight")
    )
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(model, tmp_path / "merged").merge_and_unload().state_dict()
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], atol=2e-6), name


def test_one_adapter_merged_is_the_adapter():
    base = open_checkpoint(BASE)
    adapter = open_adapter(ADAPTERS / "oft-blockshare", base)
    for name, m in adapter.modules.items():
        merged, _ = merge_generators([oft_generator(adapter.generator(name), m.block_size)])
        assert torch.allclose(merged, adapter.generator(name).double(), atol=1e-15)
        assert m.blocks == 1


# --- Orthogonal-Residual Decoupling -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["G", "C"])
@pytest.mark.parametrize("residual", ["task_arithmetic", "ties", "tsvm"])
def test_one_expert_with_lambda_1_is_the_expert(variant, residual):
    base, expert = load_folder(BASE), load_folder(FIXTURES / "tiny-llama-fp32-a")
    params = OrthoMergeParams(variant=variant, residual_method=residual, density=1.0)
    for name, w0 in base.items():
        orthogonal = takes_orthogonal_part(name, tuple(w0.shape), params)
        out = decouple_merge(w0, [expert[name]], params, orthogonal=orthogonal)
        assert out.dtype == torch.float32
        assert torch.allclose(out, expert[name], atol=2e-6, rtol=0), name


@pytest.mark.parametrize("variant", ["G", "C"])
@pytest.mark.parametrize("residual, lam", [("task_arithmetic", 0.5), ("ties", 1.0), ("tsvm", 1.0)])
@pytest.mark.parametrize("agg, weighting", [("mean", "theta"), ("median", "uniform")])
def test_two_experts_equal_the_reference_transcription(variant, residual, lam, agg, weighting):
    base = load_folder(BASE)
    experts = [load_folder(FIXTURES / "tiny-llama-fp32-a"), load_folder(FIXTURES / "tiny-llama-fp32-b")]
    params = OrthoMergeParams(
        variant=variant, residual_method=residual, lambda_=lam, norm_aggregate=agg, direction_weighting=weighting
    )
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
    ):
        ours = decouple_merge(base[name], [e[name] for e in experts], params)
        expected = reference_ord(
            base[name],
            [e[name] for e in experts],
            variant,
            residual,
            lam,
            params.density,
            theta_agg=agg,
            direction_weight=weighting,
        )
        assert torch.allclose(ours.double(), expected, atol=1e-5), name
        assert not torch.allclose(ours, base[name], atol=1e-4)


def test_experts_are_loaded_lazily_once_for_g_twice_for_c():
    base = load_folder(BASE)["model.layers.0.self_attn.o_proj.weight"]
    experts = [base + 0.01 * torch.randn(base.shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for variant, expected_calls in (("G", 1), ("C", 2)):
        calls = [0, 0, 0]

        def loader(i):
            def load():
                calls[i] += 1
                return experts[i].clone()

            return load

        decouple_merge(base, [loader(i) for i in range(3)], OrthoMergeParams(variant=variant))
        assert calls == [expected_calls] * 3


def test_given_tensors_are_not_modified():
    base = load_folder(BASE)["model.layers.1.mlp.gate_proj.weight"]
    experts = [base + 0.01 * torch.randn(base.shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = [e.clone() for e in experts], base.clone()
    for residual in ("task_arithmetic", "ties", "tsvm"):
        decouple_merge(base, experts, OrthoMergeParams(variant="C", residual_method=residual))
    assert all(torch.equal(a, b) for a, b in zip(experts, before[0], strict=False)) and torch.equal(base, before[1])


def test_variant_c_targets_only_conflicting_rows():
    g = torch.Generator().manual_seed(12)
    w0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    d1 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    d2 = d1.clone()
    d2[:3] = -3.0 * d1[:3]  # expert 2 pushes rows 0-2 against expert 1, harder: mean follows expert 2 there
    experts = [w0 + 0.1 * d1, w0 + 0.1 * d2]
    ours = decouple_merge(w0, experts, OrthoMergeParams(variant="C", lambda_=0.5))
    assert torch.allclose(ours.double(), reference_ord(w0, experts, "C", lam=0.5), atol=1e-10)
    # expert 1 conflicts with the mean on rows 0-2 only, expert 2 nowhere: C differs from G
    assert (ours.double() - reference_ord(w0, experts, "G", lam=0.5)).abs().max() > 1e-6


def test_wide_matrices_and_report():
    g = torch.Generator().manual_seed(13)
    w0 = torch.randn(16, 96, generator=g)  # d_out < d_in
    experts = [w0 + 0.02 * torch.randn(16, 96, generator=g) for _ in range(3)]
    report = DecoupleReport()
    out = decouple_merge(w0, experts, OrthoMergeParams(lambda_=1 / 3), name="wide", report=report)
    assert torch.isfinite(out).all()
    assert report.matrices == 1 and not report.clamped and not report.cancelled
    assert report.min_sigma > 1.5  # every expert's rotation is near the identity
    expected = reference_ord(w0, experts, lam=1 / 3)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("residual", ["task_arithmetic", "tsvm"])
def test_reflected_and_half_turn_experts_are_decoupled_exactly(residual):
    g = torch.Generator().manual_seed(15)
    w0 = torch.randn(24, 16, generator=g, dtype=torch.float64)
    reflected = w0 @ torch.diag(torch.tensor([-1.0] + [1.0] * 15, dtype=torch.float64))
    half_turn = torch.eye(16, dtype=torch.float64)
    half_turn[[2, 9], [2, 9]] = math.cos(math.pi - 1e-7)
    half_turn[2, 9], half_turn[9, 2] = -math.sin(math.pi - 1e-7), math.sin(math.pi - 1e-7)
    params = OrthoMergeParams(residual_method=residual)
    for expert, clamped in ((reflected, False), (w0 @ half_turn, True)):
        report = DecoupleReport()
        out = decouple_merge(w0, [expert], params, name="w", report=report)
        assert bool(report.clamped) is clamped  # a half turn has no Cayley generator: clamped, reported
        assert torch.allclose(out.double(), expert, atol=1e-5)  # R̄ and ρ use the same (clamped) rotation


def test_residual_only_tensors_are_task_vector_merges():
    base = load_folder(BASE)
    experts = [load_folder(FIXTURES / "tiny-llama-fp32-a"), load_folder(FIXTURES / "tiny-llama-fp32-b")]
    name = "model.norm.weight"
    out = decouple_merge(base[name], [e[name] for e in experts], OrthoMergeParams(lambda_=0.5), orthogonal=False)
    assert torch.allclose(out, base[name] + 0.5 * sum(e[name] - base[name] for e in experts), atol=1e-7)
    tsvm = decouple_merge(
        base[name], [e[name] for e in experts], OrthoMergeParams(residual_method="tsvm"), orthogonal=False
    )
    assert torch.allclose(tsvm, base[name] + sum(e[name] - base[name] for e in experts) / 2, atol=1e-7)


def test_method_record_merges_whole_tensors_and_picks_the_orthogonal_part():
    base = load_folder(BASE)
    experts = [load_folder(FIXTURES / "tiny-llama-fp32-a")]
    params = OrthoMergeParams()
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        inputs = ChunkInputs(
            name,
            tuple(base[name].shape),
            0,
            base[name],
            [ExpertInput(load=lambda n=name: experts[0][n].clone(), params=NoParams())],
            params,
            0,
        )
        assert torch.allclose(METHOD.merge(inputs), experts[0][name], atol=2e-6)
    assert not METHOD.elementwise and METHOD.base_model == "required"


@pytest.mark.parametrize(
    "name, shape, default, with_options",
    [
        ("model.layers.0.self_attn.q_proj.weight", (64, 64), True, True),
        ("model.layers.0.mlp.down_proj.weight", (64, 128), True, True),
        ("model.layers.0.input_layernorm.weight", (64,), False, False),
        ("model.norm.weight", (64,), False, False),
        ("model.embed_tokens.weight", (256, 64), False, True),
        ("lm_head.weight", (256, 64), False, True),
        ("transformer.wte.weight", (256, 64), False, True),
        ("model.layers.0.self_attn.q_proj.bias", (64,), False, False),
        ("some.layer_norm.weight", (8, 8), False, False),
    ],
)
def test_takes_orthogonal_part(name, shape, default, with_options):
    assert takes_orthogonal_part(name, shape, OrthoMergeParams()) is default
    assert (
        takes_orthogonal_part(name, shape, OrthoMergeParams(orthogonal_embeddings=True, orthogonal_lm_head=True))
        is with_options
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("variant", "X"),
        ("residual_method", "dare"),
        ("norm_aggregate", "sum"),
        ("direction_weighting", "norm"),
        ("density", 0.0),
        ("density", 1.5),
        ("lambda_", math.nan),
        ("procrustes_eps", -1.0),
        ("cayley_min_sigma", 2.0),
    ],
)
def test_params_are_validated_with_the_bad_value(field, value):
    with pytest.raises(ValueError, match=field.rstrip("_")):
        OrthoMergeParams(**{field: value})


def test_lora_experts_decouple_through_materialised_weights():
    base_ckpt = open_checkpoint(BASE)
    adapter = open_adapter(ADAPTERS / "lora-a", base_ckpt)
    name = "model.layers.1.self_attn.v_proj.weight"
    w0 = base_ckpt.read(name)
    out = decouple_merge(w0, [lambda: adapter.expert_tensor(name, w0)], OrthoMergeParams())
    assert torch.allclose(out, adapter.expert_tensor(name, w0), atol=2e-6)
    assert not torch.allclose(out, w0, atol=1e-3)


@cuda
def test_decoupling_on_cuda_matches_cpu():
    base = load_folder(BASE)
    experts = [load_folder(FIXTURES / "tiny-llama-fp32-a"), load_folder(FIXTURES / "tiny-llama-fp32-b")]
    name = "model.layers.0.mlp.down_proj.weight"
    params = OrthoMergeParams(variant="C", residual_method="ties")
    cpu = decouple_merge(base[name], [e[name] for e in experts], params)
    gpu = decouple_merge(base[name].cuda(), [e[name].cuda() for e in experts], params)
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_fold_refuses_blocks_that_do_not_tile():
    with pytest.raises(ValueError):
        fold_oft(torch.zeros(4, 10), torch.eye(4).expand(2, 4, 4))
    assert coft_project(torch.zeros(2, 3), 3, 1.0).abs().sum() == 0
