"""Sidecar files: format round trips and validation, representations against their formulas, conversion
from every source (the real Trainer fixture against its own optimizer state), export from a live
optimizer, and the CLI's convert/inspect with one-line errors."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, snapshot
from safetensors.torch import load_file, save_file

import streammerge.sidecar as sidecar
from streammerge.cli import main
from streammerge.errors import CheckpointError, StreamMergeError
from streammerge.io import second_moment_sources
from streammerge.io.second_moment_factors import factorize
from streammerge.io.sidecar_format import FOOTER, SidecarWriter

TRAINER = FIXTURES / "tiny-trainer-checkpoint"
NAMED = FIXTURES / "tiny-exp-avg-sq.safetensors"


def _v(*shape, seed=0):
    """A positive, second-moment-like tensor (log-normal over several decades)."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(shape, generator=g) * 3 - 20)


def _write(path, tensors, rank=None, frame_elements=1 << 22, dtype="F32", metadata=None):
    with SidecarWriter(path, dtype, frame_elements) as w:
        for name, v in tensors.items():
            w.add(name, factorize(v, rank), step=7)
        return w.finish(metadata or {"source": "test", "optimizer": "Adam", "step": 7, "beta2": 0.999})


# --- format ------------------------------------------------------------------------------------------

SHAPES = {
    "matrix": (37, 23),
    "vector": (50,),
    "row": (1, 40),
    "col": (40, 1),
    "cube": (4, 5, 6),
    "scalar": (),
    "empty": (0, 8),
}


@pytest.mark.parametrize("frame_elements", [1 << 22, 64])
def test_exact_round_trip_is_bit_exact(tmp_path, frame_elements):
    tensors = {name: _v(*shape, seed=i) for i, (name, shape) in enumerate(SHAPES.items())}
    tensors["matrix"][0, :3] = torch.tensor([0.0, 1e-45, 3.0e38])  # zero, subnormal, huge: all kept exactly
    _write(tmp_path / "a.sc", tensors, frame_elements=frame_elements)
    with sidecar.load(tmp_path / "a.sc") as sc:
        assert isinstance(sc, sidecar.Sidecar) and sc.keys() == list(tensors)
        assert sc.metadata == {"source": "test", "optimizer": "Adam", "step": 7, "beta2": 0.999}
        for name, v in tensors.items():
            got = sc.get(name)
            assert got.dtype == torch.float32 and got.shape == v.shape
            assert torch.equal(got.view(torch.int32), v.view(torch.int32)), name
            flat = v.reshape(-1)
            for start, count in [
                (0, flat.numel()),
                (min(5, flat.numel()), max(0, flat.numel() - 10)),
                (flat.numel(), 0),
            ]:
                if start + count <= flat.numel():
                    assert torch.equal(sc.get_flat(name, start, count), flat[start : start + count]), (name, start)
            assert sc.representation(name) == "exact" and sc.step(name) == 7


def test_get_flat_across_frames_returns_owned_tensors(tmp_path):
    v = _v(300, 7)
    _write(tmp_path / "a.sc", {"w": v}, frame_elements=100)
    with sidecar.load(tmp_path / "a.sc") as sc:
        assert len(sc.record("w").frames) == 21
        chunk = sc.get_flat("w", 150, 500)  # spans frames 1..6
        assert torch.equal(chunk, v.reshape(-1)[150:650])
        chunk.zero_()  # the caller owns it: the cached frame must not change
        assert torch.equal(sc.get_flat("w", 150, 500), v.reshape(-1)[150:650])
        with pytest.raises(ValueError):
            sc.get_flat("w", 2000, 200)


@pytest.fixture(params=[1 << 22, 97], ids=["one-block", "row-blocks"])
def blocks(request, monkeypatch):
    """Factorization in one block, or in many row blocks (97 elements: 2 rows of 48)."""
    from streammerge.io import second_moment_factors

    monkeypatch.setattr(second_moment_factors, "BLOCK_ELEMENTS", request.param)


