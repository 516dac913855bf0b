"""DeepSpeed ZeRO and FSDP/DCP optimizer checkpoints as sidecar sources (fixtures made by the real libraries:
scripts/make_sharded_optimizer_fixtures.py). Values are compared exactly against the same training run
in one process (ground-truth.safetensors) and, for placement in every ZeRO layout (bf16 included), against
DeepSpeed's own zero_to_fp32 reassembly of the fp32 master weights, which share exp_avg_sq's flat layout."""

from __future__ import annotations

import io
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, snapshot
from safetensors.torch import load_file

import streammerge.sidecar as sidecar
from streammerge.cli import main
from streammerge.io import dcp_states, deepspeed_zero, torch_save_chunk
from streammerge.io.second_moment_sources import open_source

SHARDED = FIXTURES / "sharded-optimizers"
TRUTH = load_file(SHARDED / "ground-truth.safetensors")
FP32_RUNS = {
    "zero1": SHARDED / "zero1",
    "zero2 (global_step3 itself)": SHARDED / "zero2" / "global_step3",
    "zero3": SHARDED / "zero3",
    "zero3, 4 sub-groups per rank": SHARDED / "zero3-subgroups",
    "HF Trainer checkpoint-3 around ZeRO-2": SHARDED / "trainer-zero2" / "checkpoint-3",
    "FSDP2 + DCP (Accelerate layout)": SHARDED / "fsdp2-dcp" / "checkpoint-3",
    "FSDP2 + DCP folder itself": SHARDED / "fsdp2-dcp" / "checkpoint-3" / "optimizer_0",
}
ZERO_RUNS = ["zero1", "zero2", "zero3", "zero3-subgroups", "zero1-bf16", "zero2-bf16", "zero3-bf16",
             "trainer-zero2/checkpoint-3"]


@pytest.mark.parametrize("case", list(FP32_RUNS))
def test_converted_second_moments_equal_the_unsharded_run(tmp_path, case):
    result = sidecar.convert(FP32_RUNS[case], tmp_path / "x.sidecar", rank="exact")
    with sidecar.load(result.out) as sc:
        assert sorted(sc.keys()) == sorted(TRUTH)
        for name, v in TRUTH.items():
            assert torch.equal(sc.get(name), v), name
        assert sc.metadata["step"] == 3 and sc.step(name) == 3
        assert sc.metadata["layout"]
        if "DCP" not in case:
            assert sc.metadata["beta2"] == 0.98 and sc.metadata["optimizer"] == "AdamW"


@pytest.mark.parametrize("run", ZERO_RUNS)
def test_zero_placement_equals_deepspeeds_own_reassembly(run):
    """Our pieces applied to the fp32 master weights give DeepSpeed's zero_to_fp32 output, bit for bit."""
    folder = SHARDED / run
    expected = load_file(folder / "zero_to_fp32.safetensors")
    src = deepspeed_zero.ZeroSource(folder)
    try:
        got = {name: v.clone() for name, v, _ in src.tensors("fp32_weights")}
        assert sorted(got) == sorted(expected)
        for name, v in expected.items():
            assert torch.equal(got[name], v), name
        stage = 3 if "zero3" in run else 1 if "zero1" in run else 2
        assert f"ZeRO-{stage}, 2 ranks, {'bf16 mixed precision' if 'bf16' in run else 'fp32'}" in src.metadata["layout"]
        for name, v, _ in src.tensors():  # bf16 runs: real second moments, in the parameter's shape
            assert v.shape == expected[name].shape and bool((v >= 0).all()) and bool((v > 0).any())
    finally:
        src.close()


# --- the placement rules on synthetic layouts (padding, straddled sub-groups) ---------------------------


def _stage12_files(sizes: list[list[int]], paddings: list[list[int]], world: int):
    """Flat groups as DeepSpeed builds them: params + alignment padding, padded to 2*world, split evenly."""
    values, lean = {}, [[0] * len(sizes) for _ in range(world)]
    flats = [[None] * len(sizes) for _ in range(world)]
    shapes = []
    for g, (group, pads) in enumerate(zip(sizes, paddings, strict=True)):
        parts, names = [], {}
        for i, (n, pad) in enumerate(zip(group, pads, strict=True)):
            values[f"g{g}.p{i}"] = torch.arange(n, dtype=torch.float32) + 1000 * g + 100 * i
            parts += [values[f"g{g}.p{i}"], torch.full((pad,), -1.0)]
            names[f"g{g}.p{i}"] = (n,)
        flat = torch.cat(parts)
        total = 2 * world * math.ceil(flat.numel() / (2 * world))
        group_pad = total - flat.numel()
        flat = torch.cat([flat, torch.full((group_pad,), -2.0)])
        per = total // world
        for r in range(world):
            flats[r][g] = flat[r * per : (r + 1) * per]
            lean[r][g] = per - (group_pad if r == world - 1 else 0)
        shapes.append(names)
    return shapes, lean, flats, values


