"""OrthoMerge with ``output: adapter``: the OFT adapters' merged rotations written as one PEFT adapter.

Per rotated module, Q̄ = the merge rule over the adapters' (COFT-projected) generator vectors, stored in
the adapters' dtype under the same key; a tensor an adapter keeps whole (``modules_to_save``) is the
mean over the adapters that have it. ``adapter_config.json`` is the first adapter's, with the union of
their ``target_modules`` (``merged_adapter_config``). The folder is a few MB at most, so it is written
in one go (planned header, then every tensor), without a resume journal; PEFT loads it, and its
``merge_and_unload`` equals ``output: model`` (tests/test_orthomerge_engine.py).
"""

from __future__ import annotations

import time

import torch

from .config import layer_position, resolve_parameters
from .errors import ConfigError, OutputError
from .experts import AdapterExpert
from .io.adapter_writer import AdapterWriter, merged_adapter_config
from .io.hf_files import write_model_card
from .io.journal import OutputLock
from .io.peft_adapters import OftAdapter, common_rotation_map, oft_sources
from .io.safetensors_format import TensorSpec
from .methods.orthomerge import merge_generators, oft_generator

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def wants_adapter_output(plan) -> bool:
    if plan.config.method.name != "orthomerge":
        return False
    params, _ = resolve_parameters(plan.config, plan.tensors[0].out.name, 0.0)
    return params.output == "adapter"


def _adapters(plan) -> list[OftAdapter]:
    if plan.vocabulary is not None:
        raise ConfigError("orthomerge: output: adapter keeps base_model's vocabulary; tokenizer_source / tokenizer: "
                          "need output: model")
    if plan.config.base_lora is not None:
        raise ConfigError("orthomerge: output: adapter writes an adapter for base_model itself; base_model "
                          "MODEL+ADAPTER has no such file to load it onto; use output: model")
    adapters = [e.adapter for e in plan.experts if isinstance(e, AdapterExpert) and e.kind == "oft"]
    if len(adapters) != len(plan.experts):
        raise ConfigError("orthomerge: output: adapter needs every model to be an OFT adapter (PEFT OFT folders); "
                          "use output: model for full fine-tunes and LoRA adapters")
    return adapters


def _claim(out_dir, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    present = [p for p in out_dir.iterdir() if p.name != ".streammerge"]
    if present and not overwrite:
        raise OutputError(f"{out_dir}: is not empty; choose a new folder or pass --overwrite to replace its adapter")
    for p in present:
        if p.name in ADAPTER_FILES:
            p.unlink()


def run_adapter_merge(plan, options):
    """Write the merged OFT adapter into ``plan.out_dir``; returns the engine's ``MergeResult``."""
    from .engine import MergeResult

    t0 = time.perf_counter()
    adapters = _adapters(plan)
    rotation = common_rotation_map(adapters)
    config = merged_adapter_config(adapters)
    rotated = sorted({name for a in adapters for name in a.modules})
    replaced = sorted({name for a in adapters for name in a.replacements})
    specs, sources = [], {}
    for name in rotated:
        src = oft_sources(adapters, name)
        a, m = src[0]
        meta = a.weights.meta(m.key)
        specs.append(TensorSpec(m.key, meta.dtype, tuple(meta.shape)))
        sources[m.key] = ("rotation", name, src)
    for name in replaced:
        have = [a for a in adapters if name in a.replacements]
        key = have[0].replacements[name]
        meta = have[0].weights.meta(key)
        specs.append(TensorSpec(key, meta.dtype, tuple(meta.shape)))
        sources[key] = ("replacement", name, have)
    num_layers = plan.num_layers
    _claim(plan.out_dir, options.overwrite or options.restart)
    lock = OutputLock(plan.out_dir).acquire()
    report = []
    try:
        with AdapterWriter(plan.out_dir, config, specs) as writer:
            for spec in specs:
                kind, name, src = sources[spec.name]
                if kind == "rotation":
                    p, _ = resolve_parameters(plan.config, name, layer_position(name, num_layers))
                    gens = [oft_generator(a.generator(name).to(options.device), m.block_size, rotation.coft_eps)
                            for a, m in src]
                    q_bar, cancelled = merge_generators(gens, p.norm_aggregate, p.direction_weighting)
                    if p.lambda_ != 1:  # as on the model path: the merged angle scaled
                        q_bar = q_bar * p.lambda_
                    if cancelled:
                        report.append(f"{name}: the adapters' generators cancel; identity rotation written")
                    writer.write(spec.name, q_bar.to(spec.dtype).cpu())
                else:
                    mean = torch.stack([a.replacement(name) for a in src]).mean(0)
                    writer.write(spec.name, mean.to(spec.dtype))
            writer.finish()
        write_model_card(plan.out_dir, plan.config.source, "orthomerge (output: adapter)",
                         [str(p) for p in plan.config.inputs])
    finally:
        lock.release()
    report.insert(0, f"OrthoMerge path: OFT rotations of {len(adapters)} adapters merged in the Lie algebra, "
                     f"written as one PEFT adapter ({len(rotated)} rotated modules)")
    nbytes = sum(s.nbytes for s in specs)
    return MergeResult(plan.out_dir, len(specs), nbytes, time.perf_counter() - t0, computed_tensors=len(specs),
                       report=report)
