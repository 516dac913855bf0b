"""The bytes of a merged model do not depend on how the work was split (README "Reproducibility").

Two kinds of checks. Structural ones, which fail on any machine if a product is ever computed on a
range-dependent shape: every product-derived value (LoRA and OFT views of experts, rank-K second
moments) is computed only on whole aligned row blocks, and a range read equals the same range of the
whole tensor bit for bit, with ranges that start and end inside blocks. And end to end: every method,
on full-FT, LoRA, OFT and mixed experts, exact, rank-1 and rank-K sidecars, gives byte-identical model
files with ``--chunk-size`` 2^20 and 2^23 on tensors that span several chunks and blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_folder
from safetensors.torch import save_file

import streammerge
from streammerge import row_blocks, sidecar
from streammerge.experts import AdapterExpert
from streammerge.io.peft_adapters import open_adapter
from streammerge.io.reader import open_checkpoint
from streammerge.io.second_moment_factors import factorize, reconstruct_flat

SHAPES = {  # rows of 480 (OFT block 32 tiles it); three tensors above 2^20 elements
    "model.embed_tokens.weight": (2200, 480),
    "model.layers.0.self_attn.q_proj.weight": (480, 480),
    "model.layers.0.mlp.up_proj.weight": (3000, 480),
    "model.layers.0.input_layernorm.weight": (480,),
    "model.norm.weight": (480,),
    "lm_head.weight": (2200, 480),
}
LORA_TARGETS = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
OFT_TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
OFT_BLOCK = 32


def _lora(folder: Path, g: torch.Generator, r: int) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for module in LORA_TARGETS:
        out, inp = SHAPES[module + ".weight"]
        key = f"base_model.model.{module}"
        if module.endswith("embed_tokens"):  # lora_embedding_A (r, num_embeddings), _B (dim, r)
            tensors[f"{key}.lora_embedding_A"] = torch.randn(r, out, generator=g)
            tensors[f"{key}.lora_embedding_B"] = 0.05 * torch.randn(inp, r, generator=g)
        else:
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=g) / inp**0.5
            tensors[f"{key}.lora_B.weight"] = 0.05 * torch.randn(out, r, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["embed_tokens", "q_proj", "up_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _oft(folder: Path, g: torch.Generator) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for module in OFT_TARGETS:
        inp = SHAPES[module + ".weight"][1]
        n = OFT_BLOCK * (OFT_BLOCK - 1) // 2
        tensors[f"base_model.model.{module}.oft_R.weight"] = 0.02 * torch.randn(inp // OFT_BLOCK, n, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "OFT", "r": 0, "oft_block_size": OFT_BLOCK, "use_cayley_neumann": False,
              "target_modules": ["q_proj", "up_proj"], "peft_version": "0.18.0"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, Path]:
    """base, two full fine-tunes, two LoRA and two OFT adapters, exact/rank-1/rank-4 sidecars."""
    root = tmp_path_factory.mktemp("split")
    g = torch.Generator().manual_seed(11)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    paths = {"base": save_folder(root / "base", base, shards=2)}
    for i in range(2):
        expert = {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        paths[f"full{i}"] = save_folder(root / f"full{i}", expert)
        raw = root / f"v{i}.safetensors"
        save_file({n: torch.rand(s, generator=g) ** 2 * 1e-6 for n, s in SHAPES.items()}, raw)
        paths[f"exact{i}"] = raw
        for rank in (1, 4):
            paths[f"rank{rank}-{i}"] = root / f"v{i}-r{rank}.sidecar"
            sidecar.convert(raw, paths[f"rank{rank}-{i}"], rank=rank)
        paths[f"lora{i}"] = _lora(root / f"lora{i}", g, r=4 + 4 * i)
        paths[f"oft{i}"] = _oft(root / f"oft{i}", g)
    return paths


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _merge_both_ways(cfg: dict, tmp_path: Path) -> dict[str, bytes]:
    streammerge.merge(cfg, tmp_path / "big", chunk_elements=1 << 23)
    streammerge.merge(cfg, tmp_path / "small", chunk_elements=1 << 20)
    big, small = _files(tmp_path / "big"), _files(tmp_path / "small")
    assert big.keys() == small.keys()
    for name in big:
        assert big[name] == small[name], f"{name} differs between --chunk-size 2^23 and 2^20"
    return big


def _models(wide, kinds, key=None):
    """Model entries for expert kinds (``full``, ``lora``, ``oft``); OTA entries (``key``: the sidecar
    kind) get FFG densities and scaling factors instead of weights."""
    out = []
    for i, kind in enumerate(kinds):
        params = {"density": 0.4, "scaling_factor": 1.5 - i} if key else {"weight": [0.7, 0.4][i]}
        entry = {"model": str(wide[f"{kind}{i}"]), "parameters": params}
        if key:
            entry["sidecar"] = str(wide[f"{key}{i}" if key == "exact" else f"{key}-{i}"])
        out.append(entry)
    return out


EXPERTS = {"full": ["full", "full"], "lora": ["lora", "lora"], "mixed": ["full", "lora"]}
ELEMENTWISE = [
    ("linear", {}),
    ("task_arithmetic", {"lambda": 0.8}),
    ("ties", {"density": 0.3}),
    ("ties-rescale", {"density": 0.3, "rescale": True}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
]


@pytest.mark.parametrize("experts", sorted(EXPERTS))
@pytest.mark.parametrize("method,params", ELEMENTWISE, ids=[m for m, _ in ELEMENTWISE])
def test_elementwise_methods(tmp_path, wide, method, params, experts):
    method = method.split("-")[0]
    models = _models(wide, EXPERTS[experts])
    if method == "linear":
        models.append({"model": str(wide["base"]), "parameters": {"weight": 0.2}})
    cfg = {"merge_method": method, "base_model": str(wide["base"]), "seed": 5, "out_dtype": "bfloat16",
           "models": models, "parameters": params}
    _merge_both_ways(cfg, tmp_path)


@pytest.mark.parametrize("experts", sorted(EXPERTS))
def test_model_stock(tmp_path, wide, experts):
    """Full experts take the blocked Gram pass (flat range reads), adapters the pairwise one."""
    models = [{"model": m["model"]} for m in _models(wide, EXPERTS[experts])]
    cfg = {"merge_method": "model_stock", "base_model": str(wide["base"]), "out_dtype": "bfloat16",
           "models": models}
    _merge_both_ways(cfg, tmp_path)


@pytest.mark.parametrize("key", ["exact", "rank1", "rank4"])
@pytest.mark.parametrize("experts", ["full", "mixed"])
def test_ota_with_ffg(tmp_path, wide, key, experts):
    models = _models(wide, EXPERTS[experts], key=key)
    cfg = {"merge_method": "ota", "base_model": str(wide["base"]), "models": models, "dtype": "float32"}
    _merge_both_ways(cfg, tmp_path)


@pytest.mark.parametrize("kinds,params", [
    (["full", "lora"], {"variant": "G"}),
    (["lora", "full"], {"variant": "C", "residual_method": "ties", "density": 0.3}),
    (["oft", "oft"], {}),
], ids=["ord-G-mixed", "ord-C-ties-mixed", "oft"])
def test_orthomerge(tmp_path, wide, kinds, params):
    models = [{"model": str(wide[f"{k}{i}"])} for i, k in enumerate(kinds)]
    cfg = {"merge_method": "orthomerge", "base_model": str(wide["base"]), "models": models, "parameters": params,
           "dtype": "float32"}
    _merge_both_ways(cfg, tmp_path)


@pytest.mark.parametrize("kinds,params", [
    (["full", "lora"], {"variant": "G"}),
    (["oft", "oft"], {}),
    (["lora", "lora"], None),  # task arithmetic on LoRA views: products in row blocks
], ids=["ord-G-mixed", "oft", "ta-lora"])
def test_products_and_decompositions_run_on_one_thread(tmp_path, wide, monkeypatch, kinds, params):
    """MKL's SVD/QR/solve and some products split work by thread count, so their bits can depend on it
    (measured: ORD on a 20 M bench set gave other bytes with 2 threads than with 1 or with 2 torchrun
    ranks). Every linear-algebra call of a merge must see one thread, whatever the process runs with;
    and the bytes must then equal a merge run with one thread throughout."""
    seen: list[int] = []
    for mod, name in [(torch.linalg, "svd"), (torch.linalg, "qr"), (torch.linalg, "solve"), (torch, "matmul"),
                      (torch, "mm"), (torch, "addmm"), (torch.Tensor, "__matmul__")]:
        original = getattr(mod, name)

        def spy(*a, _original=original, **k):
            seen.append(torch.get_num_threads())
            return _original(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    models = [{"model": str(wide[f"{k}{i}"])} for i, k in enumerate(kinds)]
    if params is None:
        cfg = {"merge_method": "task_arithmetic", "base_model": str(wide["base"]), "dtype": "float32",
               "models": [{**m, "parameters": {"weight": 0.5}} for m in models]}
    else:
        cfg = {"merge_method": "orthomerge", "base_model": str(wide["base"]), "models": models,
               "parameters": params, "dtype": "float32"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        streammerge.merge(cfg, tmp_path / "two")
        assert seen and set(seen) == {1}, f"linear algebra ran with {sorted(set(seen))} threads"
        assert torch.get_num_threads() == 2  # restored afterwards
        torch.set_num_threads(1)
        streammerge.merge(cfg, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


# --- structure: products only on whole aligned blocks; ranges equal the whole, bit for bit -------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4096 elements (a few rows), so that fixture tensors span many, and a spy on every block
    that is computed: (first row, last row + 1, rows of the tensor, rows per block)."""
    monkeypatch.setattr(row_blocks, "BLOCK_ELEMENTS", 4096)
    calls: list[tuple[int, int, int, int]] = []
    original = row_blocks.rows_in_blocks

    def spy(r0, r1, rows, row_elements, compute):
        block = row_blocks.rows_per_block(row_elements)
        return original(r0, r1, rows, row_elements, lambda b0, b1: (calls.append((b0, b1, rows, block)),
                                                                     compute(b0, b1))[1])

    for module in ("streammerge.experts", "streammerge.io.peft_adapters", "streammerge.io.second_moment_factors"):
        monkeypatch.setattr(f"{module}.rows_in_blocks", spy)
    return calls


