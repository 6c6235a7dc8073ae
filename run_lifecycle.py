"""A training run from start to end, what both trainers share around their loop: the rules checked
before any model loads (`validate_policy_config`), `launch` (accelerator, run folder, seeds, a clean
stop on SIGTERM), the resume and the run's logs (`resume_and_start_run`), the periodic eval and
checkpoint (`after_step`) and the final weights, model card and summary (`finish`). The policy and
its updates live in policy.py, dpo_update.py and objectives.py; the run folder's rules (lock,
overwrite, resume checks) in run_folder.py; the scripts keep where the training latents come from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys

import qwen_image
from checkpoints import resolve_checkpoint, validate_output_and_resume
from distributed import all_sum, make_accelerator
from evaluation import check_eval_baseline, format_gain
from run_config import (config_dict, require, require_data_source, require_lora_fits_memory, require_pretrained,
                        validate_reward)
from run_folder import mark_run_dir_used, prepare_output_dir, release_run_dir
from run_logs import MetricsLog, eval_history, setup_trackers


def validate_policy_config(config, world_size: int = 1):
    """The rules both trainers share: model, LoRA, DPO, optimiser, evaluation, logging."""
    from pairing import PAIR_STRATEGIES, SIGMA_SCHEMES

    require_pretrained(config.pretrained)
    require(config.micro_batch_pairs >= 1, "micro_batch_pairs",
            "must be >= 1: a micro-batch holds whole (chosen, rejected) pairs, never half of one")
    require(math.isfinite(config.beta) and config.beta > 0, "beta", "must be a finite number > 0")
    validate_reward(config.reward, config.reward_kwargs)
    probe_reward(config.reward, config.reward_kwargs)
    require(not getattr(config, "push_to_hub", False) or bool(getattr(config, "hub_model_id", "").strip()),
            "hub_model_id", "push_to_hub needs a repository id (--hub_model_id user/name)")
    require(getattr(config, "pair_strategy", PAIR_STRATEGIES[0]) in PAIR_STRATEGIES, "pair_strategy",
            f"must be one of {PAIR_STRATEGIES}")
    # the online trainer also takes "" (the objective's official scheme) and the group objectives' schemes
    schemes = SIGMA_SCHEMES + (("", "sampler", "sampler_stratified", "sampler_first") if hasattr(config, "objective") else ())
    require(config.sigma_scheme in schemes, "sigma_scheme", f"must be one of {', '.join(repr(x) for x in schemes)}")
    require(getattr(config, "min_reward_margin", 0.0) >= 0, "min_reward_margin", "must be >= 0")
    require(config.train_mode in ("lora", "full"), "train_mode", "must be 'lora' or 'full'")
    require(config.sharding in ("none", "fsdp2"), "sharding", "must be 'none' or 'fsdp2'")
    require(config.dtype in ("bfloat16", "float32", "float16"), "dtype", "must be bfloat16, float16 or float32")
    require(config.height % 16 == 0 and config.height > 0, "height", "must be a positive multiple of 16")
    require(config.width % 16 == 0 and config.width > 0, "width", "must be a positive multiple of 16")
    require(config.eval_inference_steps >= 1, "eval_inference_steps", "must be >= 1")
    require(1 <= config.max_sequence_length <= 1024, "max_sequence_length", "must be in [1, 1024]")
    require(config.true_cfg_scale >= 1.0, "true_cfg_scale", "must be >= 1 (1 disables CFG)")
    require(config.lora_rank >= 1 and config.lora_alpha > 0, "lora_rank", "rank must be >= 1 and alpha > 0")
    require(config.lora_init in qwen_image.LORA_INITS, "lora_init",
            f"must be one of {', '.join(sorted(qwen_image.LORA_INITS))}: inits that rewrite the base weights "
            "(pissa, olora, ...) would make 'adapters disabled' differ from the base model, the reference")
    require(bool(config.lora_targets.strip()) or config.train_mode == "full", "lora_targets", "must name modules")
    if config.train_mode == "lora":  # before anything allocates it: a huge rank would ask for hundreds of GB
        require_lora_fits_memory(config.pretrained, config.lora_targets, config.lora_rank)
    require(math.isfinite(config.learning_rate) and config.learning_rate > 0, "learning_rate", "must be a finite number > 0")
    require(math.isfinite(config.weight_decay) and config.weight_decay >= 0, "weight_decay", "must be a finite number >= 0")
    for field in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(config, field) < 1, field, "must be in [0, 1)")
    require(math.isfinite(config.adam_epsilon) and config.adam_epsilon > 0, "adam_epsilon",
            "must be a finite number > 0 (with 0, a parameter without gradient divides 0 by 0)")
    require(config.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    require(config.max_steps >= 1, "max_steps", "must be >= 1")
    require(config.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", "must be >= 1")
    for field in ("eval_every", "checkpoint_every", "checkpoints_total_limit", "max_eval_prompts", "lr_warmup_steps"):
        require(getattr(config, field) >= 0, field, "must be >= 0 (0 disables)")
    require(config.eval_samples_per_prompt >= 1, "eval_samples_per_prompt", "must be >= 1")
    require(config.log_with in ("wandb", "tensorboard", "none"), "log_with", "must be wandb, tensorboard or none")
    require_data_source(config.eval_data, "eval_data")
    check_eval_baseline(config)
    validate_output_and_resume(config)


def probe_reward(spec: str, reward_kwargs: str):
    """The reward's server (ocr_server) answers a connection, before any model loads (rewards.reward_problem)."""
    from rewards import build_reward, parse_reward_spec, reward_problem

    if "ocr_server" not in [name for name, _ in parse_reward_spec(spec)]:
        return
    try:
        reward_fn = build_reward(spec, **json.loads(reward_kwargs))
    except TypeError as error:  # an unknown keyword for the reward's constructor
        require(False, "reward_kwargs", str(error))
    problem = reward_problem(reward_fn)
    require(problem is None, "reward", problem or "")