def test_rank1_is_row_sums_times_column_sums_over_total(tmp_path, blocks):
    v = _v(64, 48)
    _write(tmp_path / "a.sc", {"w": v, "b": _v(48), "row": _v(1, 48)}, rank=1)
    vd = v.double()
    r, c, total = vd.sum(1), vd.sum(0), vd.sum()
    reference = torch.outer(r, c) / total
    with sidecar.load(tmp_path / "a.sc") as sc:
        assert (
            sc.representation("w") == "rank1"
            and sc.representation("b") == "exact"
            and sc.representation("row") == "exact"
        )
        parts = sc._reader.factored(sc.record("w")).parts
        torch.testing.assert_close(parts["r"], r.float(), rtol=1e-7, atol=0)
        torch.testing.assert_close(parts["c"], c.float(), rtol=1e-7, atol=0)
        assert sc.record("w").total == pytest.approx(float(total), rel=1e-15)
        torch.testing.assert_close(sc.get("w").double(), reference, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            sc.get_flat("w", 100, 1000).double(), reference.reshape(-1)[100:1100], rtol=1e-6, atol=0
        )
        assert torch.equal(sc.get("b"), factorize(_v(48), None).parts["v"])
        assert sc.stored_bytes("w") < 0.1 * v.numel() * 4


def test_rank1_of_all_zero_is_zero(tmp_path):
    _write(tmp_path / "a.sc", {"w": torch.zeros(8, 9)}, rank=1)
    with sidecar.load(tmp_path / "a.sc") as sc:
        assert sc.representation("w") == "rank1" and torch.equal(sc.get("w"), torch.zeros(8, 9))


@pytest.mark.parametrize("shape", [(60, 20), (20, 60), (300, 200)])
def test_rank_k_is_the_clamped_truncated_svd(tmp_path, shape, blocks):
    v = _v(*shape)
    k = 3
    _write(tmp_path / "a.sc", {"w": v}, rank=k)
    u, s, vh = torch.linalg.svd(v.double(), full_matrices=False)
    reference = (u[:, :k] * s[:k]) @ vh[:k]
    with sidecar.load(tmp_path / "a.sc") as sc:
        assert sc.representation("w") == "rank-k" and sc.record("w").rank == k
        got = sc.get("w")
        assert (got >= 0).all()
        torch.testing.assert_close(got.double(), reference.clamp(min=0), rtol=1e-4, atol=1e-6 * float(v.max()))
        assert torch.equal(sc.get_flat("w", 33, 400), got.reshape(-1)[33:433])
        # better than rank 1 in the Frobenius norm, as an SVD of higher rank must be
        rank1 = factorize(v, 1)
        r, c = rank1.parts["r"].double(), rank1.parts["c"].double()
        assert torch.dist(got.double(), v.double()) < torch.dist(torch.outer(r, c) / rank1.total, v.double())


def test_rank_k_of_an_exactly_low_rank_matrix_is_exact_and_large_k_stays_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(50, 2, generator=g), torch.rand(2, 30, generator=g)
    v = a @ b
    _write(tmp_path / "a.sc", {"w": v, "small": _v(3, 5)}, rank=2)
    with sidecar.load(tmp_path / "a.sc") as sc:
        torch.testing.assert_close(sc.get("w"), v, rtol=1e-5, atol=1e-6)
        assert sc.representation("small") == "exact"  # 2·(3+5) >= 3·5: factors would not be smaller


def test_bf16_storage(tmp_path):
    v = _v(16, 16)
    _write(tmp_path / "a.sc", {"w": v}, dtype="BF16")
    with sidecar.load(tmp_path / "a.sc") as sc:
        assert sc.record("w").dtype == "BF16" and torch.equal(sc.get("w"), v.to(torch.bfloat16).float())


