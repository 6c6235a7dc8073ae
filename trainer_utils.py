"""Kept for one release: the old catch-all, now only the public names of the modules it was split
into. Import from those instead:

    run_config     Config on the command line (parse_config, cli, require, ...), shared presets
    prompt_data    prompt rows, each rank's prompts per step, derived seeds
    distributed    the accelerator and the collectives
    checkpoints    atomic checkpoints, resume checks (WEIGHT_DEFINING_FIELDS, config_changes)
    run_logs       metrics.jsonl and trackers, sample grids
    evaluation     the eval, paired gains, the trainers' periodic eval
    run_lifecycle  launch, resume, after_step, finish: a training run from start to end

Unlike the old module, `config_changes` / `check_resume_config` / `launch` take the script's extra
weight-defining `knobs` as an argument (the online trainer passes its objective's: see
train_online_dpo.objective_knobs): shared run code does not import objectives.py.
"""

from checkpoints import (CHECKPOINT_FILES, CHECKPOINT_RE, LORA_ONLY_FIELDS, WEIGHT_DEFINING_FIELDS,  # noqa: F401
                         assert_finite, check_resume_config, checkpoint_problem, config_changes, list_checkpoints,
                         load_checkpoint, resolve_checkpoint, save_checkpoint, state_dict_options, trainable_state,
                         validate_output_and_resume)
from distributed import all_max, all_sum, gather_object, make_accelerator  # noqa: F401
from evaluation import (EVAL_SETTINGS, TABLE_IMAGES, check_eval_baseline, component_metrics, evaluate,  # noqa: F401
                        evaluate_and_log, exact_matches, format_eval, format_gain, make_eval, paired_gain,
                        rollout_settings, score_rows, score_rows_with_components, standard_error)
from prompt_data import (PROMPT_COLUMN_NAMES, derived_seed, dpo_noise_seed, load_prompts,  # noqa: F401
                         prompts_for_step, rollout_seeds)
from run_config import (CPU_TINY_OVERRIDES, ROOT, TEXT_WORLD, TEXT_WORLD_DATA, TEXT_WORLD_OVERRIDES,  # noqa: F401
                        TINY_PROMPTS, ConfigError, InputError, build_parser, cli, config_dict, data_source_exists,
                        differing_fields, field_comments, flag_value, parse_config, require, require_writable_dir,
                        validate_reward)
from run_lifecycle import (RUN_ENTRIES, StopFlag, after_step, finish, launch, prepare_output_dir,  # noqa: F401
                           resume_and_start_run, run_entries, run_summary, start_run, validate_policy_config)
from run_logs import MetricsLog, baseline_eval, eval_history, image_grid, pair_grid, setup_trackers  # noqa: F401

_flag_value, _options = flag_value, state_dict_options  # the old private names, still imported by other branches
