"""What makes a run's LoRA folder shareable: a model card (README.md with YAML metadata, written the
way diffusers' training examples write it) and the upload to the Hugging Face Hub.

    write_model_card(lora_dir, config, evals, grid_path, kind)   -> lora_dir/README.md (+ eval_grid.png)
    push_to_hub(lora_dir, repo_id, token)                        -> the repo URL, or None with the reason printed
"""

from __future__ import annotations

import json
import os
import shutil

TAGS = ["text-to-image", "diffusers-training", "diffusers", "lora", "qwen-image", "diffusion-dpo", "template:sd-lora"]
SECRET_FIELDS = ("hub_token",)


def usage_snippet(base_model: str, lora: str) -> str:
    """The Python lines that load this LoRA into the base pipeline with diffusers."""
    if base_model in ("tiny", "tiny-bench"):  # the random CPU test model is built in code, not downloaded
        return (f'import qwen_image  # this repository\n\npipe = qwen_image.load_pipeline("{base_model}")\n'
                f'pipe.load_lora_weights("{lora}")\nimage = pipe("a red square", height=64, width=64, '
                f'num_inference_steps=4).images[0]')
    return (f'import torch\nfrom diffusers import QwenImagePipeline\n\n'
            f'pipe = QwenImagePipeline.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")\n'
            f'pipe.load_lora_weights("{lora}")\n'
            f'image = pipe("A neon sign that says \\"OPEN\\"", num_inference_steps=50).images[0]')


def _eval_table(evals: list[dict]) -> str:
    if not evals:
        return "No evaluation was run (eval_every = 0)."
    first, last = evals[0], evals[-1]
    lines = ["| | step | reward mean | standard error | images |", "|---|---|---|---|---|"]
    for label, row in (("before", first), ("after", last)) if len(evals) > 1 else (("final", last),):
        lines.append(f"| {label} | {row['step']} | {row['eval/reward_mean']:.4f} | {row.get('eval/reward_se', 0.0):.2g} "
                     f"| {int(row['eval/images'])} |")
    extra = sorted(k for k, v in last.items() if k.startswith("eval/") and isinstance(v, (int, float)) and "_gain" not in k
                   and k not in ("eval/reward_mean", "eval/reward_se", "eval/images", "eval/reward_std"))
    lines += [f"\n{k}: {first.get(k, float('nan')):.4f} -> {last[k]:.4f}" for k in extra]
    gains = [f"{k.removeprefix('eval/').removesuffix('_gain')} {last[k]:+.4f} ± {last[k + '_se']:.2g}"
             for k in ("eval/reward_gain", "eval/exact_match_gain") if k in last]
    if gains:
        lines.append(f"\nGain before -> after, paired image by image (same prompts and seeds): {', '.join(gains)}")
    return "\n".join(lines)


def exported_weights_line(config: dict) -> str:
    """Which weights the exported adapter holds: the trained LoRA, or its EMA (eval_with_ema)."""
    if config.get("eval_with_ema"):
        return (f"Weights: the EMA of the trained LoRA (eval_with_ema, decay min((1+k)/(10+k), "
                f"{config.get('eval_ema_decay')}) after optimizer step k); the evaluation below used it too.")
    return "Weights: the trained LoRA as of the last step (no EMA)."


def write_model_card(lora_dir: str, config: dict, evals: list[dict], grid_path: str | None = None,
                     kind: str = "online") -> str:
    """lora_dir/README.md: YAML metadata (base_model, library_name diffusers, license, tags, widget)
    through diffusers' load_or_create_model_card / populate_model_card, then what was trained, the
    eval before -> after, the last eval grid (copied next to the card as eval_grid.png), how to load
    it, and the training config (secrets removed). `evals`: the eval rows of metrics.jsonl."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    config = {k: ("<redacted>" if k in SECRET_FIELDS and v else v) for k, v in config.items()}
    base_model = config.get("pretrained", "Qwen/Qwen-Image")
    repo_id = config.get("hub_model_id") or ""
    widget = []
    if grid_path and os.path.exists(grid_path):
        shutil.copyfile(grid_path, os.path.join(lora_dir, "eval_grid.png"))
        widget = [{"text": f"eval grid at step {evals[-1]['step']}" if evals else "eval grid",
                   "output": {"url": "eval_grid.png"}}]
    description = f"""# Qwen-Image Diffusion-DPO LoRA{f': {repo_id}' if repo_id else ''}

LoRA (rank {config.get('lora_rank')}, alpha {config.get('lora_alpha')}) on `{base_model}`, trained with
{kind} Diffusion-DPO (Wallace et al., 2024, adapted to flow matching) for {config.get('max_steps')} steps,
beta {config.get('beta')}, reward `{config.get('reward')}`.

{exported_weights_line(config)}

## Evaluation

Eval prompts `{config.get('eval_data')}`, {config.get('eval_samples_per_prompt')} fixed-seed sample(s) per
prompt (seed = prompt index * 1000 + sample), {config.get('eval_inference_steps')} sampling steps,
{config.get('height')}x{config.get('width')}, reward `{config.get('reward')}`:

{_eval_table(evals)}
{chr(10) + '![last eval grid](eval_grid.png)' + chr(10) if widget else ''}
## Use with diffusers

```python
{usage_snippet(base_model, repo_id or os.path.abspath(lora_dir))}
```

## Training config

```json
{json.dumps(config, indent=1)}
```
"""
    card = None
    if repo_id:  # like diffusers' examples: an existing card on the Hub keeps its metadata
        try:
            card = load_or_create_model_card(repo_id, token=config.get("hub_token") or None, from_training=True,
                                             base_model=base_model, model_description=description,
                                             license="apache-2.0", widget=widget or None)
        except Exception as error:  # no network: the same card from the template, below
            print(f"model card: could not reach the Hub for {repo_id} ({type(error).__name__}); writing a new card")
    if card is None:
        from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH
        from huggingface_hub import ModelCard, ModelCardData

        card = ModelCard.from_template(
            card_data=ModelCardData(license="apache-2.0", library_name="diffusers", base_model=base_model,
                                    widget=widget or None),
            template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    card = populate_model_card(card, tags=TAGS)
    path = os.path.join(lora_dir, "README.md")
    card.save(path)
    return path


def push_to_hub(lora_dir: str, repo_id: str, token: str | None = None, commit_message: str = "Diffusion-DPO LoRA"):
    """Creates the model repo (if needed) and uploads lora_dir with huggingface_hub. Without a token
    (argument, $HF_TOKEN or `hf auth login`) or without network it prints why and returns None:
    the trained LoRA is already on disk."""
    from huggingface_hub import create_repo, get_token, upload_folder

    token = token or get_token()
    if not token:
        print(f"push_to_hub: no Hugging Face token (set HF_TOKEN, run `hf auth login` or pass --hub_token); "
              f"{lora_dir} was not uploaded")
        return None
    try:
        repo = create_repo(repo_id, token=token, exist_ok=True, repo_type="model")
        upload_folder(repo_id=repo.repo_id, folder_path=lora_dir, token=token, commit_message=commit_message)
    except Exception as error:  # network or permission: report, keep the local result
        print(f"push_to_hub: upload of {lora_dir} to {repo_id} failed ({type(error).__name__}: {error})")
        return None
    url = f"https://huggingface.co/{repo.repo_id}"
    print(f"pushed {lora_dir} to {url}")
    return url
