"""What makes a run's LoRA folder shareable: a model card (README.md with YAML metadata) that says
what was trained (objective and its knobs, data, reward, base model), the eval before -> after, and a
snippet that runs on the model it names; and the upload to the Hugging Face Hub.

    write_model_card(lora_dir, config, evals, grid_path, kind, step)  -> lora_dir/README.md (+ eval_grid.png)
    push_to_hub(lora_dir, repo_id, token)                              -> the repo URL, or None with the reason printed

The card is written from this module's own text, not diffusers' training template (whose "TODO"
sections would be published as they are: diffusers/utils/model_card_template.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))
TAGS = ["text-to-image", "diffusers-training", "diffusers", "lora", "qwen-image"]
SECRET_FIELDS = ("hub_token",)

# One entry per training objective (the trainers' `--objective`; the offline trainer is "dpo"): its
# name on the card, one sentence on what the update does, and its Hub tags. Its knobs are the
# objective's own (objectives.OBJECTIVES[name].knobs), read from the run's config.
OBJECTIVE_CARDS = {
    "dpo": dict(title="Diffusion-DPO", tags=["diffusion-dpo", "dpo"],
                method="Diffusion-DPO (Wallace et al., 2024) adapted to flow matching: per prompt, a chosen and a "
                       "rejected image; the policy's velocity error on the chosen one is pushed below {reference}, "
                       "and the reverse on the rejected one"),
    "dgpo": dict(title="DGPO", tags=["dgpo", "group-preference-optimization"],
                 method="DGPO: every sample of a prompt group, weighted by its reward advantage within the group, "
                        "in one DPO-style sigmoid per group against the frozen reference"),
    "nft": dict(title="DiffusionNFT", tags=["diffusion-nft"],
                method="DiffusionNFT: every sample regressed through implicit positive and negative policies built "
                       "from the trained and an old (EMA) policy, weighted by its reward advantage"),
    "awm": dict(title="AWM", tags=["awm", "advantage-weighted-matching"],
                method="AWM (advantage-weighted matching): flow-matching likelihood ratios to an old (EMA) policy, "
                       "PPO-clipped and weighted by each sample's reward advantage"),
    "grpo": dict(title="Flow-GRPO", tags=["flow-grpo", "grpo"],
                 method="Flow-GRPO: SDE rollouts whose recorded transitions' log-probabilities are pushed up or down "
                        "by each sample's group-relative reward advantage (PPO clip, KL to the frozen reference)"),
}


def objective_card(config: dict) -> dict:
    """{name, title, method, tags, knobs} of the run's objective (an unknown one: its name, its
    `<name>_*` fields)."""
    name = config.get("objective", "dpo")
    entry = OBJECTIVE_CARDS.get(name, dict(title=name, tags=[name], method=f"the `{name}` objective"))
    try:
        from objectives import OBJECTIVES

        knobs = OBJECTIVES[name].knobs
    except (ImportError, KeyError):
        knobs = tuple(k for k in config if k.startswith(f"{name}_"))
    if name == "dpo" and config.get("reverse_preference"):
        knobs = (*knobs, "reverse_preference")
    if name == "dpo":  # the reference is called frozen only when it is
        every = config.get("ref_update_every", 0)
        reference = (f"a moving reference's (a LoRA moved {config.get('ref_update_alpha', 1.0):g} of the way to the policy "
                     f"every {every} optimizer steps, TR-DPO)" if every > 0 else "the frozen reference's")
        entry = dict(entry, method=entry["method"].format(reference=reference))
    shown = [k for k in knobs if k in config and not (name == "dpo" and lever_off(k, config))]
    return dict(entry, name=name, knobs=shown)


# DPO's stabilising levers (dpo_update.validate_dpo_levers), its timesteps per pair, and the values that leave
# them off: a card names a lever (and its setting) only when the run used it
LEVERS_OFF = {"update_split": ("", "all"), "pair_weighting": ("none",), "chosen_sft_weight": (0,),
              "winner_preserving": (False,), "ref_update_every": (0,), "norm_guard_weight": (0,),
              "train_timesteps": (0, 1)}
LEVER_SETTINGS = {"winner_preserving_mu": "winner_preserving", "ref_update_alpha": "ref_update_every",
                  "norm_guard_tolerance": "norm_guard_weight"}


def lever_off(knob: str, config: dict) -> bool:
    lever = LEVER_SETTINGS.get(knob, knob)
    return lever in LEVERS_OFF and lever in config and config[lever] in LEVERS_OFF[lever]


def is_hub_id(pretrained: str) -> bool:
    """`owner/name` that is not a local folder: a model on the Hub."""
    return not os.path.exists(pretrained) and re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained) is not None


def describe_base_model(pretrained: str) -> str:
    if pretrained in ("tiny", "tiny-bench"):
        return f"the random tiny Qwen-Image built in code by this repository's qwen_image.py (`{pretrained}`), " \
               "not a published model"
    if is_hub_id(pretrained):
        return f"[`{pretrained}`](https://huggingface.co/{pretrained})"
    path = os.path.abspath(pretrained)
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else pretrained
    return f"a local model at `{shown}` (a save_pretrained folder, not on the Hub)"


def first_eval_prompt(config: dict) -> str:
    """The first eval prompt: one the model was evaluated on, so it can draw it."""
    try:
        from prompt_data import load_prompts

        return load_prompts(config["eval_data"], split="test", max_rows=1)[0]["prompt"]
    except Exception:  # the eval file moved since training: a generic prompt
        return 'A sign that says "OPEN"'


def usage_snippet(config: dict, lora: str) -> str:
    """Python lines that load the base model named in `config`, this LoRA, and draw the first eval
    prompt at the run's resolution, eval sampling steps and CFG (bfloat16 on CUDA, else float32 on CPU)."""
    pretrained = config.get("pretrained", "Qwen/Qwen-Image")
    lines = ["import torch"]
    if pretrained in ("tiny", "tiny-bench"):  # built in code: this repository's qwen_image.py
        lines += ["", "import qwen_image  # this repository", ""]
        load = f"pipe = qwen_image.load_pipeline({pretrained!r}, dtype=dtype, device=device)"
    else:
        lines += ["from diffusers import QwenImagePipeline", ""]
        where = pretrained if is_hub_id(pretrained) else os.path.abspath(pretrained)
        load = f"pipe = QwenImagePipeline.from_pretrained({where!r}, dtype=dtype).to(device)"
    cfg = float(config.get("true_cfg_scale", 1.0))
    negative = f", negative_prompt={config.get('negative_prompt', ' ')!r}" if cfg > 1 else ""
    lines += ['device = "cuda" if torch.cuda.is_available() else "cpu"',
              'dtype = torch.bfloat16 if device == "cuda" else torch.float32',
              load,
              f"pipe.load_lora_weights({lora!r})",
              f"image = pipe({first_eval_prompt(config)!r}, height={config.get('height', 512)}, "
              f"width={config.get('width', 512)}, num_inference_steps={config.get('eval_inference_steps', 50)}, "
              f"true_cfg_scale={cfg}{negative}, generator=torch.Generator('cpu').manual_seed(0)).images[0]",
              'image.save("sample.png")']
    return "\n".join(lines)