def _assert_aligned(calls):
    assert calls, "no product was computed through row_blocks"
    for b0, b1, rows, block in calls:
        assert b0 % block == 0 and b1 == min(b0 + block, rows), (b0, b1, rows, block)


def _ranges(numel: int, row: int, g: torch.Generator):
    """Ranges that start and end inside rows and blocks, plus single elements and the whole tensor."""
    yield 0, numel
    yield numel - 1, 1
    for _ in range(6):
        start = int(torch.randint(0, numel - 1, (1,), generator=g))
        yield start, int(torch.randint(1, numel - start + 1, (1,), generator=g))
    yield row + 3, 5 * row  # a few rows, offset into a row


@pytest.mark.parametrize("adapter", ["lora0", "lora1", "oft0"])
def test_adapter_views_compute_aligned_blocks_and_ranges_equal_the_whole(wide, small_blocks, adapter):
    base = open_checkpoint(wide["base"])
    view = AdapterExpert(base, open_adapter(wide[adapter], base))
    g = torch.Generator().manual_seed(0)
    try:
        for name in sorted(view.names()):
            whole = view.read(name).reshape(-1)
            meta = view.meta(name)
            row = meta.numel // meta.shape[0]
            for start, count in _ranges(meta.numel, row, g):
                got = view.read(name, start, count)
                assert torch.equal(got.view(torch.int32) if got.dtype == torch.float32 else got,
                                   whole[start : start + count].view(torch.int32)
                                   if whole.dtype == torch.float32 else whole[start : start + count]), name
    finally:
        view.close()
        base.close()
    _assert_aligned(small_blocks)


