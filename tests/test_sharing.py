"""Sharing a trained LoRA: the model card says what was trained and its snippet runs; evaluate.py,
export_checkpoint.py and generate.py on exported LoRAs and on checkpoint folders."""

import dataclasses
import os
import re

import pytest
import torch

import model_card
import train_online_dpo
from conftest import ROOT

TINY_PROMPTS = os.path.join(ROOT, "data", "tiny_prompts.txt")


def online_config(**overrides) -> dict:
    return dataclasses.asdict(train_online_dpo.Config()) | overrides


def card_of(tmp_path, config, evals=(), **kw) -> tuple[str, str]:
    folder = tmp_path / config.get("objective", "dpo")
    folder.mkdir(exist_ok=True)
    text = open(model_card.write_model_card(str(folder), config, list(evals), **kw)).read()
    return text.split("---")[1], text  # (YAML metadata, whole card)


EVALS = [{"step": 0, "eval/reward_mean": 0.25, "eval/reward_se": 0.01, "eval/images": 64.0},
         {"step": 20, "eval/reward_mean": 0.5, "eval/reward_se": 0.02, "eval/images": 64.0,
          "eval/reward_gain": 0.25, "eval/reward_gain_se": 0.015}]


def test_the_card_describes_the_objective_its_knobs_the_data_and_the_hub_base_model(tmp_path):
    metadata, card = card_of(tmp_path, online_config(eval_data=TINY_PROMPTS), EVALS)
    assert "base_model: Qwen/Qwen-Image" in metadata and "- diffusion-dpo" in metadata
    assert "Diffusion-DPO" in card and "Objective knobs: beta 100.0, pair_strategy best_worst, min_reward_margin 0.0." in card
    # a stabilising lever is named, with its setting, only when the run used it
    _, with_lever = card_of(tmp_path, online_config(eval_data=TINY_PROMPTS, ref_update_every=40, ref_update_alpha=0.6), EVALS)
    assert "min_reward_margin 0.0, ref_update_every 40, ref_update_alpha 0.6." in with_lever
    _, timesteps = card_of(tmp_path, online_config(eval_data=TINY_PROMPTS, train_timesteps=4), EVALS)
    assert "min_reward_margin 0.0, train_timesteps 4." in timesteps
    # the reference is called frozen only when it is
    assert "pushed below the frozen reference's" in card and "frozen" not in with_lever
    assert "a moving reference's (a LoRA moved 0.6 of the way to the policy every 40 optimizer steps, TR-DPO)" in with_lever
    assert "| before | 0 | 0.2500" in card and "| after | 20 | 0.5000" in card and "reward +0.2500 ± 0.015" in card
    assert "prompts `data/ocr/train.parquet`, 32 prompts x 16 samples per step" in card
    assert "TODO" not in card and "proofread" not in card  # nothing of diffusers' template left in
    first_prompt = open(TINY_PROMPTS).readline().strip()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'QwenImagePipeline.from_pretrained(\'Qwen/Qwen-Image\', dtype=dtype)' in snippet
    assert f"pipe({first_prompt!r}, height=512, width=512, num_inference_steps=50, true_cfg_scale=1.0" in snippet

    nft = online_config(objective="nft", eval_data=TINY_PROMPTS, pretrained=os.path.join(ROOT, "worlds", "text_world"))
    metadata, card = card_of(tmp_path, nft, EVALS)
    assert "- diffusion-nft" in metadata and "diffusion-dpo" not in metadata and "base_model" not in metadata
    assert "DiffusionNFT" in card and "Diffusion-DPO" not in card and "beta 100" not in card
    assert ('advantage_std global, drop_tied_groups False, sigma_scheme "", update_split "", train_timesteps 0, '
            "nft_beta 0.1, nft_adv_clip 5.0, nft_kl_weight 0.0001, nft_old_ema 75,0.0075,0.999" in card)
    assert "a local model at `worlds/text_world`" in card and "TODO" not in card

    import train_offline_dpo

    offline = dataclasses.asdict(train_offline_dpo.Config()) | dict(eval_data=TINY_PROMPTS, pretrained="tiny")
    folder = tmp_path / "offline"
    folder.mkdir()
    card = open(model_card.write_model_card(str(folder), offline, [], kind="offline")).read()
    assert "trained with offline Diffusion-DPO" in card and "Objective knobs: beta 2000.0." in card
    assert "preference pairs `data/pairs/pairs.parquet`, 32 pairs per step at 512x512" in card
    assert "qwen_image.load_pipeline('tiny', dtype=dtype, device=device)" in card