def _eval_table(evals: list[dict]) -> str:
    first, last = evals[0], evals[-1]
    lines = ["| | step | reward mean | standard error | images |", "|---|---|---|---|---|"]
    for label, row in (("before", first), ("after", last)) if len(evals) > 1 else (("final", last),):
        lines.append(f"| {label} | {row['step']} | {row['eval/reward_mean']:.4f} | {row.get('eval/reward_se', 0.0):.2g} "
                     f"| {int(row['eval/images'])} |")
    extra = sorted(k for k, v in last.items() if k.startswith("eval/") and isinstance(v, (int, float)) and "_gain" not in k
                   and k not in ("eval/reward_mean", "eval/reward_se", "eval/images", "eval/reward_std")
                   and not k.endswith("_se"))
    lines += [f"\n{k.removeprefix('eval/')}: {first.get(k, float('nan')):.4f} -> {last[k]:.4f}" for k in extra]
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


def eval_section(evals: list[dict], step: int | None) -> str:
    """The eval table for the weights of `step` (None: the last eval is the weights')."""
    if step is not None:
        at_step = [row for row in evals if row["step"] == step]
        if not at_step:
            done = ", ".join(str(row["step"]) for row in evals) or "none"
            return (f"No evaluation was run at step {step}, the step these weights are from "
                    f"(evaluated steps: {done}).")
        evals = [row for row in evals if row["step"] < step][:1] + at_step[-1:]
    if not evals:
        return "No evaluation was run (eval_every = 0)."
    return _eval_table(evals)


