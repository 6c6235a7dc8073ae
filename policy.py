"""The trained policy and its updates.

`Policy`: the transformer with its LoRA (or all its weights), the frozen reference, optionally an
"old" policy (a second LoRA adapter on the same transformer), the optimizer and LR schedule; the
velocity predictions of all three; one guarded optimizer step (non-finite loss or gradient: skipped
and counted); checkpoints (the old adapter included) and the final export (the trained adapter
only, in the diffusers format).

The DPO update (`dpo_update`, `validate_dpo_levers`) lives in dpo_update.py; the online trainer's
group-wise objectives (DGPO, DiffusionNFT, AWM) live in objectives.py and use the same pieces.
"""

from __future__ import annotations

import contextlib
import os

import torch

from checkpoints import assert_finite, load_checkpoint, save_checkpoint, state_dict_options
from distributed import all_sum, gather_object
from run_config import config_dict

OLD_ADAPTER = "old"  # the name of the "old" / EMA policy's LoRA adapter; the trained one is peft's "default"
EMA_ADAPTER = "ema"  # eval_with_ema: the evaluation / export EMA of the trained adapter (not the old policy)
REF_ADAPTER = "moving_ref"  # ref_update_every > 0: DPO's moving reference, a LoRA adapter (TR-DPO)


class TrainingStopped(FloatingPointError):
    """The run stopped because it trains nothing usable (non-finite rollouts, or too many steps in a
    row without an optimizer step); no final weights are written. The CLI prints it as one line."""