def test_a_checkpoint_card_reports_the_eval_of_its_own_step_or_says_there_is_none(tmp_path):
    evals = EVALS + [{"step": 40, "eval/reward_mean": 0.75, "eval/reward_se": 0.03, "eval/images": 64.0}]
    _, card = card_of(tmp_path, online_config(eval_data=TINY_PROMPTS), evals, step=20)
    assert "| after | 20 | 0.5000" in card and "0.7500" not in card and "for 20 steps" in card
    _, card = card_of(tmp_path, online_config(eval_data=TINY_PROMPTS), evals, step=30)
    assert "No evaluation was run at step 30" in card and "(evaluated steps: 0, 20, 40)" in card


def tiny_lora(tiny_dir, folder, seed=1):
    """A LoRA with non-zero weights on the tiny model, saved in the diffusers format."""
    import qwen_image as qi

    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    qi.add_lora(pipe.transformer, rank=4, alpha=4, target_modules=qi.TINY_LORA_TARGETS)
    generator = torch.Generator().manual_seed(seed)
    for name, p in pipe.transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    qi.save_lora(pipe.transformer, str(folder))
    return str(folder)


def test_the_card_snippet_runs_on_the_model_it_names(tmp_path, tiny_dir, monkeypatch):
    import qwen_image as qi

    lora = tiny_lora(tiny_dir, tmp_path / "lora")
    config = online_config(pretrained=tiny_dir, eval_data=TINY_PROMPTS, height=32, width=48, eval_inference_steps=2,
                           lora_rank=4, lora_alpha=4)
    model_card.write_model_card(lora, config, [])
    snippet = re.search(r"```python\n(.*?)```", open(os.path.join(lora, "README.md")).read(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "card-snippet", "exec"), {})  # exactly the card's lines
    image = __import__("PIL.Image").Image.open(tmp_path / "sample.png")
    assert image.size == (48, 32)
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    pipe.load_lora_weights(lora)
    expected = pipe(open(TINY_PROMPTS).readline().strip(), height=32, width=48, num_inference_steps=2,
                    generator=torch.Generator("cpu").manual_seed(0)).images[0]
    import numpy as np

    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB")))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step cpu_tiny run: evals at steps 0, 1, 2 (2 prompts x 4 samples), checkpoints at 1 and 2."""
    out = str(tmp_path_factory.mktemp("run") / "run")
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "2", "--eval_every", "1",
                           "--checkpoint_every", "1", "--max_eval_prompts", "2", "--sample_grid_every", "0"])
    return out


def read_rows(run):
    import json

    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def test_an_exported_checkpoint_loads_in_diffusers_reproduces_the_policy_and_its_card_has_its_step(tiny_run, tmp_path):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    import export_checkpoint
    import qwen_image as qi
    import qwen_image_rollout as qir
    import run_config
    from policy import Policy

    final = export_checkpoint.main(["--checkpoint", os.path.join(tiny_run, "checkpoint-2"),
                                    "--output_dir", str(tmp_path / "at2")])
    trained = load_file(os.path.join(tiny_run, "lora", "pytorch_lora_weights.safetensors"))
    exported = load_file(os.path.join(final, "pytorch_lora_weights.safetensors"))
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)

    out = export_checkpoint.main(["--checkpoint", os.path.join(tiny_run, "checkpoint-1")])
    assert out == os.path.join(tiny_run, "lora-1")
    # the checkpoint's policy, restored as a resume restores it
    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--preset", "cpu_tiny"])
    pipe = qi.load_pipeline("tiny", dtype=torch.float32)
    policy = Policy(config, pipe, Accelerator(cpu=True))
    assert policy.load_checkpoint(os.path.join(tiny_run, "checkpoint-1")) == 1
    settings = qir.RolloutSettings(height=64, width=64, num_inference_steps=4, chunk_size=4)
    prompts, seeds = ["a red square"] * 2, [3, 4]
    expected, _ = qir.rollout(pipe, qi.PromptCache(pipe, 64), prompts, seeds, settings, decode=False)
    fresh = qi.load_pipeline("tiny", dtype=torch.float32)
    fresh.load_lora_weights(out)  # diffusers' own loader
    got, _ = qir.rollout(fresh, qi.PromptCache(fresh, 64), prompts, seeds, settings, decode=False)
    base = qi.load_pipeline("tiny", dtype=torch.float32)
    untrained, _ = qir.rollout(base, qi.PromptCache(base, 64), prompts, seeds, settings, decode=False)
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, untrained, atol=1e-3)

    rows = {row["step"]: row for row in read_rows(tiny_run) if "eval/reward_mean" in row}
    card = open(os.path.join(out, "README.md")).read()
    assert f"| after | 1 | {rows[1]['eval/reward_mean']:.4f}" in card and f"| before | 0 | {rows[0]['eval/reward_mean']:.4f}" in card
    assert f"{rows[2]['eval/reward_mean']:.4f}" not in card and "for 1 steps" in card
    with pytest.raises(FileExistsError, match="--overwrite_output true"):
        export_checkpoint.main(["--checkpoint", os.path.join(tiny_run, "checkpoint-1")])