def test_one_corrupt_frame_fails_only_its_tensor(tmp_path):
    tensors = {"a": _v(40, 30, seed=1), "b": _v(40, 30, seed=2), "c": _v(40, 30, seed=3)}
    path = _write(tmp_path / "a.sc", tensors)
    with sidecar.load(path) as sc:
        offset, length, _ = sc.record("b").frames[0]
    raw = bytearray(path.read_bytes())
    raw[offset + length // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with sidecar.load(path) as sc:
        assert torch.equal(sc.get("a"), tensors["a"]) and torch.equal(
            sc.get_flat("c", 0, 100), tensors["c"].reshape(-1)[:100]
        )
        with pytest.raises(CheckpointError, match=r"tensor 'b'.*checksum mismatch"):
            sc.get("b")
        with pytest.raises(CheckpointError, match="has no second moment for tensor 'd'"):
            sc.get("d")


def _rewrite_index(path: Path, edit) -> None:
    raw = path.read_bytes()
    index_offset, length, _, version, magic = FOOTER.unpack(raw[-FOOTER.size :])
    index = json.loads(raw[index_offset : index_offset + length])
    edit(index)
    new = json.dumps(index).encode()
    path.write_bytes(raw[:index_offset] + new + FOOTER.pack(index_offset, len(new), zlib.crc32(new), version, magic))


def _set(key, value, tensor=0):
    def edit(index):
        index["tensors"][tensor][key] = value

    return edit


BROKEN = {
    "bad magic": (lambda p: p.write_bytes(b"NOTASIDE" + p.read_bytes()[8:]), "not a streammerge sidecar"),
    "newer version": (
        lambda p: p.write_bytes(p.read_bytes()[:8] + struct.pack("<I", 2) + p.read_bytes()[12:]),
        "version 2, this streammerge reads version 1",
    ),
    "unknown flags": (
        lambda p: p.write_bytes(p.read_bytes()[:12] + struct.pack("<I", 4) + p.read_bytes()[16:]),
        "flags 0x4",
    ),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-5]), "truncated"),
    "cut mid-frame": (lambda p: p.write_bytes(p.read_bytes()[:40]), "truncated"),
    "too short": (lambda p: p.write_bytes(b"\x89SIDECAR"), "too short"),
    "index checksum": (lambda p: p.write_bytes(_flip_in_index(p.read_bytes())), "index checksum mismatch"),
    "bad shape": (lambda p: _rewrite_index(p, _set("shape", [3, -1])), "tensor 'w': shape"),
    "frame count": (lambda p: _rewrite_index(p, _set("frames", [])), "tensor 'w': 0 frames for 1200 elements"),
    "content size": (
        lambda p: _rewrite_index(p, _set("shape", [4000, 30])),
        "tensor 'w', frame 0: frame holds 4800 bytes",
    ),
    "rank1 on a vector": (lambda p: _rewrite_index(p, _set("repr", "rank1", 1)), "tensor 'b': rank1 is not allowed"),
    "unknown repr": (lambda p: _rewrite_index(p, _set("repr", "rank-7")), "unknown representation"),
    "bad dtype": (lambda p: _rewrite_index(p, _set("dtype", "I8")), "unknown storage dtype"),
    "overlapping frames": (
        lambda p: _rewrite_index(p, lambda ix: ix["tensors"][1].__setitem__("frames", ix["tensors"][0]["frames"])),
        "overlaps another frame",
    ),
    "bad beta2": (lambda p: _rewrite_index(p, lambda ix: ix["metadata"].__setitem__("beta2", 2.0)), "beta2"),
}


def _flip_in_index(raw: bytes) -> bytes:
    index_offset = FOOTER.unpack(raw[-FOOTER.size :])[0]
    b = bytearray(raw)
    b[index_offset + 3] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("case", list(BROKEN))