def test_lora_delta_rows_equal_the_whole_delta(wide, small_blocks):
    base = open_checkpoint(wide["base"])
    lora = open_adapter(wide["lora1"], base)
    try:
        for name in lora.modules:
            whole = lora.delta(name)
            for r0, r1 in [(0, 1), (3, 17), (5, whole.shape[0]), (whole.shape[0] - 2, whole.shape[0])]:
                assert torch.equal(lora.delta(name, rows=(r0, r1)).view(torch.int32), whole[r0:r1].view(torch.int32))
            # and the value is B·A itself (to fp32 rounding of one product)
            m = lora.modules[name]
            a, b = lora.weights.read(m.a_key), lora.weights.read(m.b_key)
            ref = (b.double() @ a.double()) * m.scaling
            torch.testing.assert_close(whole.double(), ref.T if m.embedding else ref, rtol=1e-5, atol=1e-6)
    finally:
        lora.close()
        base.close()
    _assert_aligned(small_blocks)


@pytest.mark.parametrize("shape", [(300, 70), (70, 300), (20, 3000)])
def test_rank_k_ranges_equal_the_whole(small_blocks, shape):
    g = torch.Generator().manual_seed(2)
    v = torch.rand(shape, generator=g) ** 2
    f = factorize(v, 3)
    whole = reconstruct_flat(f, 0, v.numel())
    for start, count in _ranges(v.numel(), shape[1], g):
        got = reconstruct_flat(f, start, count)
        assert torch.equal(got.view(torch.int32), whole[start : start + count].view(torch.int32))
    _assert_aligned(small_blocks)