def _assemble(pieces, flats):
    return torch.cat([flats[p.rank][p.group][p.start : p.start + p.count] for p in pieces])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_stage12_pieces_reassemble_padded_groups(world):
    sizes, pads = [[7, 1, 12], [5]], [[1, 0, 3], [0]]
    shapes, lean, flats, values = _stage12_files(sizes, pads, world)
    pieces, why = deepspeed_zero.stage12_pieces(shapes, lean, pads)
    assert why is None
    for name, v in values.items():
        assert torch.equal(_assemble(pieces[name], flats), v), name
    _, why = deepspeed_zero.stage12_pieces(shapes, [[n + 2 * world for n in r] for r in lean], pads)
    assert why and "the ranks hold" in why  # a partition that does not add up is named, not guessed


@pytest.mark.parametrize("world, cuts", [(2, [40]), (3, [5, 9, 30]), (4, [1, 2, 3])])
def test_stage3_pieces_reassemble_params_straddling_sub_groups(world, cuts):
    numels = [13, 1, 8, 21]
    values = {f"p{i}": torch.arange(n, dtype=torch.float32) + 100 * i for i, n in enumerate(numels)}
    rank_flat = [[] for _ in range(world)]
    for v in values.values():  # each parameter padded to world * ceil(n / world), one slice per rank
        part = math.ceil(v.numel() / world)
        padded = torch.cat([v, torch.full((part * world - v.numel(),), -1.0)])
        for r in range(world):
            rank_flat[r].append(padded[r * part : (r + 1) * part])
    flats, lengths = [], []
    for r in range(world):
        flat = torch.cat(rank_flat[r])
        bounds = [0, *[c for c in cuts if c < flat.numel()], flat.numel()]
        flats.append([flat[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
        lengths.append([b - a for a, b in zip(bounds, bounds[1:], strict=False)])
    shapes = [{"p0": (13,), "p1": (1,)}, {"p2": (2, 4), "p3": (21,)}]
    pieces, why = deepspeed_zero.stage3_pieces(shapes, lengths)
    assert why is None
    for name, v in values.items():
        assert torch.equal(_assemble(pieces[name], flats), v), name
    _, why = deepspeed_zero.stage3_pieces(shapes, [[n + 1 for n in r] for r in lengths])
    assert why and "each rank holds" in why


def test_dcp_state_keys():
    nested = ("optimizer", "state", "model.layers.0.state.weight", "exp_avg_sq")  # exact from planner data
    assert dcp_states.state_key("x", nested) == ("model.layers.0.state.weight", "exp_avg_sq")
    assert dcp_states.state_key("state.layers.0.w.step") == ("layers.0.w", "step")  # torchtitan's flat keys
    assert dcp_states.state_key("optimizer.state.a.exp_avg") is None
    assert dcp_states.state_key("optimizer.param_groups.0.lr", ("optimizer", "param_groups", 0, "lr")) is None


TILINGS = {  # (size, [(offsets, sizes), ...]) -> whether the chunks tile the tensor exactly
    "row slabs": ((10, 4), [((0, 0), (5, 4)), ((5, 0), (5, 4))], True),
    "row slabs with an empty shard": ((3, 4), [((0, 0), (2, 4)), ((2, 0), (1, 4)), ((3, 0), (0, 4))], True),
    "overlap and gap, right volume": ((10, 4), [((0, 0), (6, 4)), ((4, 0), (4, 4))], False),
    "2-D blocks": ((4, 4), [((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 4))], True),
    "2-D overlap, right volume": ((4, 4), [((0, 0), (2, 3)), ((0, 1), (2, 1)), ((2, 0), (2, 4))], False),
    "wrong rank of chunk": ((4,), [((0, 0), (2, 2))], False),
    "outside": ((4,), [((2,), (4,))], False),
}


@pytest.mark.parametrize("case", list(TILINGS))
def test_dcp_chunks_must_tile_the_tensor(case):
    from types import SimpleNamespace

    size, chunks, ok = TILINGS[case]
    assert dcp_states._tiles(size, [SimpleNamespace(offsets=o, sizes=s) for o, s in chunks]) is ok


def test_dcp_names_drop_wrappers():
    assert dcp_states.model_name("_orig_mod.module.layers.0._fsdp_wrapped_module.weight") == "layers.0.weight"
    assert dcp_states.model_name("model._checkpoint_wrapped_module.embed.weight") == "model.embed.weight"


def _saved(tensor, pad=0):
    """``tensor`` torch.save'd after ``pad`` junk bytes, as DCP stores a chunk inside a .distcp file."""
    buf = io.BytesIO()
    buf.write(b"x" * pad)
    torch.save(tensor, buf)
    return buf


_g = torch.Generator().manual_seed(3)
CHUNK_ARCHIVES = {  # saved tensor, destination slice of a larger tensor, whether read straight from the file
    "row slab of a 2-D tensor": (torch.rand(3, 6, generator=_g), (slice(2, 5), slice(None)), True),
    "bf16": (torch.rand(4, 6, generator=_g).bfloat16(), (slice(0, 4), slice(None)), True),
    "0-d (Adam step)": (torch.tensor(7.0), (), True),
    "view with a storage offset": (torch.rand(6, 6, generator=_g)[2:5], (slice(1, 4), slice(None)), True),
    "column block: via a chunk-sized buffer": (torch.rand(6, 2, generator=_g), (slice(None), slice(1, 3)), True),
    "transposed (strided) record: torch.load": (torch.rand(6, 6, generator=_g).t(), (slice(None), slice(None)),
                                                False),
    "nn.Parameter (a rebuild we do not mimic): torch.load": (torch.nn.Parameter(torch.rand(6, 6, generator=_g)),
                                                             (slice(None), slice(None)), False),
}


@pytest.mark.parametrize("case", list(CHUNK_ARCHIVES))
def test_dcp_chunk_reads_equal_torch_load(case):
    """Each chunk archive lands in its slice exactly as torch.load + copy (DCP's reader) puts it there."""
    saved, where, direct = CHUNK_ARCHIVES[case]
    buf = _saved(saved, pad=13)
    full = torch.full((6, 6) if saved.dim() else (), -1.0, dtype=saved.dtype)
    expected = full.clone()
    expected[where] = torch.load(io.BytesIO(buf.getvalue()[13:]), weights_only=True).detach()
    got = torch_save_chunk.read_chunk_into(buf, 13, len(buf.getvalue()) - 13, full[where])
    assert got is direct and torch.equal(full, expected)


def test_dcp_chunk_of_other_shape_or_dtype_is_refused():
    buf = _saved(torch.rand(3, 5))
    for dest in (torch.empty(5, 3), torch.empty(3, 5, dtype=torch.float64)):
        with pytest.raises(ValueError, match="the metadata says"):
            torch_save_chunk.read_chunk_into(buf, 0, None, dest)


def test_dcp_conversion_does_not_import_dcp(tmp_path):
    """The reader needs none of torch.distributed.checkpoint (an import of ~1 s): metadata comes from stand-ins."""
    code = ("import sys, streammerge.sidecar as s; s.convert(sys.argv[1], sys.argv[2], rank='exact'); "
            "assert 'torch.distributed.checkpoint' not in sys.modules, 'imported'")
    src = FP32_RUNS["FSDP2 + DCP (Accelerate layout)"]
    r = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "x.sc")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == 0, r.stderr


def test_dcp_compressed_chunks_through_dcps_extension(tmp_path):
    """A save with DCP's (experimental) ZStandard stream extension reads back equal."""
    pytest.importorskip("zstandard")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard

    v = {"w": torch.rand(7, 3, generator=_g), "b": torch.rand(3, generator=_g)}
    state = {"optimizer": {"state": {n: {"step": torch.tensor(4.0), "exp_avg_sq": t} for n, t in v.items()}}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "ck", _extensions=[ZStandard()]), no_dist=True)
    md = _dcp_metadata(tmp_path / "ck" / ".metadata")
    assert all(info.transform_descriptors for info in md.storage_data.values())
    with sidecar.load(sidecar.convert(tmp_path / "ck", tmp_path / "x.sc", rank="exact").out) as sc:
        assert sorted(sc.keys()) == sorted(v) and all(torch.equal(sc.get(n), t) for n, t in v.items())
        assert sc.metadata["step"] == 4


# --- bad input: one line naming the file, nothing written outside OUT -----------------------------------


def _copy(tmp: Path, rel: str) -> Path:
    dest = tmp / "src"
    shutil.copytree(SHARDED / rel, dest)
    return dest


def _missing_rank(tmp):
    src = _copy(tmp, "zero2")
    (src / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return src, "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing rank file"


def _mixed_steps(tmp):
    src = _copy(tmp, "zero2")
    later = src / "step4-rank1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(later, src / "global_step3" / later.name)
    return src, "zero_pp_rank_1_mp_rank_00_optim_states.pt: Adam step [4, 4] but"


def _extra_rank(tmp):
    src = _copy(tmp, "zero3")
    step = src / "global_step3"
    shutil.copy(step / "zero_pp_rank_1_mp_rank_00_optim_states.pt", step / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    return src, "zero_pp_rank_0_mp_rank_00_optim_states.pt: saved by a world of 2 ranks, but 3 rank files"


def _truncated_rank(tmp):
    src = _copy(tmp, "zero3")
    path = src / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:-600])
    return src, "zero_pp_rank_1_mp_rank_00_optim_states.pt: not a readable PyTorch file"


def _stage_mix(tmp):
    src = _copy(tmp, "zero2")
    shutil.copy(SHARDED / "zero3" / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                src / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return src, "zero_pp_rank_1_mp_rank_00_optim_states.pt: ZeRO stage 3, but"


def _bad_latest(tmp):
    src = _copy(tmp, "zero3")
    (src / "latest").write_text("global_step9")
    return src, "latest: names 'global_step9', which is not a folder"


def _dcp_metadata(path):
    """The fixture's metadata as DCP's own classes (plain pickle: our fixture is trusted), to corrupt and re-save."""
    import torch.distributed.checkpoint  # noqa: F401 - the classes the pickle names

    return pickle.loads(path.read_bytes())


def _dcp_missing_rank(tmp):
    src = _copy(tmp, "fsdp2-dcp")
    (src / "checkpoint-3" / "optimizer_0" / "__1_0.distcp").unlink()
    return src / "checkpoint-3", "__1_0.distcp: missing rank file"


def _dcp_not_adding_up(tmp):
    src = _copy(tmp, "fsdp2-dcp")
    path = src / "checkpoint-3" / "optimizer_0" / ".metadata"
    md = _dcp_metadata(path)
    item = md.state_dict_metadata["optimizer.state.proj.weight.exp_avg_sq"]
    item.chunks[1].sizes = torch.Size([4, 6])
    path.write_bytes(pickle.dumps(md))
    return src / "checkpoint-3", "the shards of 'optimizer.state.proj.weight.exp_avg_sq' (parameter 'proj.weight')"


def _dcp_truncated(tmp):
    src = _copy(tmp, "fsdp2-dcp")
    path = src / "checkpoint-3" / "optimizer_0" / "__1_0.distcp"
    path.write_bytes(path.read_bytes()[:1000])
    return src / "checkpoint-3", "__1_0.distcp: shorter than .metadata says"


def _dcp_garbled_chunk(tmp):
    src = _copy(tmp, "fsdp2-dcp")
    path = src / "checkpoint-3" / "optimizer_0" / "__0_0.distcp"
    path.write_bytes(bytes(path.stat().st_size))  # right size, zeros
    return src / "checkpoint-3", "__0_0.distcp: cannot read 'optimizer.state."


def _dcp_escaping_path(tmp):
    src = _copy(tmp, "fsdp2-dcp")
    path = src / "checkpoint-3" / "optimizer_0" / ".metadata"
    md = _dcp_metadata(path)
    for info in md.storage_data.values():
        info.relative_path = "../../../secret.distcp"
    path.write_bytes(pickle.dumps(md))
    return src / "checkpoint-3", "outside the checkpoint folder"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _code_pickle(tmp):
    src = _copy(tmp, "zero2")
    torch.save({"optimizer_state_dict": {"x": _Evil()}},
               src / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return src, "zero_pp_rank_1_mp_rank_00_optim_states.pt: refusing to load"


def _dcp_code_pickle(tmp):
    src = _copy(tmp, "fsdp2-dcp")
    (src / "checkpoint-3" / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    return src / "checkpoint-3", ".metadata: not readable torch.distributed.checkpoint metadata (builtins.print"


BAD = {f.__name__[1:]: f for f in (_missing_rank, _mixed_steps, _extra_rank, _truncated_rank, _stage_mix,
                                    _bad_latest, _code_pickle, _dcp_missing_rank, _dcp_not_adding_up, _dcp_truncated,
                                    _dcp_garbled_chunk, _dcp_escaping_path, _dcp_code_pickle)}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sharded_input_is_one_line_naming_the_file(tmp_path, case):
    src, needle = BAD[case](tmp_path)
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path / "src")
    for command in (["convert", src, tmp_path / "out" / "a.sc"], ["inspect", src]):
        r = CliRunner().invoke(main, ["sidecar", *map(str, command)])
        assert r.exit_code == 1, r.output
        assert needle in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert snapshot(tmp_path / "src") == before and not any((tmp_path / "out").iterdir())


def test_cli_inspect_reports_the_source_layout():
    r = CliRunner().invoke(main, ["sidecar", "inspect", str(SHARDED / "zero3-bf16")])
    assert r.exit_code == 0, r.output
    assert "DeepSpeed ZeRO-3, 2 ranks, bf16 mixed precision, 2 param groups, 6 parameters (global_step3)" in r.output
    assert "6 parameters, 904 B as fp32 exp_avg_sq" in r.output
    r = CliRunner().invoke(main, ["sidecar", "inspect", str(SHARDED / "fsdp2-dcp" / "checkpoint-3")])
    assert r.exit_code == 0 and "torch.distributed.checkpoint, 2 rank files, 6 parameters" in r.output


def test_zero_rank_files_are_remapped_within_one_parameter(monkeypatch):
    """Resident mapped pages stay near one parameter: maps are dropped once reads pass the largest one."""
    loads = []
    real = deepspeed_zero.load_torch_file
    monkeypatch.setattr(deepspeed_zero, "load_torch_file", lambda p: (loads.append(p), real(p))[1])
    src = open_source(SHARDED / "zero3")
    try:
        head = len(loads)
        for _ in src.tensors():
            assert src._touched <= src._budget
        assert len(loads) - head > 2  # re-mapped while streaming, not held open for the whole state
    finally:
        src.close()



@pytest.mark.parametrize("variant", ["torch state, step in state", "FusedAdam: step in param group", "elastic"])
def test_synthetic_zero2_variants(tmp_path, variant):
    """Layouts no fixture run makes (DeepSpeed's FusedAdam needs a GPU; elastic saves are opt-in), written as
    DeepSpeed lays them out: exp_avg_sq flats carry the group padding, single partitions do not."""
    sizes, pads, world = [[7, 12], [5]], [[1, 0], [0]], 2
    shapes, lean, flats, values = _stage12_files(sizes, pads, world)
    step = tmp_path / "ckpt" / "global_step7"
    step.mkdir(parents=True)
    for r in range(world):
        groups = [{"betas": (0.9, 0.95), "params": [g], "decoupled_weight_decay": False} for g in range(len(sizes))]
        states = [{"exp_avg_sq": flats[r][g].abs().clone()} for g in range(len(sizes))]
        if variant.startswith("torch"):
            for s in states:
                s["step"] = torch.tensor(7.0)
        else:
            for gr in groups:
                gr["step"] = 7
        osd = {"zero_stage": 2, "partition_count": [world], "param_alignment_paddings": pads,
               "single_partition_of_fp32_groups": [flats[r][g][: lean[r][g]].clone() for g in range(len(sizes))]}
        if variant == "elastic":
            osd["base_optimizer_state"] = [{"exp_avg_sq": s["exp_avg_sq"][: lean[r][g]]} for g, s in enumerate(states)]
            osd["base_optimizer_state_step"] = 7
        else:
            osd["base_optimizer_state"] = {"state": dict(enumerate(states)), "param_groups": groups}
        torch.save({"optimizer_state_dict": osd}, step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    torch.save({"param_shapes": [{n: torch.Size(s) for n, s in g.items()} for g in shapes]},
               step / "mp_rank_00_model_states.pt")
    result = sidecar.convert(tmp_path / "ckpt", tmp_path / "x.sidecar", rank="exact")
    with sidecar.load(result.out) as sc:
        assert sorted(sc.keys()) == sorted(values)
        for name, v in values.items():
            assert torch.equal(sc.get(name), v.abs()), name
        assert sc.metadata["step"] == 7
        if variant != "elastic":
            assert sc.metadata["beta2"] == 0.95 and sc.metadata["optimizer"] == "Adam"
