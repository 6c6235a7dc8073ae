"""A training checkpoint as a diffusers LoRA folder with its model card, without resuming training.

    python export_checkpoint.py --checkpoint outputs/demo/checkpoint-10 --output_dir outputs/demo/lora-10

Reads CHECKPOINT/trainable.safetensors (the adapters in the checkpoint format of
checkpoints.save_checkpoint) and CHECKPOINT/config.json, writes OUTPUT_DIR/pytorch_lora_weights.safetensors
(what `pipe.load_lora_weights(OUTPUT_DIR)` reads: the adapter the trainer writes at the end of a run,
the trained one or, with eval_with_ema, its EMA, as the card says) and OUTPUT_DIR/README.md, whose
eval figures are those logged at THIS step in the run's metrics.jsonl (or it says no eval ran at that
step). No model is loaded: a 20B model's LoRA exports in seconds on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import checkpoints
import run_config
import run_logs


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a checkpoint folder, output_dir/checkpoint-N
    output_dir: str = ""  # where the LoRA and its card go; "" = RUN/lora-N next to the checkpoint
    overwrite_output: bool = False  # replace a LoRA already in output_dir (otherwise refused)
    preset: str = ""  # no presets: every value comes from the checkpoint


TRAINED_ADAPTER = ".default."  # peft's name of the trained adapter; the old policy's is ".old."
EMA_ADAPTER = ".ema."  # eval_with_ema: the EMA adapter, which the run evaluated and exports (policy.save_final)


def exported_adapter(config: dict) -> str:
    """The adapter the export holds: the EMA with eval_with_ema (what the run evaluated, what its
    final lora/ holds and what the card says: model_card.exported_weights_line), else the trained one."""
    return EMA_ADAPTER if config.get("eval_with_ema") else TRAINED_ADAPTER


def full_finetune_problem(checkpoint: str) -> str | None:
    """None for a LoRA checkpoint, else why there is nothing to export and what to do instead."""
    config = checkpoint_config(checkpoint)
    if config.get("train_mode", "lora") == "lora":
        return None
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    return (f"{checkpoint!r} is a full fine-tune (train_mode {config['train_mode']!r}): there is no LoRA to export; the "
            f"run's final weights are {os.path.join(run_dir, 'transformer')} (QwenImageTransformer2DModel.from_pretrained), "
            "written at the end of the run (resume it with --resume_from_checkpoint to write them)")


def checkpoint_config(checkpoint: str) -> dict:
    """The run config saved with the checkpoint (older checkpoints: the run folder's config.json)."""
    for path in (os.path.join(checkpoint, "config.json"), os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                                                         "config.json")):
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise run_config.InputError(f"checkpoint {checkpoint!r}: no config.json in it or in its run folder")


def checkpoint_lora(checkpoint: str) -> tuple[dict, dict, dict, int]:
    """-> (LoRA state in the layout save_lora_weights takes [module.lora_A.weight: tensor],
    adapter metadata, run config, step) of a LoRA checkpoint."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    import qwen_image as qi

    problem = checkpoints.checkpoint_problem(checkpoint)
    if problem:
        raise run_config.InputError(f"checkpoint {checkpoint!r} is not a complete checkpoint: {problem}")
    config = checkpoint_config(checkpoint)
    problem = full_finetune_problem(checkpoint)
    if problem:
        raise run_config.InputError(f"checkpoint {problem}")
    adapter = exported_adapter(config)
    with open(os.path.join(checkpoint, "train_state.json")) as f:
        step = json.load(f)["step"]
    saved = load_file(os.path.join(checkpoint, "trainable.safetensors"))
    # "transformer_blocks.0.attn.to_q.lora_A.default.weight" -> "transformer_blocks.0.attn.to_q.lora_A.weight",
    # the keys get_peft_model_state_dict gives (qwen_image.save_lora)
    state = {name.replace(adapter, "."): tensor.contiguous() for name, tensor in saved.items() if adapter in name}
    if not state:
        raise run_config.InputError(f"{os.path.join(checkpoint, 'trainable.safetensors')} holds no LoRA weights of "
                                    f"the adapter {adapter.strip('.')!r}")
    # the adapter config as qwen_image.save_lora writes it: the exact adapted modules, alpha
    metadata = LoraConfig(r=config["lora_rank"], lora_alpha=config["lora_alpha"],
                          init_lora_weights=qi.LORA_INITS[config.get("lora_init", "gaussian")],
                          target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in state})).to_dict()
    metadata.pop("exclude_modules", None)
    return state, metadata, config, step


def save_checkpoint_lora(checkpoint: str, output_dir: str) -> tuple[dict, int]:
    """Writes output_dir/pytorch_lora_weights.safetensors from the checkpoint; -> (run config, step)."""
    from diffusers import QwenImagePipeline

    state, metadata, config, step = checkpoint_lora(checkpoint)
    QwenImagePipeline.save_lora_weights(output_dir, transformer_lora_layers=state, safe_serialization=True,
                                        transformer_lora_adapter_metadata=metadata)
    return config, step


def is_checkpoint(path: str) -> bool:
    """A trainer checkpoint folder (trainable.safetensors) rather than an exported LoRA."""
    return os.path.isfile(os.path.join(path, "trainable.safetensors"))


def export(checkpoint: str, output_dir: str) -> str:
    """The LoRA and its model card (eval figures of the checkpoint's step) in output_dir."""
    import model_card

    os.makedirs(output_dir, exist_ok=True)
    config, step = save_checkpoint_lora(checkpoint, output_dir)
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    grid = os.path.join(run_dir, "samples", f"eval-{step:06d}.png")
    model_card.write_model_card(output_dir, config, run_logs.eval_history(run_dir), grid if os.path.exists(grid) else None,
                                kind="offline" if "pairs_path" in config else "online", step=step)
    return output_dir


def main(argv=None):
    config = run_config.parse_config(ExportConfig, {}, argv)
    run_config.require(bool(config.checkpoint), "checkpoint", "a checkpoint folder is required (--checkpoint RUN/checkpoint-N)")
    problem = checkpoints.checkpoint_problem(config.checkpoint)
    run_config.require(problem is None, "checkpoint", f"{config.checkpoint!r} is not a complete checkpoint: {problem}")
    full = full_finetune_problem(config.checkpoint)  # before output_dir exists: no empty folder is left
    run_config.require(full is None, "checkpoint", full or "")
    output_dir = config.output_dir or os.path.join(
        os.path.dirname(os.path.abspath(config.checkpoint)),
        "lora-" + os.path.basename(os.path.normpath(config.checkpoint)).removeprefix("checkpoint-"))
    if os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors")) and not config.overwrite_output:
        raise FileExistsError(f"output_dir {output_dir!r} already holds a LoRA: pass --overwrite_output true to "
                              "replace it, or choose another --output_dir")
    created = not os.path.exists(output_dir)
    run_config.require_writable_dir(output_dir, "output_dir", create=False)
    try:
        export(config.checkpoint, output_dir)
    except BaseException:
        if created:  # the folder is this export's own: nothing half-written is left
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    print(f"exported {config.checkpoint} -> {output_dir} (pytorch_lora_weights.safetensors, README.md)")
    return output_dir


if __name__ == "__main__":
    run_config.cli(main)  # a config or input error: one line on stderr, exit status 2