def _training_data(config: dict, kind: str) -> str:
    if kind == "offline":
        return (f"preference pairs `{config.get('pairs_path')}`"
                + (f" (first {config['max_pairs']})" if config.get("max_pairs") else "")
                + f", {config.get('pairs_per_step')} pairs per step at {config.get('height')}x{config.get('width')}")
    return (f"prompts `{config.get('train_data')}`, {config.get('prompts_per_step')} prompts x "
            f"{config.get('samples_per_prompt')} samples per step, sampled with the policy itself at "
            f"{config.get('height')}x{config.get('width')}, {config.get('num_inference_steps')} steps, "
            f"true_cfg_scale {config.get('true_cfg_scale')}, scored by reward `{config.get('reward')}`")


def write_model_card(lora_dir: str, config: dict, evals: list[dict], grid_path: str | None = None,
                     kind: str = "online", step: int | None = None) -> str:
    """lora_dir/README.md: YAML metadata (base_model when it is on the Hub, library_name diffusers,
    license, the objective's tags, widget), what was trained (objective, its knobs, data, reward,
    LoRA), the eval before -> after, the eval grid (copied next to the card as eval_grid.png), a
    snippet that loads it, and the training config (secrets removed). `evals`: the eval rows of
    metrics.jsonl; `step`: the training step of these weights (an exported checkpoint), None for
    the end of the run."""
    from huggingface_hub import ModelCard, ModelCardData

    config = {k: ("<redacted>" if k in SECRET_FIELDS and v else v) for k, v in config.items()}
    base_model = config.get("pretrained", "Qwen/Qwen-Image")
    objective = objective_card(config)
    repo_id = config.get("hub_model_id") or ""
    steps = step if step is not None else config.get("max_steps")
    shown = [row for row in evals if step is None or row["step"] <= step]
    widget = []
    if grid_path and os.path.exists(grid_path):
        shutil.copyfile(grid_path, os.path.join(lora_dir, "eval_grid.png"))
        widget = [{"text": f"eval grid at step {shown[-1]['step']}" if shown else "eval grid",
                   "output": {"url": "eval_grid.png"}}]
    knobs = ", ".join(f"{k} {config[k] if config[k] != '' else chr(34) * 2}" for k in objective["knobs"]) or "none"
    title = f"# Qwen-Image {objective['title']} LoRA{f': {repo_id}' if repo_id else ''}"
    text = f"""{title}

LoRA (rank {config.get('lora_rank')}, alpha {config.get('lora_alpha')}, on `{config.get('lora_targets')}`) for
{describe_base_model(base_model)}, trained with {kind} {objective['title']} (`{objective['name']}`) for {steps} steps.

- Objective: {objective['method']}.
- Objective knobs: {knobs}.
- Training data: {_training_data(config, kind)}.
- Optimiser: AdamW, learning rate {config.get('learning_rate')}, weight decay {config.get('weight_decay')}, seed {config.get('seed')}.

{exported_weights_line(config)}

## Evaluation

Eval prompts `{config.get('eval_data')}`, {config.get('eval_samples_per_prompt')} fixed-seed sample(s) per
prompt (seed = prompt index * 1000 + sample), {config.get('eval_inference_steps')} sampling steps,
{config.get('height')}x{config.get('width')}, reward `{config.get('reward')}`:

{eval_section(evals, step)}
{chr(10) + '![eval grid](eval_grid.png)' + chr(10) if widget else ''}
## Use with diffusers

```python
{usage_snippet(config, repo_id or os.path.abspath(lora_dir))}
```

## Training config

```json
{json.dumps(config, indent=1)}
```
"""
    data = ModelCardData(license="apache-2.0", library_name="diffusers", tags=TAGS + objective["tags"],
                         base_model=base_model if is_hub_id(base_model) else None, widget=widget or None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
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