class Policy:
    """Reads these config fields: dtype, train_mode, lora_rank, lora_alpha, lora_targets, lora_init,
    gradient_checkpointing, sharding, learning_rate, adam_beta1, adam_beta2, weight_decay,
    adam_epsilon, lr_warmup_steps, max_grad_norm, max_nonfinite_in_a_row, height, width, seed,
    ref_update_every / ref_update_alpha when present (DPO's moving reference: a LoRA adapter) (and
    dpo_update's: beta, sigma_scheme, logit_mean, logit_std, micro_batch_pairs and the levers).

    old_adapter: add a second LoRA adapter, a copy of the trained one at the start, that
    `update_old` moves towards the trained weights (an EMA); only with train_mode "lora".
    """

    def __init__(self, config, pipe, accelerator, old_adapter: bool = False):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        import qwen_image as qi

        self.config, self.accelerator = config, accelerator
        self.dtype = getattr(torch, config.dtype)
        self.transformer = transformer = pipe.transformer
        self.scheduler, self.vae_scale_factor = pipe.scheduler, pipe.vae_scale_factor  # sampler_sigmas
        self.reference = None
        self.has_old = old_adapter
        self.has_ema = bool(getattr(config, "eval_with_ema", False))
        # TR-DPO's moving reference: its own adapter, equal to the trained one's start (zero delta with
        # B = 0), so the first steps match the "adapters disabled" reference exactly
        self.ref_update_every = int(getattr(config, "ref_update_every", 0))
        self.has_moving_ref = self.ref_update_every > 0
        if config.train_mode == "lora":
            qi.add_lora(transformer, config.lora_rank, config.lora_alpha, config.lora_targets.split(","),
                        config.lora_init)
            if old_adapter:
                add_old_adapter(transformer)
            if self.has_ema:
                add_old_adapter(transformer, EMA_ADAPTER)
            if self.has_moving_ref:
                add_old_adapter(transformer, REF_ADAPTER)
        else:
            if old_adapter or self.has_ema or self.has_moving_ref:
                raise ValueError("an old-policy, EMA or moving-reference adapter needs train_mode 'lora'")
            # Policy and reference must compute in the same precision, or the DPO margin is not 0 at
            # step 0: both are fp32 copies of the same weights (a bf16 frozen copy next to an fp32
            # policy would not be). --dtype then applies to the text encoder and VAE only.
            transformer.to(torch.float32)
            self.reference = qi.make_frozen_reference(transformer)
            transformer.requires_grad_(True)
            for name in qi.dead_text_stream_modules(transformer):  # never reach the output: freeze
                transformer.get_submodule(name).requires_grad_(False)
        cast_training_params(transformer, dtype=torch.float32)  # fp32 trainable weights and AdamW state
        qi.set_gradient_checkpointing(transformer, config.gradient_checkpointing)
        if config.sharding == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in transformer.transformer_blocks:
                fully_shard(block)
            fully_shard(transformer)
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        # (trained, old) parameter pairs, matched by name: the EMA update and the checkpoint use them
        named = dict(transformer.named_parameters())
        self.old_pairs = [(named[n.replace(f".{OLD_ADAPTER}.", ".default.")], p) for n, p in named.items()
                          if f".{OLD_ADAPTER}." in n] if old_adapter else []
        self.ema_pairs = [(named[n.replace(f".{EMA_ADAPTER}.", ".default.")], p) for n, p in named.items()
                          if f".{EMA_ADAPTER}." in n] if self.has_ema else []
        self.ref_pairs = [(named[n.replace(f".{REF_ADAPTER}.", ".default.")], p) for n, p in named.items()
                          if f".{REF_ADAPTER}." in n] if self.has_moving_ref else []
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.weight_decay, eps=config.adam_epsilon)
        # Not prepared: accelerate's scheduler wrapper steps once per process per optimizer step, which
        # would run the warm-up num_processes times too fast. One step per optimizer step here.
        self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps)
        if config.sharding == "fsdp2":  # FSDP2 reduces gradients itself
            self.model = transformer
            self.optimizer = accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = accelerator.prepare(transformer, optimizer)
        transformer.train()
        self.nonfinite_in_a_row = 0  # updates (and online steps with non-finite rollouts) in a row
        self.degenerate_in_a_row = 0  # online steps in a row that took no optimizer step (note_step)
        self.rollouts_nonfinite = False  # the current weights' last rollouts held NaN / inf: never export them
        self.step_nonfinite = False  # this step's rollout latents or rewards were non-finite (check_rollouts)

    # -- predictions: x0 [B, S, 64] clean latents, noise like x0, sigmas [B], then `conditioning`'s
    # (embeds [B, L, D], mask [B, L], negative)
    def _velocity(self, module, x0, noise, sigmas, embeds, mask, negative=None):
        """negative: (embeds, mask) of the negative prompt when true_cfg_scale > 1: the prediction is
        then the sampler's norm-rescaled CFG combination, as in the rollout."""
        from dpo_loss import noisy_latents

        return self._velocity_at(module, noisy_latents(x0, noise, sigmas), sigmas, embeds, mask, negative)

    def _velocity_at(self, module, latents, sigmas, embeds, mask, negative=None):
        """The prediction at given noisy latents x_sigma [B, S, 64] (Flow-GRPO's recorded states)."""
        import qwen_image as qi

        cfg = {}
        if negative is not None:
            cfg = dict(negative_prompt_embeds=negative[0], negative_prompt_mask=negative[1],
                       true_cfg_scale=self.config.true_cfg_scale)
        return qi.predict_velocity(module, latents, sigmas, embeds, mask, self.config.height, self.config.width, **cfg)

    def conditioning(self, prompt_cache, prompts: list[str], device) -> tuple:
        """(embeds, mask, negative) of the prompts for the predictions below; negative is the negative
        prompt's (embeds, mask) when true_cfg_scale > 1 (train on what the CFG sampler computes)."""
        embeds, mask = prompt_cache(prompts, device=device, dtype=self.dtype)
        negative = None
        if self.config.true_cfg_scale > 1:
            negative = prompt_cache([self.config.negative_prompt] * len(prompts), device=device, dtype=self.dtype)
        return embeds, mask, negative

    def velocity(self, *args):
        """The trained policy, with gradient (through the DDP / FSDP module)."""
        return self._velocity(self.model, *args)

    def reference_velocity(self, *args):
        """The frozen reference: LoRA adapters disabled, or the frozen copy in full mode, or the moving
        reference's adapter (ref_update_every > 0)."""
        import qwen_image as qi

        with torch.no_grad():
            if self.reference is not None:
                return self._velocity(self.reference, *args)
            if self.has_moving_ref:
                with adapter_active(self.transformer, REF_ADAPTER):
                    return self._velocity(self.transformer, *args)
            with qi.lora_disabled(self.transformer):
                return self._velocity(self.transformer, *args)

    def velocity_at(self, *args):
        """The trained policy at given noisy latents (latents, sigmas, embeds, mask, negative), with gradient."""
        return self._velocity_at(self.model, *args)

    def reference_velocity_at(self, *args):
        """The frozen reference at given noisy latents (no gradient)."""
        import qwen_image as qi

        with torch.no_grad():
            if self.reference is not None:
                return self._velocity_at(self.reference, *args)
            if self.has_moving_ref:
                with adapter_active(self.transformer, REF_ADAPTER):
                    return self._velocity_at(self.transformer, *args)
            with qi.lora_disabled(self.transformer):
                return self._velocity_at(self.transformer, *args)

    def old_velocity(self, *args):
        """The old policy: the same transformer with the old adapter active."""
        with torch.no_grad(), adapter_active(self.transformer, OLD_ADAPTER):
            return self._velocity(self.transformer, *args)

    def sampling_with_old(self):
        """Context: the pipeline samples with the old adapter (DiffusionNFT's behaviour policy)."""
        return adapter_active(self.transformer, OLD_ADAPTER)

    def no_sync(self, sync: bool):
        """Gradient accumulation: reduce across ranks only on the last micro-batch."""
        if self.accelerator.num_processes == 1 or sync:
            return contextlib.nullcontext()
        if self.config.sharding == "fsdp2":
            @contextlib.contextmanager
            def fsdp_no_sync():
                self.model.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    self.model.set_requires_gradient_sync(True)
            return fsdp_no_sync()
        return self.accelerator.no_sync(self.model)

    # -- one optimizer step
    def optimizer_step(self, loss_is_finite: bool, step: int, metrics: dict) -> bool:
        """After the micro-batches' backward passes: one optimizer step, or, when the loss or any
        gradient is non-finite on any rank, no step (gradients dropped, counted in metrics; too many
        in a row raise). Returns whether it stepped."""
        config, accelerator = self.config, self.accelerator
        local_bad = float(not loss_is_finite or any(
            p.grad is not None and not torch.isfinite(p.grad).all() for p in self.params))
        if all_sum(accelerator, local_bad)[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            metrics["update/nonfinite_skipped"] = metrics.get("update/nonfinite_skipped", 0) + 1
            accelerator.print(f"step {step}: non-finite loss or gradient, update skipped "
                              f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
                raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite updates in a row "
                                         "(max_nonfinite_in_a_row); stopping")
            return False
        self.nonfinite_in_a_row = 0
        grad_norm = accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.has_ema:
            self.update_ema()
        if self.has_moving_ref and self.optimizer_steps % self.ref_update_every == 0:
            self.update_reference(self.config.ref_update_alpha)
        # finite gradients can still give non-finite weights (e.g. Adam dividing 0 by 0): stop
        # before they make NaN images, tied rewards and a NaN LoRA
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        finite = bool(torch.stack([torch.isfinite(p).all() for p in local]).all())  # one device sync
        if all_sum(accelerator, float(not finite))[0] > 0:
            raise FloatingPointError(f"step {step}: trainable weights are non-finite after an optimizer update "
                                     "(check learning_rate, adam_epsilon, adam_beta*); stopping, nothing saved")
        metrics["update/grad_norm"] = float(grad_norm)
        return True

    # -- the online trainer's guards around a step: its rollouts, and whether it trained anything
    def check_rollouts(self, latents: torch.Tensor, rewards: torch.Tensor, step: int, metrics: dict) -> bool:
        """Right after the rollout and its rewards: False when any rank's latents or rewards hold NaN
        or inf (all ranks agree). Such a step must not update (its pairs or advantages are
        meaningless) and counts towards max_nonfinite_in_a_row; non-finite latents also mark the
        current weights as not exportable (save_final) until an optimizer step changes them. A
        finite-weight policy can still sample NaN (e.g. a huge learning rate: weights of 1e30)."""
        bad_latents, bad_rewards = all_sum(self.accelerator, float(not bool(torch.isfinite(latents).all())),
                                           float(not bool(torch.isfinite(rewards).all())))
        self.rollouts_nonfinite = bad_latents > 0
        self.step_nonfinite = bool(bad_latents or bad_rewards)
        if not self.step_nonfinite:
            return True
        self.nonfinite_in_a_row += 1
        what = "rollout latents" if bad_latents else "rewards"
        metrics["update/skipped_nonfinite_rollouts"] = 1.0
        self.accelerator.print(f"step {step}: non-finite {what}, update skipped ({self.nonfinite_in_a_row} "
                               "non-finite in a row)")
        return False

    def note_step(self, optimizer_steps_before: int, metrics: dict):
        """After a step's update: a step that took no optimizer step (no pairs, every group tied,
        every update non-finite, non-finite rollouts) is degenerate; counted in a row (reset by a
        step that trained) and logged as update/degenerate_in_a_row."""
        trained = self.optimizer_steps > optimizer_steps_before  # the same on every rank (agreed skips)
        self.degenerate_in_a_row = 0 if trained else self.degenerate_in_a_row + 1
        metrics["update/degenerate_in_a_row"] = float(self.degenerate_in_a_row)

    def stop_if_degenerate(self, step: int):
        """After the step is logged: raise TrainingStopped when this step's non-finite rollouts
        brought the non-finite count to max_nonfinite_in_a_row (non-finite updates raise in
        optimizer_step), or the degenerate steps in a row reached max_degenerate_steps_in_a_row
        (0: never)."""
        config = self.config
        if self.step_nonfinite and self.nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
            raise TrainingStopped(f"step {step}: {self.nonfinite_in_a_row} non-finite updates or rollouts in a row, "
                                  "the last one this step's rollouts (max_nonfinite_in_a_row); stopping, no final weights written "
                                  "(check learning_rate)")
        limit = getattr(config, "max_degenerate_steps_in_a_row", 0)
        if limit and self.degenerate_in_a_row >= limit:
            raise TrainingStopped(f"step {step}: {self.degenerate_in_a_row} steps in a row trained nothing (no pairs, "
                                  "every group tied, or every update / rollout non-finite; "
                                  "max_degenerate_steps_in_a_row); stopping, no final weights written")

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far (skipped non-finite updates not counted): the LR scheduler's
        step count, so a checkpoint restores it. The old adapter's EMA decay is a function of it."""
        return int(self.lr_scheduler.last_epoch)

    def sampler_sigmas(self) -> torch.Tensor:
        """[num_inference_steps]: the sigmas the rollout's sampler steps through (qwen_image_rollout.sampler_sigmas)."""
        import qwen_image_rollout as qir

        return qir.sampler_sigmas(self.scheduler, self.config.num_inference_steps, self.config.height, self.config.width,
                                 self.vae_scale_factor)

    def ema_decay(self) -> float:
        """The eval EMA's decay after the current optimizer step k (k = optimizer_steps): the official
        EMAModuleWrapper's min((1 + k) / (10 + k), eval_ema_decay) (flow_grpo/ema.py, stepped after
        each optimizer step with the incremented global_step in scripts/train_nft_sd3.py)."""
        k = self.optimizer_steps
        return min((1 + k) / (10 + k), self.config.eval_ema_decay)

    @torch.no_grad()
    def update_ema(self):
        decay = self.ema_decay()
        for trained, ema in self.ema_pairs:
            ema.mul_(decay).add_(trained.detach(), alpha=1.0 - decay)

    @torch.no_grad()
    def update_reference(self, alpha: float):
        """TR-DPO's soft update (Gorbatovski et al., arXiv 2404.09656): ref <- alpha * trained +
        (1 - alpha) * ref, on the LoRA weights (alpha 1: a hard copy, flow_grpo's ref_update_step)."""
        for trained, ref in self.ref_pairs:
            ref.mul_(1.0 - alpha).add_(trained.detach(), alpha=alpha)

    def sampling_with_ema(self):
        """Context: the pipeline samples with the eval EMA adapter (eval_with_ema)."""
        return adapter_active(self.transformer, EMA_ADAPTER)

    @torch.no_grad()
    def update_old(self, decay: float):
        """old <- decay * old + (1 - decay) * trained (elementwise, on each rank's shard)."""
        for trained, old in self.old_pairs:
            old.mul_(decay).add_(trained.detach(), alpha=1.0 - decay)

    # -- state: the trained weights, and the old adapter when there is one
    def _also_frozen(self) -> tuple[str, ...]:
        return ((f".{OLD_ADAPTER}.",) if self.has_old else ()) + ((f".{EMA_ADAPTER}.",) if self.has_ema else ()) \
            + ((f".{REF_ADAPTER}.",) if self.has_moving_ref else ())

    def save_checkpoint(self, output_dir: str, step: int, limit: int | None):
        if self.rollouts_nonfinite:  # weights that sample NaN: a checkpoint would only rotate good ones out
            self.accelerator.print(f"step {step}: checkpoint NOT written: the policy's last rollouts were non-finite")
            return None
        return save_checkpoint(output_dir, step, self.model, self.optimizer, self.lr_scheduler,
                               {"nonfinite_in_a_row": self.nonfinite_in_a_row,
                                "degenerate_in_a_row": self.degenerate_in_a_row},
                               self.accelerator.is_main_process, limit,
                               run_config=config_dict(self.config), also_frozen=self._also_frozen())

    def load_checkpoint(self, path: str) -> int:
        state = load_checkpoint(path, self.model, self.optimizer, self.lr_scheduler, also_frozen=self._also_frozen())
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.degenerate_in_a_row = state.get("degenerate_in_a_row", 0)
        return state["step"]

    def checksums(self) -> list[float]:
        """Sum of |trainable weights| on every rank: equal when the replicas agree."""
        def full(p):
            p = p.detach()
            return p.full_tensor() if hasattr(p, "full_tensor") else p
        return gather_object(self.accelerator, sum(float(full(p).double().abs().sum()) for p in self.params))

    def save_final(self, output_dir: str) -> str | None:
        """LoRA: output_dir/lora/pytorch_lora_weights.safetensors (diffusers format; the trained
        adapter only, or with eval_with_ema its EMA, as the official scripts save); full: output_dir/transformer/
        (QwenImageTransformer2DModel.from_pretrained). Refused (TrainingStopped, nothing written) when the
        weights' last rollouts were non-finite. A failed write (a full disk): WriteError, one line naming
        the file and the intact checkpoint to export (raise_final_write_error)."""
        import qwen_image as qi
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if self.rollouts_nonfinite:  # agreed by every rank (check_rollouts): all raise before the collective
            raise TrainingStopped("the policy's last rollouts were non-finite (NaN / inf latents): its weights are "
                                  "not exported, no final weights written (check learning_rate)")
        full_state = get_model_state_dict(self.model, options=state_dict_options())  # collective under FSDP
        if not self.accelerator.is_main_process:
            return None
        assert_finite(full_state, "final weights")
        if self.has_ema:  # export the EMA in the trained adapter's place (the model card says so)
            full_state = {k: (full_state[k.replace(".default.", f".{EMA_ADAPTER}.")] if ".default." in k else v)
                          for k, v in full_state.items()}
        if self.config.train_mode == "lora":
            out = os.path.join(output_dir, "lora")
            file = os.path.join(out, "pytorch_lora_weights.safetensors")
            write = lambda: qi.save_lora(self.transformer, out, state_dict=full_state)  # noqa: E731
        else:
            out = os.path.join(output_dir, "transformer")
            file = os.path.join(out, "diffusion_pytorch_model.safetensors")

            def write():
                os.makedirs(out, exist_ok=True)
                self.transformer.save_config(out)
                save_file({k: v.contiguous() for k, v in full_state.items()}, file)
        try:
            write()
        except Exception as error:  # a full disk: one line that says what is safe (cli: exit 2)
            raise_final_write_error(error, file, output_dir)
        return out


def raise_final_write_error(error: Exception, file: str, output_dir: str):
    """The final weights could not be written: re-raises `error` unless it is a failed write
    (checkpoints.write_failure: a full disk, an I/O error), else removes the cut-off file and raises
    WriteError naming the file, the reason, the newest checkpoint (complete: written atomically) and
    the export_checkpoint.py command that turns it into the LoRA."""
    from checkpoints import list_checkpoints, write_failure
    from run_config import WriteError

    reason = write_failure(error, os.path.dirname(file))
    if reason is None:
        raise error
    with contextlib.suppress(OSError):
        os.remove(file)  # cut off mid-write: not loadable, and it must not pass for the run's weights
    newest = list_checkpoints(output_dir)[-1:]
    if not newest:
        safe = "no checkpoint was written (checkpoint_every); free some space and run again"
    elif os.path.basename(file).startswith("pytorch_lora"):
        safe = (f"the checkpoint {newest[0]} is intact; free some space and export it with: python export_checkpoint.py "
                f"--checkpoint {newest[0]}")
    else:
        safe = (f"the checkpoint {newest[0]} is intact; free some space and resume with --resume_from_checkpoint latest "
                "to write them again")
    raise WriteError(f"final weights not written: {file}: {reason}; {safe}") from error


def add_old_adapter(transformer, adapter: str = OLD_ADAPTER):
    """Another LoRA adapter (`adapter`) with the trained one's config, holding a copy of its weights;
    frozen. The trained adapter stays the active one."""
    import copy
    import warnings

    with warnings.catch_warnings():  # peft warns of "multiple adapters" on any second one: this one is meant
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(copy.deepcopy(transformer.peft_config["default"]), adapter_name=adapter)
    transformer.set_adapter("default")
    named = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            if f".{adapter}." in name:
                p.data = named[name.replace(f".{adapter}.", ".default.")].detach().clone().float()
                p.requires_grad_(False)


@contextlib.contextmanager
def adapter_active(transformer, name: str):
    """Runs the transformer with adapter `name` active. peft's set_adapter also flips requires_grad
    (the active adapter trainable, the others frozen): the flags are put back afterwards."""
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    transformer.set_adapter(name)
    try:
        yield transformer
    finally:
        transformer.set_adapter("default")
        for p, flag in flags:
            p.requires_grad_(flag)
