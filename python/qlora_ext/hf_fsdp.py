"""transformers.Trainer with FSDP2 (accelerate) on a QLoRA model of this project.

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QloraExtConfig()), LoraConfig(...))
    model = prepare_for_fsdp2(model)           # before the Trainer shards it
    args = TrainingArguments(..., fsdp=True, fsdp_config={"version": 2,
                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    trainer = Trainer(model=model, args=args, ...)
    enable_fsdp2_on_cpu(trainer)               # CPU process groups only; a no-op on GPUs
    trainer.train()                            # under torchrun
    save_adapter_fsdp2(trainer, "out/adapter")  # not trainer.save_model (see below)

``prepare_for_fsdp2`` is ``qlora_ext.distributed.make_fsdp2_shardable``: the 4-bit layers'
quantization state becomes frozen uint8 parameters, so accelerate's ``fully_shard`` calls shard
it with the packed weights and its mixed-precision cast never reaches it (it casts floating
point only).

``enable_fsdp2_on_cpu`` works around one upstream gap: accelerate (1.15, ``AcceleratorState``
in accelerate/state.py) turns an ``fsdp_plugin`` into ``DistributedType.FSDP`` only for GPU-like
process groups (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...). On a CPU (gloo) group the distributed
type stays MULTI_CPU, the plugin is dropped without a word, and the Trainer silently trains
with DDP instead. FSDP2 itself runs on CPU meshes, so this sets the state accelerate would have
set on a GPU: the FSDP distributed type and the plugin built from the same TrainingArguments.

``save_adapter_fsdp2`` writes the PEFT adapter from the shards. ``Trainer.save_model`` under
FSDP2 asks accelerate for the model's full state dict (``get_model_state_dict``), which gathers
every frozen 4-bit weight to every rank only for PEFT to keep the adapter keys, and it cannot
run on our layers: a 4-bit layer's state_dict (bitsandbytes' keys, computed from the whole
quantization state) needs the whole weight, which only the layer's own FSDP forward gathers.
The adapter is what there is to save, so only it is gathered.
"""

from __future__ import annotations

from torch import nn


def prepare_for_fsdp2(model: nn.Module) -> nn.Module:
    """Make ``model``'s 4-bit layers shardable by the FSDP2 that accelerate applies (see the
    module docstring); in place, returns ``model``. Call it before the Trainer is built."""
    from .distributed import make_fsdp2_shardable

    return make_fsdp2_shardable(model)


def enable_fsdp2_on_cpu(trainer) -> None:
    """Let ``trainer`` (a transformers.Trainer whose TrainingArguments ask for FSDP version 2)
    train with FSDP2 on a CPU process group, where accelerate would fall back to DDP (the
    module docstring says why). Nothing to do when accelerate already chose FSDP (GPUs) or
    runs a single process. Call it right after building the Trainer, before ``train``."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = trainer.args.fsdp_plugin_args
    if not plugin_args or int(plugin_args.get("fsdp_version", 1)) != 2:
        raise ValueError(
            "enable_fsdp2_on_cpu: the trainer's TrainingArguments do not ask for FSDP2: pass "
            "fsdp=True and fsdp_config={'version': 2, ...}"
        )
    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # FSDP already (GPU process groups), or not distributed at all
    from accelerate.state import PartialState

    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    # As AcceleratorState.__init__ does: every later AcceleratorState() re-reads the process
    # state's copy, which would turn the run back into MULTI_CPU half-way.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def save_adapter_fsdp2(trainer, output_dir) -> None:
    """Write the trained PEFT adapter of ``trainer.model`` (sharded by FSDP2) to
    ``output_dir`` in PEFT's format, from rank 0. Every rank must call it: each trainable
    parameter is gathered in full (the adapters only; the frozen 4-bit weights stay sharded)."""
    from torch.distributed.tensor import DTensor

    model = trainer.model
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise ValueError("save_adapter_fsdp2: trainer.model is not a PEFT model")
    state = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    if trainer.is_world_process_zero():
        model.save_pretrained(output_dir, state_dict=state)