def test_evaluate_takes_a_checkpoint_or_the_exported_lora_and_prints_a_summary_with_a_progress_bar(tiny_run, tmp_path,
                                                                                                    capsys):
    import json

    import evaluate

    step2 = [row for row in read_rows(tiny_run) if row.get("step") == 2 and "eval/reward_mean" in row][0]
    step0 = [row for row in read_rows(tiny_run) if row.get("step") == 0 and "eval/reward_mean" in row][0]
    by = {}
    for name, lora in (("exported", os.path.join(tiny_run, "lora")), ("checkpoint", os.path.join(tiny_run, "checkpoint-2"))):
        out = str(tmp_path / name)
        by[name] = evaluate.main(["--run_dir", tiny_run, "--lora_dir", lora, "--output_dir", out])
        printed = capsys.readouterr()
        base, lora_row = by[name]["base"], by[name]["lora"]
        # the trainer's own evals of the base model (step 0) and of the step-2 weights
        assert base["scores"] == pytest.approx(step0["eval/rewards"], abs=1e-6)
        assert lora_row["scores"] == pytest.approx(step2["eval/rewards"], abs=1e-6)
        assert "evaluated 2 prompts x 4 samples = 8 images (reward brightness, 4 steps, 64x64)" in printed.out
        assert f"base  reward {base['reward_mean']:.4f} ± {base['reward_se']:.2g}" in printed.out
        assert f"LoRA  reward {lora_row['reward_mean']:.4f} ± {lora_row['reward_se']:.2g}" in printed.out
        assert (f"gain (LoRA - base, paired image by image): reward {lora_row['reward_gain']:+.4f} ± "
                f"{lora_row['reward_gain_se']:.2g}") in printed.out
        assert f"grid: {out}/grid.png" in printed.out and f"json: {out}/eval.json" in printed.out
        assert "sampling lora" in printed.err and "8/8" in printed.err  # the tqdm bar
        assert json.load(open(os.path.join(out, "eval.json")))["lora"]["reward_mean"] == lora_row["reward_mean"]
    assert by["checkpoint"]["lora"]["scores"] == by["exported"]["lora"]["scores"]
    with pytest.raises(ValueError, match="config field `lora_dir`: .* has neither pytorch_lora_weights"):
        evaluate.main(["--run_dir", tiny_run, "--lora_dir", str(tmp_path)])


def test_generate_draws_the_images_of_the_eval_sampler_and_a_lora_or_checkpoint_changes_them(tiny_run, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    import generate
    import qwen_image as qi
    import qwen_image_rollout as qir

    def pixels(folder):
        rows = json.load(open(os.path.join(folder, "images.json")))
        return [np.asarray(Image.open(os.path.join(folder, r["file"])).convert("RGB")) for r in rows], rows

    common = ["--pretrained", "tiny", "--prompt", "a red square", "--prompt", "a blue circle", "--samples_per_prompt", "2",
              "--height", "64", "--width", "64", "--num_inference_steps", "4", "--chunk_size", "4"]
    generate.main(common + ["--output_dir", str(tmp_path / "base")])
    base_images, rows = pixels(str(tmp_path / "base"))
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a red square", 0), ("a red square", 1),
                                                         ("a blue circle", 1000), ("a blue circle", 1001)]
    assert os.path.exists(tmp_path / "base" / "grid.png")
    # the same images as the eval's sampler (qwen_image_rollout.rollout, seeds i * 1000 + j)
    pipe = qi.load_pipeline("tiny", dtype=torch.float32)
    _, expected = qir.rollout(pipe, qi.PromptCache(pipe, 256), ["a red square"] * 2 + ["a blue circle"] * 2,
                             [0, 1, 1000, 1001], qir.RolloutSettings(height=64, width=64, num_inference_steps=4, chunk_size=4))
    assert all(np.array_equal(a, np.asarray(b.convert("RGB"))) for a, b in zip(base_images, expected))
    generate.main(common + ["--lora", os.path.join(tiny_run, "lora"), "--output_dir", str(tmp_path / "lora")])
    generate.main(common + ["--lora", os.path.join(tiny_run, "checkpoint-2"), "--output_dir", str(tmp_path / "ckpt")])
    lora_images, _ = pixels(str(tmp_path / "lora"))
    checkpoint_images, _ = pixels(str(tmp_path / "ckpt"))
    assert all(np.array_equal(a, b) for a, b in zip(lora_images, checkpoint_images))
    assert all(not np.array_equal(a, b) for a, b in zip(lora_images, base_images))
    generate.main(["--run_dir", tiny_run, "--prompt", "a red square", "--output_dir", str(tmp_path / "run")])
    from_run, _ = pixels(str(tmp_path / "run"))  # the run's model, resolution, eval steps and its LoRA
    assert np.array_equal(from_run[0], lora_images[0])