def test_damaged_files_are_refused_with_a_clear_error(tmp_path, case):
    path = _write(tmp_path / "a.sc", {"w": _v(40, 30), "b": _v(30)})
    damage, needle = BROKEN[case]
    damage(path)
    with pytest.raises(CheckpointError, match=needle) as e:
        with sidecar.load(path) as sc:
            sc.get("w")
    assert str(path) in str(e.value)


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with SidecarWriter(tmp_path / "a.sc") as w:
            w.add("w", factorize(_v(4, 4), None))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_raw_safetensors_opens_with_the_same_interface(tmp_path):
    tensors = {"w": _v(20, 10), "b": _v(10)}
    save_file(tensors, tmp_path / "raw.safetensors", metadata={"step": "12", "beta2": "0.95"})
    with sidecar.load(tmp_path / "raw.safetensors") as sc:
        assert isinstance(sc, sidecar.RawSecondMoments) and set(sc.keys()) == {"w", "b"}
        assert sc.metadata["step"] == 12 and sc.metadata["beta2"] == 0.95 and sc.shape("w") == (20, 10)
        assert torch.equal(sc.get("w"), tensors["w"]) and torch.equal(
            sc.get_flat("w", 17, 50), tensors["w"].reshape(-1)[17:67]
        )
        assert sc.representation("b") == "exact" and "w" in sc and "x" not in sc


# --- conversion --------------------------------------------------------------------------------------


def _optimizer_states():
    sd = torch.load(TRAINER / "optimizer.pt", weights_only=True)
    return sd, [s["exp_avg_sq"] for s in sd["state"].values()]


def test_trainer_checkpoint_converts_to_the_optimizer_states_by_name(tmp_path):
    pytest.importorskip("transformers")
    result = sidecar.convert(TRAINER, tmp_path / "t.sc", rank="exact")
    assert result.kind == "Hugging Face Trainer checkpoint" and "transformers LlamaForCausalLM" in result.names_from
    sd, states = _optimizer_states()
    named = load_file(NAMED)  # exported by parameter identity from the live optimizer that wrote optimizer.pt
    trainer_state = json.loads((TRAINER / "trainer_state.json").read_text())
    with sidecar.load(tmp_path / "t.sc") as sc:
        assert sorted(sc.keys()) == sorted(named) and len(states) == len(named) == 28
        for name in sc.keys():
            assert torch.equal(sc.get(name), named[name]), name
        used = set()  # each optimizer state appears exactly once, bit for bit
        for s in states:
            match = [n for n in sc.keys() if n not in used and sc.get(n).shape == s.shape and torch.equal(sc.get(n), s)]
            assert len(match) == 1
            used.add(match[0])
        assert sc.metadata["step"] == trainer_state["global_step"] == 6
        assert sc.metadata["beta2"] == sd["param_groups"][0]["betas"][1] == 0.98
        assert sc.metadata["optimizer"] == "AdamW"
        assert {sc.step(n) for n in sc.keys()} == {6}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_our_decay_groups_equal_transformers_trainer(tmp_path, arch):
    """hf_trainer_groups on the meta model's names == Trainer.get_decay_parameter_names (GPT-2's ln_1 is an
    nn.LayerNorm whose name matches no pattern: only the type rule catches it)."""
    transformers = pytest.importorskip("transformers")
    from streammerge.io.optimizer_names import hf_trainer_groups

    if arch == "llama":
        folder = TRAINER
    else:
        folder = tmp_path / "gpt2"
        transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=16, n_positions=8).save_pretrained(folder)
    names, layernorm, cls = second_moment_sources._model_parameters(folder)
    with torch.device("meta"):
        model = getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(folder))
    expected = transformers.Trainer.get_decay_parameter_names(None, model)
    decay, no_decay = hf_trainer_groups(names, layernorm)
    assert list(decay) == [n for n, _ in model.named_parameters() if n in expected]
    assert set(no_decay) == {n for n, _ in model.named_parameters()} - set(expected) and no_decay
    if arch == "gpt2":
        assert "transformer.h.0.ln_1.weight" in no_decay


