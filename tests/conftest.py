"""Every test process sees 8 fake CPU devices, so sharded code paths run everywhere, and compiles without LLVM's
optimisations. pytest runs the tests in one worker process per core (pyproject's addopts; `-n 0`: in this process);
the `main.py` processes a worker's tests start share one persistent compilation cache in a temporary folder
(config.compilation_cache_dir defaults to $XDG_CACHE_HOME/s2mlp/jax), never the user's ~/.cache."""

import os
import tempfile


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test process with `devices` fake CPU devices. LLVM's optimisations are off (XLA:CPU backend
    level 0): the same programs, every assertion holding at either level, compiled in about half the CPU time (most
    of a tiny run's). The README's commands run as users run them (tests/test_readme.py)."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="s2mlp_tests_cache_")

import pytest  # noqa: E402

MOCK_EXAMPLES = 20  # examples in every split of the mocked imagenet2012


@pytest.fixture(scope="session")
def imagenet_metadata(tmp_path_factory):
    """A tfds data_dir whose imagenet2012 metadata says MOCK_EXAMPLES per split, so the builder reads as
    prepared; `tfds.testing.mock_data(policy=USE_FILES, data_dir=...)` then serves random examples. No download."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming, splits

    root = str(tmp_path_factory.mktemp("tfds"))
    builder = tfds.builder("imagenet2012", data_dir=root)
    os.makedirs(builder.data_dir)
    template = naming.ShardedFileTemplate(
        data_dir=builder.data_dir, dataset_name=builder.name, filetype_suffix="tfrecord", split="train"
    )
    split_infos = [
        splits.SplitInfo(
            name=s, shard_lengths=[MOCK_EXAMPLES], num_bytes=0, filename_template=template.replace(split=s)
        )
        for s in ("train", "validation")
    ]
    builder.info.set_splits(splits.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_dir)
    return root


@pytest.fixture(scope="session")
def tiny_s2mlp_run(tmp_path_factory) -> str:
    """configs/tiny.py's s2mlp_tiny (digits, 6 steps, EMA on, checkpoints at steps 3 and 6) trained once per session
    by the trainer, so one run serves every test that needs a trained workdir (inference, notebook, scan, install)."""
    workdir = tmp_path_factory.getbasetemp() / "tiny_s2mlp_run"
    if not (workdir / "checkpoints").is_dir():
        import train_lib
        from configs import tiny

        train_lib.train_and_evaluate(tiny.get_config("s2mlp_tiny"), str(workdir))
    return str(workdir)


# The slowest tests (whole runs, fresh processes, multi-device compiles): `pytest -m "not slow"` leaves them out and
# still touches every module. Each took 6 s or more (the last entries: 2-16 s per case) in a run on the 2-core
# development machine, most while it ran other work (the figure beside it); CI runs everything.
SLOW = {
    "tests/test_benchmarks.py::test_input_pipeline_table",  # 10 s
    "tests/test_benchmarks.py::test_model_benchmark_table",  # 157 s
    "tests/test_checkpoint.py::test_best_step_is_kept_across_kill_and_resume",  # 156 s
    "tests/test_checkpoint.py::test_ema_turned_off_for_a_run_saved_with_it_resumes_without_it",  # 20 s
    "tests/test_checkpoint.py::test_ema_turned_on_for_a_run_saved_without_it_starts_from_the_restored_params",  # 28 s
    "tests/test_checkpoint.py::test_truncated_latest_step_stops_naming_it_and_the_way_back",  # 61 s
    "tests/test_classes.py::test_digits_resumption_and_subsets_within_the_classes",  # 8 s
    "tests/test_classes.py::test_trained_run_saves_the_class_names_and_inference_prints_them",  # 25 s
    "tests/test_cli.py::test_a_run_trains_the_overridden_model",  # 99 s
    "tests/test_evals.py::test_each_eval_has_its_metrics_and_tensorboard_group",  # 16 s
    "tests/test_evals.py::test_imagenet_run_with_the_real_and_v2_presets",  # 13 s
    "tests/test_evals.py::test_the_best_checkpoint_is_ranked_by_the_named_eval",  # 22 s
    "tests/test_idx.py::test_resume_is_bit_exact",  # 9 s
    "tests/test_models.py::test_flax_weight_init_reproduces_the_previous_initialisation",  # 11 s
    "tests/test_models.py::test_s2mlp_deep_block_std_at_init_is_bounded_and_grows_with_scale_one",  # 13 s
    "tests/test_models.py::test_timm_weight_init_truncated_normal_002_zero_biases_zero_head",  # 11 s
    "tests/test_notebook.py::test_notebook_runs_headless",  # 11 s
    "tests/test_readme.py::test_readme_commands_run",  # 35 s
    "tests/test_robustness.py::test_a_failed_checkpoint_save_stops_the_run_at_that_step_in_one_line",  # 16 s
    "tests/test_robustness.py::test_a_held_lock_refuses_the_run_naming_the_holder_and_changes_nothing",  # 6 s
    "tests/test_robustness.py::test_a_read_only_workdir_fails_up_front_in_one_message",  # 6 s
    "tests/test_robustness.py::test_a_second_signal_ends_the_run_at_once",  # 11 s
    "tests/test_robustness.py::test_kill_before_the_first_checkpoint_then_rerun_logs_each_step_once",  # 18 s
    "tests/test_robustness.py::test_nan_before_any_checkpoint_says_none_was_written",  # 7 s
    "tests/test_robustness.py::test_sigterm_saves_the_step_and_the_resume_gives_the_uninterrupted_losses",  # 27 s
    "tests/test_robustness.py::test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step",  # 20 s
    "tests/test_robustness.py::test_two_trainers_in_one_workdir_and_a_killed_one_does_not_block_its_resume",  # 19 s
    "tests/test_scan.py::test_checkpoints_resume_evaluate_and_fine_tune_across_layouts",  # 26 s
    "tests/test_scan.py::test_profile_steps_writes_a_trace_into_the_workdir",  # 12 s
    "tests/test_scan.py::test_remat_gives_the_same_gradients",  # 19 s
    "tests/test_scan.py::test_scanned_equals_unrolled_with_drop_path",  # 25 s
    "tests/test_scan.py::test_second_start_loads_the_train_step_from_the_compilation_cache",  # 28 s
    "tests/test_study.py::test_study_runs_survives_sigkill_resumes_reports_and_skips_finished_runs",  # 46 s
    "tests/test_train_step.py::test_eight_devices_match_one_device",  # 37 s
    "tests/test_train_step.py::test_non_finite_loss_skips_the_update_and_records_the_step",  # 11 s
    "tests/test_train_step.py::test_two_micro_batches_equal_one_full_batch",  # 20 s
    "tests/test_training.py::test_fine_tune_from_a_run_with_a_new_head_on_an_image_folder",  # 14 s
    "tests/test_training.py::test_kill_9_then_resume_gives_the_uninterrupted_losses",  # 23 s
    "tests/test_training.py::test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint",  # 22 s
    "tests/test_training.py::test_tfds_imagenet_path_with_mock_data",  # 15 s
    "tests/test_training.py::test_training_writes_metrics_checkpoints_and_counts_eval_once",  # 17 s
    "tests/test_training.py::test_two_processes_with_two_devices_each",  # 44 s
    "tests/test_workdirs.py::test_a_study_with_a_relative_workdir_runs_where_the_user_is",  # 17 s
    "tests/test_workdirs.py::test_home_and_symlinked_workdirs",  # 19 s
    "tests/test_workdirs.py::test_relative_workdir_from_another_directory_trains_resumes_evaluates_reports_and_predicts",
    # 81 s
    "tests/test_models.py::test_paper_model_forward_at_224",  # 2-3 s per model
    "tests/test_models.py::test_s2mlp_at_other_resolutions",  # 2-3 s per size
    "tests/test_models.py::test_xla_flops_cross_check",  # 2-3 s per model
    "tests/test_scan.py::test_scanned_intermediates_are_the_stacked_block_outputs",  # 8-16 s per model
    "tests/test_scan.py::test_convert_round_trips_exactly_including_optimizer_state",  # 3-16 s
    "tests/test_scan.py::test_drop_path_rates_per_block_are_linear_in_depth",  # 7 s
    "tests/test_models.py::test_affine_branch_scale_init_and_the_patch_norm_at_one",  # 2-6 s per case
    # Added 2026-12-06, timed while a training run shared the cores:
    "tests/test_training.py::test_rows_after_a_resume_are_the_uninterrupted_runs_when_logs_and_checkpoints_do_not_align",
    # 34 s
    "tests/test_training.py::test_a_stop_at_an_evaluated_step_saves_its_eval_metric",  # 19 s
    "tests/test_scan.py::test_the_recipe_optimizer_updates_scanned_as_unrolled",  # 1-25 s per model
    "tests/test_repeated_aug.py::test_device_ops_key_an_example_by_its_stream_position_whatever_the_process_count",
    # 12 s
    "tests/test_study.py::test_a_run_that_fails_a_check_ends_the_study_with_one_line",  # 8 s
    "tests/test_robustness.py::test_resuming_with_a_changed_recipe_names_the_changes",  # 60-100 s (shared cores)
    "tests/test_train_step.py::test_repeated_augmentation_on_two_processes_takes_each_example_as_one_process_does",
    # 41-46 s (shared cores)
}
# Module fixtures that train a tiny run (10-12 s each): their tests are slow too, so the fast subset skips the run.
SLOW_FIXTURES = {
    ("tests/test_checkpoint.py", "run"),
    ("tests/test_evals.py", "two_evals"),
    ("tests/test_robustness.py", "reference"),
    ("tests/test_training.py", "tiny_run"),
}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.nodeid.split("::")[0]
        if item.nodeid.split("[")[0] in SLOW or any((module, f) in SLOW_FIXTURES for f in item.fixturenames):
            item.add_marker(pytest.mark.slow)