def test_block_rows_depend_on_the_shape_only():
    assert row_blocks.rows_per_block(480) == (1 << 20) // 480
    assert row_blocks.rows_per_block(1 << 21) == 1  # a row longer than a block is its own block
    assert list(row_blocks.overlapping_blocks(5, 12, 20, 4)) == [(4, 8), (8, 12)]
    assert list(row_blocks.overlapping_blocks(17, 20, 18, 4)) == [(16, 18)]


# --- across machines: each product within the standard rounding bound of its fp64 value ----------------

U = 2.0**-24  # fp32 unit roundoff


@pytest.mark.parametrize("adapter", ["lora0", "lora1", "oft0"])
def test_products_are_within_rounding_bounds_of_fp64(wide, adapter):
    """What holds on any machine: an adapter view differs from the fp64 value by at most the forward-error
    bound of its dot products, (n + 1)·u·(|W₀| + |terms|) for n terms per entry, so two machines'
    bytes differ by at most twice that before the cast to the output dtype (README "Reproducibility")."""
    from streammerge.methods.oft import oft_rotation_blocks

    base = open_checkpoint(wide["base"])
    adapter_obj = open_adapter(wide[adapter], base)
    view = AdapterExpert(base, adapter_obj)
    try:
        for name in sorted(adapter_obj.targets()):
            w0 = base.read(name).double()
            if adapter.startswith("lora"):
                m = adapter_obj.modules[name]
                a, b = adapter_obj.weights.read(m.a_key).double(), adapter_obj.weights.read(m.b_key).double()
                ref, mag = b @ a * m.scaling, b.abs() @ a.abs() * abs(m.scaling)
                ref, mag = (ref.T, mag.T) if m.embedding else (ref, mag)
                ref, mag, n = w0 + ref, w0.abs() + mag, m.rank
            else:
                m, rot = adapter_obj.modules[name], adapter_obj.rotation
                blocks = oft_rotation_blocks(adapter_obj.generator(name).double(), m.block_size, rot.neumann_terms,
                                             rot.neumann_convention, rot.coft_eps)
                ref = torch.einsum("onk,nck->onc", w0.reshape(w0.shape[0], -1, m.block_size), blocks.double())
                mag = torch.einsum("onk,nck->onc", w0.abs().reshape(w0.shape[0], -1, m.block_size),
                                   blocks.double().abs())
                ref, mag, n = ref.reshape(w0.shape), mag.reshape(w0.shape), m.block_size
            err = (view.read(name).double() - ref).abs()
            bound = (n + 1) * U * mag + 1e-300
            assert bool((err <= bound).all()), f"{name}: {float((err / bound).max()):.2f} x the bound"
    finally:
        view.close()
        base.close()