def test_trainer_checkpoint_without_model_order_is_ambiguous(tmp_path):
    with pytest.raises(CheckpointError, match="ambiguous parameter names.*q_proj"):
        sidecar.convert(TRAINER, tmp_path / "t.sc", use_transformers=False)
    assert not list(tmp_path.iterdir())


def _tiny_trainer_folder(folder: Path, weights: str, shared_shapes: bool) -> dict[str, torch.Tensor]:
    """A Trainer-like checkpoint from a hand-built model, optimizer groups made as HF Trainer makes them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Embedding(11, 6))
    model.add_module("proj", torch.nn.Linear(6, 5, bias=False))
    model.add_module("norm", torch.nn.LayerNorm(5, bias=False))  # "norm" in its name: found without module types
    model.add_module("out", torch.nn.Linear(5, 7 if not shared_shapes else 5))
    if shared_shapes:
        model.add_module("extra", torch.nn.Linear(5, 5, bias=False))
    named = dict(model.named_parameters())
    no_decay = [n for n in named if "bias" in n or n.startswith("norm.")]
    groups = [
        {"params": [p for n, p in named.items() if n not in no_decay], "weight_decay": 0.1},
        {"params": [p for n, p in named.items() if n in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    for _ in range(3):
        opt.zero_grad()
        x = model.embed(torch.tensor([[1, 2, 3]]))
        for name in ("proj", "norm", "out") + (("extra",) if shared_shapes else ()):
            x = getattr(model, name)(x)
        x.pow(2).sum().backward()
        opt.step()
    folder.mkdir()
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    weights_sd = {n: p.detach().clone() for n, p in named.items()}
    if weights == "safetensors":
        save_file(weights_sd, folder / "model.safetensors")
    else:
        torch.save(weights_sd, folder / "pytorch_model.bin")
    return {n: opt.state[p]["exp_avg_sq"].clone() for n, p in named.items()}


@pytest.mark.parametrize("weights, shared", [("safetensors", False), ("bin", True)])
def test_names_from_the_checkpoint_alone_when_unambiguous(tmp_path, weights, shared):
    expected = _tiny_trainer_folder(tmp_path / "ckpt", weights, shared)
    result = sidecar.convert(tmp_path / "ckpt", tmp_path / "t.sc", rank="exact", use_transformers=False)
    assert "checkpoint tensor" in result.names_from
    with sidecar.load(tmp_path / "t.sc") as sc:
        assert sorted(sc.keys()) == sorted(expected)
        for name, v in expected.items():
            assert torch.equal(sc.get(name), v), name
        assert sc.metadata["beta2"] == 0.95 and sc.metadata["step"] == 3


def test_shared_shapes_in_safetensors_without_transformers_are_refused(tmp_path):
    _tiny_trainer_folder(tmp_path / "ckpt", "safetensors", shared_shapes=True)
    with pytest.raises(CheckpointError, match="ambiguous parameter names"):
        sidecar.convert(tmp_path / "ckpt", tmp_path / "t.sc", use_transformers=False)


def test_wrong_model_is_refused_by_shape_or_count(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "opt").mkdir()
    shutil.copy(TRAINER / "optimizer.pt", tmp_path / "opt" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="no model weights to name and check its states; pass --model"):
        sidecar.convert(tmp_path / "opt", tmp_path / "t.sc")
    with pytest.raises(CheckpointError, match="cannot name the optimizer states.*(shape|ids)"):
        sidecar.convert(tmp_path / "opt", tmp_path / "t.sc", model=FIXTURES / "tiny-llama-base")
    result = sidecar.convert(tmp_path / "opt", tmp_path / "t.sc", model=TRAINER, rank="exact")
    assert result.tensors == 28


def test_name_keyed_sources_convert(tmp_path):
    named = load_file(NAMED)
    torch.save(named, tmp_path / "named.pt")
    sd = {
        "state": {
            n: {"step": torch.tensor(4.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": v} for n, v in named.items()
        },
        "param_groups": [{"params": list(named), "betas": (0.9, 0.99), "decoupled_weight_decay": False}],
    }
    torch.save(sd, tmp_path / "named_opt.pt")
    for src in (NAMED, tmp_path / "named.pt", tmp_path / "named_opt.pt"):
        out = tmp_path / f"{src.stem}.sc"
        sidecar.convert(src, out, rank="exact")
        with sidecar.load(out) as sc:
            assert sc.keys() == list(named) and all(torch.equal(sc.get(n), v) for n, v in named.items())
    with sidecar.load(tmp_path / "named_opt.sc") as sc:
        assert sc.metadata["optimizer"] == "Adam" and sc.metadata["step"] == 4 and sc.metadata["beta2"] == 0.99


def test_torch_sources_are_remapped_to_bound_resident_pages(tmp_path, monkeypatch):
    torch.save({f"t{i}": _v(100, 10, seed=i) for i in range(6)}, tmp_path / "named.pt")
    loads = []
    real = second_moment_sources.load_torch_file
    monkeypatch.setattr(second_moment_sources, "load_torch_file", lambda p: (loads.append(p), real(p))[1])
    sidecar.convert(tmp_path / "named.pt", tmp_path / "a.sc")
    assert len(loads) == 6  # one map for the names, then one per 4000-byte tensor (the budget)


def test_negative_or_nan_second_moments_are_refused(tmp_path):
    for bad in (-1.0, float("nan"), float("inf")):
        v = _v(5, 5)
        v[2, 3] = bad
        save_file({"w": v}, tmp_path / "bad.safetensors")
        with pytest.raises(CheckpointError, match="'w' has negative, NaN or infinite"):
            sidecar.convert(tmp_path / "bad.safetensors", tmp_path / "a.sc")
        assert not (tmp_path / "a.sc").exists()


# --- export from a live optimizer ---------------------------------------------------------------------


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_export_from_a_live_optimizer(tmp_path, opt_cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    model[2].bias.requires_grad_(False)  # frozen: not exported
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], betas=(0.8, 0.97))
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(3, 8)).square().mean().backward()
        opt.step()
    sidecar.export(model, opt, tmp_path / "exact.sc", rank="exact")
    sidecar.export(model, opt, tmp_path / "r1.sc", rank=1)
    expected = {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters() if p.requires_grad}
    with sidecar.load(tmp_path / "exact.sc") as sc, sidecar.load(tmp_path / "r1.sc") as r1:
        assert sc.keys() == list(expected) == ["0.weight", "0.bias", "2.weight"]
        assert sc.metadata == {"source": "Sequential", "optimizer": opt_cls.__name__, "step": 5, "beta2": 0.97}
        for name, v in expected.items():
            assert torch.equal(sc.get(name), v)
        w = expected["0.weight"].double()
        torch.testing.assert_close(
            r1.get("0.weight").double(), torch.outer(w.sum(1), w.sum(0)) / w.sum(), rtol=1e-6, atol=0
        )
        assert r1.representation("0.bias") == "exact"


def test_export_refuses_sharded_states_and_empty_optimizers(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(StreamMergeError, match="no exp_avg_sq"):
        sidecar.export(model, opt, tmp_path / "a.sc")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.state[model.weight]["exp_avg_sq"] = torch.zeros(8)  # a flat shard, as ZeRO keeps it
    with pytest.raises(StreamMergeError, match="is a shard"):
        sidecar.export(model, opt, tmp_path / "a.sc")
    assert not list(tmp_path.iterdir())


# --- CLI -------------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_convert_and_inspect(tmp_path):
    r = run("sidecar", "convert", NAMED, tmp_path / "a.sc", "--rank", "1")
    assert r.exit_code == 0, r.output
    assert "28 tensors from a name-keyed safetensors" in r.output and "of 91.52 KB fp32 exp_avg_sq" in r.output
    r = run("sidecar", "inspect", tmp_path / "a.sc")
    assert r.exit_code == 0, r.output
    assert "model.layers.0.mlp.down_proj.weight" in r.output and "rank1" in r.output
    with sidecar.load(tmp_path / "a.sc") as sc:
        stored = sum(sc.stored_bytes(n) for n in sc.keys())
    assert f"(ratio {stored / 91520:.2%})" in r.output
    r = run("sidecar", "inspect", NAMED)
    assert r.exit_code == 0 and "(ratio 100.00%)" in r.output


def _garbage(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    return tmp_path / "garbage.safetensors"


BAD_CLI = {
    "missing source": (lambda tmp: ["convert", tmp / "nope", tmp / "out" / "a.sc"], "no such file or folder"),
    "bad rank": (
        lambda tmp: ["convert", NAMED, tmp / "out" / "a.sc", "--rank", "two"],
        "expected 'exact' or a positive",
    ),
    "bad dtype": (
        lambda tmp: ["convert", NAMED, tmp / "out" / "a.sc", "--dtype", "int8"],
        "expected fp32, bf16 or fp16",
    ),
    "corrupt source": (lambda tmp: ["convert", _garbage(tmp), tmp / "out" / "a.sc"], "not valid JSON"),
    "folder without optimizer": (
        lambda tmp: ["convert", FIXTURES / "tiny-llama-base", tmp / "out" / "a.sc"],
        "no optimizer.pt",
    ),
    "output is a folder": (lambda tmp: ["convert", NAMED, tmp / "out"], "is a folder"),
    "output exists": (
        lambda tmp: ["convert", NAMED, (tmp / "out" / "x.sc", (tmp / "out" / "x.sc").write_text("x"))[0]],
        "--overwrite",
    ),
    "inspect non-sidecar": (lambda tmp: ["inspect", TRAINER / "config.json"], "not a streammerge sidecar"),
    "inspect missing": (lambda tmp: ["inspect", tmp / "nope.sc"], "cannot open"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_bad_input_one_line_no_traceback_nothing_written(tmp_path, case):
    (tmp_path / "out").mkdir()
    make, needle = BAD_CLI[case]
    args = make(tmp_path)
    before, out_before = snapshot(FIXTURES), snapshot(tmp_path / "out")
    r = CliRunner().invoke(main, ["sidecar", *map(str, args)])
    assert r.exit_code == 1, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert snapshot(FIXTURES) == before and snapshot(tmp_path / "out") == out_before


# --- rank-1 factors for the merge ----------------------------------------------------------------------


def test_rank1_chunk_gives_the_same_values_as_get_flat(tmp_path):
    from streammerge.io.second_moment_factors import Factored

    _write(tmp_path / "a.sc", {"m": _v(37, 23), "vec": _v(50), "cube": _v(4, 5, 6)}, rank=1)
    sc = sidecar.load(tmp_path / "a.sc")
    assert sc.rank1_chunk("vec", 0, 50) is None  # 1-D stays exact: no factors
    for name in ("m", "cube"):
        numel = sc.get(name).numel()
        for start, count in [(0, numel), (5, 17), (22, 2), (numel - 1, 1), (30, 0), (24, numel - 24)]:
            rows, cols, offset = sc.rank1_chunk(name, start, count)
            got = torch.outer(rows, cols).reshape(-1)[offset : offset + count]
            assert torch.equal(got, sc.get_flat(name, start, count)), (name, start, count)
    # corrupt factors (written as such, as a damaged or hand-made file would hold them) are refused by name
    with SidecarWriter(tmp_path / "bad.sc") as w:
        w.add("m", Factored("rank1", (3, 2), {"r": torch.tensor([1.0, -2.0, 1.0]), "c": torch.tensor([1.0, 1.0])}, 2.0))
        w.finish({"source": "test"})
    with pytest.raises(CheckpointError, match="'m': rank-1 factor r has negative, NaN or infinite values"):
        sidecar.load(tmp_path / "bad.sc").rank1_chunk("m", 0, 6)