class StepAbandoned(KeyboardInterrupt):
    """A stop signal while a step's rollout and reward were still running (StopFlag.abandonable):
    the step is dropped, and `checkpoint_when_abandoned` writes the checkpoint of the last completed
    step (no update of the dropped step has happened: the weights are that step's)."""

    def __init__(self, steps_done: int):
        super().__init__(f"step {steps_done + 1} abandoned")
        self.steps_done = steps_done


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it (agreed across ranks) at step boundaries, writes a
    checkpoint and exits cleanly. While a rollout, a reward call or an eval runs (`abandonable`; one
    process only) the signal abandons that work at once (StepAbandoned), so a hung reward server is
    not waited for. A second signal raises KeyboardInterrupt at once (e.g. to leave a hung checkpoint
    write); `cli` turns it into one line and exit status 130. Checkpoints are written atomically, so
    what is already on disk stays loadable."""

    def __init__(self, can_abandon: bool = True):
        self.raised = False
        self.can_abandon = can_abandon  # several ranks: a rank that left mid-step would hang the others' collectives
        self.abandon_at = None  # the steps done while a step's rollout / reward runs, else None
        self.ended = False  # the run has written its last checkpoint and is leaving
        # the process's own handlers (Python's Ctrl-C, a notebook's, pytest's): back at the run's end (end_run)
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in self.previous:
            signal.signal(sig, self._handler)

    def restore_handlers(self):
        """The handlers that were there before this flag: the process goes on as before the run."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python

    def abandonable(self, steps_done: int):
        """From now on (a rollout, a reward call, an eval) a signal abandons the work in progress: the
        run ends with the checkpoint of `steps_done`, the steps whose updates are complete."""
        self.abandon_at = steps_done if self.can_abandon else None

    def not_abandonable(self):
        """From now on (an update, a checkpoint write) a signal lets the work finish, then stops."""
        self.abandon_at = None

    def run_ended(self):
        """The checkpoint is written and the run is leaving: a late signal is ignored (at the
        interpreter's shutdown Python restores the default handlers, and a late Ctrl-C would kill
        the exiting process with status 130 after a clean stop)."""
        self.ended = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.ended:
            return
        if self.raised:
            raise KeyboardInterrupt(f"second {name}: stopping now, without a checkpoint")
        self.raised = True
        if self.abandon_at is not None:
            steps_done, self.abandon_at = self.abandon_at, None
            import rewards

            rewards.CALLS_CANCELLED.set()  # a reward call on a worker thread (reward_overlap) stops waiting too
            print(f"{name}: abandoning the rollout / reward / eval in progress; the run ends with the weights of "
                  f"step {steps_done} (send it again to stop at once)", file=sys.stderr, flush=True)
            raise StepAbandoned(steps_done)
        print(f"{name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


_ON_ABANDON = None  # set by resume_and_start_run: writes the checkpoint of the last completed step
_STOP = None  # the run's StopFlag (launch)


@contextlib.contextmanager
def checkpoint_when_abandoned():
    """Around a trainer's `train`: a step abandoned by a stop signal (StepAbandoned) ends the run
    cleanly with the checkpoint of the last completed step and the command that continues it.
    However the run ends (done, stopped, an exception), `end_run` leaves the process as it found it."""
    try:
        yield
    except StepAbandoned as stop:
        if _ON_ABANDON is None:  # before the run started: nothing to keep
            raise KeyboardInterrupt(str(stop)) from None
        _ON_ABANDON(stop.steps_done)
    except BaseException:
        if _ACCELERATOR is not None:  # trackers (wandb, tensorboard) write what they hold and close
            for tracker in _ACCELERATOR.trackers:
                tracker.finish()
            _ACCELERATOR.trackers = []
        raise
    finally:
        end_run()


def end_run():
    """A run's teardown, however it ended, for a process that goes on (a notebook, a test, a script
    calling main() twice): the signal handlers from before the run, the reward's cancel event
    cleared, the run folder's lock released, torch's thread count as before and this module's
    per-run state reset: the next run in this process behaves as in a fresh one
    (tests/test_run_isolation.py)."""
    global _STOP, _ON_ABANDON, _ACCELERATOR, _START_STEP, _TORCH_THREADS
    if _STOP is not None:
        _STOP.restore_handlers()
    if _TORCH_THREADS is not None:
        import torch

        torch.set_num_threads(_TORCH_THREADS)
    _STOP, _ON_ABANDON, _ACCELERATOR, _START_STEP, _TORCH_THREADS = None, None, None, 0, None
    import rewards

    rewards.CALLS_CANCELLED.clear()
    release_run_dir()


_RUN_START = 0.0  # set by launch: the summary's wall time
_ACCELERATOR = None  # the run's accelerator (launch): its trackers are closed when a run ends by an exception
_TORCH_THREADS = None  # torch's thread count before the run (launch)
_START_STEP = 0  # set by resume_and_start_run: the step this leg of the run started at


def launch(config, validate, knobs: tuple[str, ...] = ()):
    """-> (accelerator, stop flag): the accelerator (with launch checks), `validate(config, world)`
    for the real number of processes, the run folder prepared (a resume compares the weight-defining
    fields and the script's `knobs`: checkpoints.config_changes), seeds set, SIGTERM/SIGINT caught."""
    from accelerate.utils import set_seed

    import time

    global _RUN_START, _ON_ABANDON, _STOP, _ACCELERATOR, _TORCH_THREADS
    _RUN_START, _ON_ABANDON = time.perf_counter(), None
    import rewards

    rewards.CALLS_CANCELLED.clear()  # an earlier run in this process may have stopped
    accelerator = _ACCELERATOR = make_accelerator(config)
    import perf
    import torch

    _TORCH_THREADS = torch.get_num_threads()  # end_run gives them back: set_cpu_threads may lower them
    perf.set_cpu_threads(accelerator.device.type)  # threads for the idle cores, unless OMP_NUM_THREADS says
    validate(config, accelerator.num_processes)
    prepare_output_dir(config, accelerator, knobs)
    set_seed(config.seed)
    _STOP = StopFlag(can_abandon=accelerator.num_processes == 1)
    return accelerator, _STOP


def start_run(accelerator, config, resume_step: int | None) -> "MetricsLog":
    """Output directory, config.json, trackers and the metrics log."""
    metrics_log = MetricsLog(accelerator, config.output_dir, resume_step=resume_step)
    setup_trackers(accelerator, config.log_with, config.tracker_project, config_dict(config), config.output_dir)
    if accelerator.is_main_process:
        mark_run_dir_used()
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump(config_dict(config), f, indent=1)
        open(metrics_log.path, "a").close()  # the run marker (is_run_dir) from now on, before the first row
    return metrics_log


def resume_and_start_run(config, policy, accelerator) -> tuple[int, "MetricsLog"]:
    """Restores `resume_from_checkpoint` if set; opens the run's logs. -> (start step, metrics log).
    `launch` has already resolved "latest" to a checkpoint path (or "") and compared its config."""
    start_step = 0
    checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir, report=accelerator.print)
    if checkpoint:
        start_step = policy.load_checkpoint(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
    global _START_STEP, _ON_ABANDON
    _START_STEP = start_step

    def on_abandon(steps_done: int):
        if steps_done > start_step:
            policy.save_checkpoint(config.output_dir, steps_done, config.checkpoints_total_limit)
            accelerator.print(f"stop signal: checkpoint written at step {steps_done} (step {steps_done + 1} abandoned), "
                              f"exiting; to continue:\n  {resume_command(config)}")
        elif steps_done:
            accelerator.print(f"stop signal: no step completed since the resume from {checkpoint}; nothing new to save, "
                              f"exiting; to continue:\n  {resume_command(config)}")
        else:
            accelerator.print("stop signal: no step completed; nothing trained, no checkpoint written, exiting")
        accelerator.end_training()
        release_run_dir()
        _STOP.run_ended()
    _ON_ABANDON = on_abandon
    if _STOP is not None:
        _STOP.abandonable(start_step)  # the step-0 eval (and until the first step) may be abandoned
    return start_step, start_run(accelerator, config, resume_step=start_step if checkpoint else None)


def after_step(steps_done: int, config, policy, accelerator, stop: "StopFlag", run_eval) -> bool:
    """Periodic evaluation and checkpoint. On a stop signal (agreed across ranks) a checkpoint is
    written and True returned: the caller leaves its loop."""
    if config.eval_every and steps_done % config.eval_every == 0:
        stop.abandonable(steps_done)  # a signal during the eval (its reward calls): the checkpoint of steps_done
        run_eval(steps_done)
        stop.not_abandonable()
    stopping = all_sum(accelerator, float(stop.raised))[0] > 0
    if stopping or (config.checkpoint_every and steps_done % config.checkpoint_every == 0):
        policy.save_checkpoint(config.output_dir, steps_done, config.checkpoints_total_limit)
    if stopping:
        accelerator.print(f"stop signal: checkpoint written at step {steps_done}, exiting; to continue:\n"
                          f"  {resume_command(config)}")
        accelerator.end_training()
        release_run_dir()
        stop.run_ended()
    return stopping


def resume_command(config) -> str:
    """The command that continues this run: the script with the flags it was given (run_config.LAST_ARGV)
    less --resume_from_checkpoint / --overwrite_output_dir, plus `--resume_from_checkpoint latest`.
    (A multi-process run: the same flags after the same `accelerate launch ...`.)"""
    import shlex

    import run_config

    script = os.path.abspath(getattr(sys.modules.get(type(config).__module__), "__file__", None) or sys.argv[0])
    try:
        script = os.path.relpath(script)
    except ValueError:  # another drive (Windows)
        pass
    args, argv, i = [], list(run_config.LAST_ARGV), 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            takes_next = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if takes_next else 1
            continue
        args.append(argv[i])
        i += 1
    if "--output_dir" not in args and not any(a.startswith("--output_dir=") for a in args):
        args += ["--output_dir", config.output_dir]  # a preset's or the default folder, spelled out
    return shlex.join(["python", script, *args, "--resume_from_checkpoint", "latest"])


def finish(config, policy, metrics_log, accelerator) -> dict:
    """Final weights in the format diffusers loads; per-rank checksums show the replicas agree. LoRA:
    a model card next to the weights, the upload with push_to_hub, and a summary on the terminal."""
    metrics_log.log({"final/param_checksums": policy.checksums()}, config.max_steps)
    final_dir = policy.save_final(config.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        evals = eval_history(config.output_dir)
        if config.train_mode == "lora":
            import model_card

            from run_logs import side_write

            grids = sorted(f for f in os.listdir(os.path.join(config.output_dir, "samples")) if f.startswith("eval-"))
            side_write("model card", os.path.join(final_dir, "README.md"), lambda: model_card.write_model_card(
                final_dir, config_dict(config), evals, os.path.join(config.output_dir, "samples", grids[-1]) if grids else None,
                kind="offline" if hasattr(config, "pairs_path") else "online"))
            if getattr(config, "push_to_hub", False):
                model_card.push_to_hub(final_dir, config.hub_model_id, config.hub_token or None)
        print(run_summary(config, final_dir, evals))
    release_run_dir()
    return {"final_dir": final_dir, "step": config.max_steps}


def run_summary(config, final_dir: str, evals: list[dict]) -> str:
    """The end-of-run report: eval before -> after (± standard error), steps, wall time, where things are."""
    import time

    if _START_STEP >= config.max_steps:  # a resume at (or past) max_steps: no step ran
        lines = [f"nothing left to train: resumed at step {_START_STEP} and max_steps is {config.max_steps} "
                 "(raise --max_steps to train further); the final weights were written again"]
    elif _START_STEP:
        lines = [f"done: steps {_START_STEP + 1}-{config.max_steps} ({config.max_steps - _START_STEP} steps, resumed at "
                 f"step {_START_STEP}) in {time.perf_counter() - _RUN_START:.0f} s wall"]
    else:
        lines = [f"done: {config.max_steps} steps in {time.perf_counter() - _RUN_START:.0f} s wall"]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"eval reward: {first['eval/reward_mean']:.4f} ± {first.get('eval/reward_se', 0):.2g} (step {first['step']})"
                     f" -> {last['eval/reward_mean']:.4f} ± {last.get('eval/reward_se', 0):.2g} (step {last['step']})")
        if "eval/exact_match" in last:
            lines.append(f"eval exact match: {first['eval/exact_match']:.3f} -> {last['eval/exact_match']:.3f}")
        if "eval/reward_gain" in last:
            lines.append(f"gain, paired image by image: {format_gain(last)}")
    lines += [f"weights:  {final_dir}" + ("  (model card: README.md)" if config.train_mode == "lora" else ""),
              f"metrics:  {os.path.join(config.output_dir, 'metrics.jsonl')}",
              f"samples:  {os.path.join(config.output_dir, 'samples')}"]
    if config.train_mode == "lora":
        load = (f"import qwen_image; pipe = qwen_image.load_pipeline(\"{config.pretrained}\")"
                if config.pretrained in ("tiny", "tiny-bench") else
                f"import torch; from diffusers import QwenImagePipeline; pipe = QwenImagePipeline.from_pretrained("
                f"\"{config.pretrained}\", dtype=torch.bfloat16)")
        lines.append(f"load it:  python -c '{load}; pipe.load_lora_weights(\"{os.path.abspath(final_dir)}\")'")
    return "\n".join(lines)
