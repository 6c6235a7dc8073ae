"""The shipped text world (worlds/text_world, built by build_text_world.py) with the real PP-OCRv5
reward: it loads as a user's --pretrained directory and renders what its README states before DPO.
(A two-sided learning test on the world is still missing: no DPO recipe tried so far raises its eval
exact match; see the README, "The text world".)"""

import torch

import qwen_image
import trainer_utils as tu

# Measured on this machine (torch 2.13 CPU) with the text_world preset's eval: eval.txt x 4 fixed
# seeds (i*1000+j), 8 sampling steps, 32x64. Rendering is deterministic on a fixed thread count;
# the tolerance allows a few images to flip under other BLAS kernels.
STATED_EXACT_MATCH = 0.3646  # 35 of 96 images
STATED_REWARD_MEAN = 0.6528


def test_world_loads_and_renders_its_stated_quality():
    from accelerate import Accelerator

    from rewards import build_reward
    from train_online_dpo import PRESETS, Config

    config = Config(**{**Config().__dict__, **PRESETS["text_world"]})
    pipe = qwen_image.load_pipeline(tu.TEXT_WORLD, dtype=torch.float32)
    assert pipe.vae.config.latents_mean != [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
    rows = tu.load_prompts(config.eval_data, need_ocr_target=True)
    cache = qwen_image.PromptCache(pipe, config.max_sequence_length)
    settings = tu.rollout_settings(config, config.eval_inference_steps)
    metrics, images, _ = tu.evaluate(pipe, cache, rows, build_reward("ocr"), settings, config.eval_samples_per_prompt,
                                     Accelerator(cpu=True), exact_match=True)
    assert images[0].size == (config.width, config.height)
    assert metrics["eval/images"] == len(rows) * config.eval_samples_per_prompt
    assert abs(metrics["eval/exact_match"] - STATED_EXACT_MATCH) <= 0.03, metrics
    assert abs(metrics["eval/reward_mean"] - STATED_REWARD_MEAN) <= 0.02, metrics
