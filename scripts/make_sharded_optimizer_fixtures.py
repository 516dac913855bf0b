"""Build fixtures/sharded-optimizers: real DeepSpeed ZeRO and FSDP2 + DCP optimizer checkpoints of a tiny model.

    pip install deepspeed          # fixture builder only; the tests never import it
    python scripts/make_sharded_optimizer_fixtures.py [--out fixtures/sharded-optimizers] [--only NAME,...]

Every run trains the same tiny model (``TinyNet``: embedding 11x6, linear 6->10 with bias, LayerNorm 10,
linear 10->7 without bias; 226 parameters, odd sizes so partitions need padding) for ``STEPS`` steps
of AdamW (two param groups as Hugging Face Trainer builds them: decayed weights, then biases and norm
weights; beta2 0.98) on 2 CPU ranks (gloo) started with ``torch.multiprocessing``. Both ranks get the
same batches, so the data-parallel mean of the gradients is bit-equal to one process's gradient, and
``ground-truth.safetensors`` (the same run in one process, plain ``torch.optim.AdamW``, keyed by
parameter name) is the exact reference for the exp_avg_sq of every fp32 run. bf16 runs' second moments
come from bf16 gradients, which one fp32 process does not reproduce; for every ZeRO run (bf16 included)
``zero_to_fp32.safetensors`` holds DeepSpeed's own reassembly of the fp32 master weights
(``deepspeed.utils.zero_to_fp32``), which share exp_avg_sq's flat layout element for element.

    zero1/ zero2/ zero3/          engine.save_checkpoint(): global_step3/, latest, fp32 ZeRO-1/2/3
    zero2/step4-rank1/            rank 1's optimizer file saved one step later (bad-input tests)
    zero3-subgroups/              ZeRO-3 with sub_group_size 30: 4 flat sub-groups per rank
    zero1-bf16/                   bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer: bf16_zero_pp_rank_* files)
    zero2-bf16/ zero3-bf16/       bf16 mixed precision
    trainer-zero2/checkpoint-3/   the folder HF Trainer writes around a ZeRO checkpoint (latest, global_step3/)
    fsdp2-dcp/                    FSDP2 (fully_shard) states saved with dcp.save({"optimizer": ...}), as
                                  Accelerate does (optimizer_0/ inside a checkpoint folder)

DeepSpeed runs use its CPU accelerator (``DS_ACCELERATOR=cpu``); the launcher's helper scripts
(zero_to_fp32.py) are dropped. A few MB of rank files in all; a few minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

STEPS = 3
WORLD = 2
BETAS = (0.9, 0.98)


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 10)
        self.norm = torch.nn.LayerNorm(10)
        self.head = torch.nn.Linear(10, 7, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (B, T) -> logits (B, T, 7)
        return self.head(self.norm(torch.nn.functional.gelu(self.proj(self.embed(ids)))))


def make_model(dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().to(dtype)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 7, (4, 5), generator=g)) for _ in range(STEPS)]


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, 7), targets.reshape(-1))


def param_groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def ground_truth(out: Path) -> None:
    """The unsharded run: one process, same seed, same batches, plain torch AdamW."""
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=BETAS)
    for ids, targets in batches():
        loss_of(model(ids), targets).backward()
        opt.step()
        opt.zero_grad()
    named = {n: opt.state[p]["exp_avg_sq"].clone() for n, p in model.named_parameters()}
    save_file(named, out / "ground-truth.safetensors", metadata={"step": str(STEPS), "beta2": str(BETAS[1])})


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)


def deepspeed_rank(rank: int, port: int, dest: str, stage: int, bf16: bool, sub_group: int | None,
                   extra: str | None = None) -> None:
    _init(rank, port)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=BETAS)
    zero: dict = {"stage": stage}
    if sub_group:
        zero["sub_group_size"] = sub_group
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}, "steps_per_print": 1000}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    for ids, targets in batches():
        engine.backward(loss_of(engine(ids), targets))
        engine.step()
    engine.save_checkpoint(dest)
    if extra:  # one more step, saved elsewhere: rank files of a later step, for the mixed-steps test
        ids, targets = batches()[0]
        engine.backward(loss_of(engine(ids), targets))
        engine.step()
        engine.save_checkpoint(extra)
    torch.distributed.barrier()


def fsdp_rank(rank: int, port: int, dest: str) -> None:
    _init(rank, port)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = make_model()
    for module in (model.embed, model.proj, model.head):
        fully_shard(module)
    fully_shard(model)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=BETAS)
    for ids, targets in batches():
        loss_of(model(ids), targets).backward()
        opt.step()
        opt.zero_grad()
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=dest)
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keep_zero(tmp: Path, dest: Path) -> None:
    """Copy what DeepSpeed wrote (latest, global_step*/) without its helper scripts, and DeepSpeed's own
    reassembly of the fp32 master weights (``zero_to_fp32``), whose flat layout exp_avg_sq shares."""
    dest.mkdir(parents=True)
    for item in tmp.iterdir():
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        elif item.name == "latest":
            shutil.copy2(item, dest / item.name)
    write_zero_to_fp32(dest)


def write_zero_to_fp32(dest: Path) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(dest))
    save_file({n: v.float().contiguous() for n, v in weights.items()}, dest / "zero_to_fp32.safetensors")


RUNS = {
    "zero1": dict(stage=1, bf16=False, sub_group=None),
    "zero2": dict(stage=2, bf16=False, sub_group=None),
    "zero3": dict(stage=3, bf16=False, sub_group=None),
    "zero3-subgroups": dict(stage=3, bf16=False, sub_group=30),
    "zero1-bf16": dict(stage=1, bf16=True, sub_group=None),
    "zero2-bf16": dict(stage=2, bf16=True, sub_group=None),
    "zero3-bf16": dict(stage=3, bf16=True, sub_group=None),
}


def build(out: Path, only: set[str] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ground_truth(out)
    wanted = [*RUNS, "trainer-zero2", "fsdp2-dcp"]
    for name in wanted:
        if only and name not in only:
            continue
        dest = out / name
        if dest.exists():
            shutil.rmtree(dest)
        with tempfile.TemporaryDirectory() as tmp:
            if name == "fsdp2-dcp":
                target = dest / "checkpoint-3" / "optimizer_0"
                target.parent.mkdir(parents=True)
                mp.spawn(fsdp_rank, args=(_port(), str(target)), nprocs=WORLD, join=True)
            else:
                run = RUNS["zero2" if name == "trainer-zero2" else name]
                extra = tempfile.mkdtemp() if name == "zero2" else None
                mp.spawn(deepspeed_rank, args=(_port(), tmp, run["stage"], run["bf16"], run["sub_group"], extra),
                         nprocs=WORLD, join=True)
                if name == "trainer-zero2":
                    _keep_zero(Path(tmp), dest / f"checkpoint-{STEPS}")
                    (dest / f"checkpoint-{STEPS}" / "trainer_state.json").write_text(
                        json.dumps({"global_step": STEPS}) + "\n")
                else:
                    _keep_zero(Path(tmp), dest)
                if extra:  # keep only rank 1's file of step 4
                    later = Path(extra) / f"global_step{STEPS + 1}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
                    (dest / "step4-rank1").mkdir()
                    shutil.move(later, dest / "step4-rank1" / later.name)
                    shutil.rmtree(extra)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(f"wrote {dest} ({size:,} bytes)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "fixtures" / "sharded-optimizers"
    ap.add_argument("--out", type=Path, default=default)
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    args = ap.parse_args()
    build(args.out, set(filter(None, args.only.split(","))) or None)


if __name__ == "__main__":
    main()
