"""Every test process sees 8 fake CPU devices, so sharded code paths run everywhere. The `main.py` processes the
tests start share one persistent compilation cache in a temporary folder (config.compilation_cache_dir defaults
to $XDG_CACHE_HOME/s2mlp/jax), never the user's ~/.cache."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
