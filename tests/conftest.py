import os

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Overrides that shrink configs/demo.py to seconds: a few samples, a model of a few thousand
# parameters, one epoch. The numbers it produces mean nothing; the plumbing is what is tested.
MICRO_OVERRIDES = {
    "data.shapes.sizes": {"train": 24, "val": 5, "test": 5},
    "data.vocab_size": 300, "data.seq_len": 128, "data.max_images": 4,
    "model.vision.hidden_size": 16, "model.vision.intermediate_size": 32,
    "model.vision.num_hidden_layers": 2, "model.vision.num_attention_heads": 2,
    "model.text.hidden_size": 32, "model.text.intermediate_size": 64,
    "model.text.num_hidden_layers": 2, "model.text.num_attention_heads": 2,
    "model.text.num_key_value_heads": 1,
    "train.epochs": 1.0, "train.batch_size": 8, "train.checkpoint_every": 2, "train.log_every": 1,
    "eval.batch_size": 8, "eval.max_new_tokens": 8, "prep.r_mini": 0.25,
    # One gradient-combination baseline, so that the per-task-gradient step runs end to end.
    "baselines": ("ew", "stl", "mgda"),
    # Every task of the benchmark, and no pretrain stage (tests/e2e/test_pretrain.py adds one).
    "task_order": ("caption", "vqa", "count", "grounding", "chat"),
    "pretrain.enabled": False,
    "pretrain.batch_size": 8,  # as train.batch_size (the demo pretrains 84 samples a step)
    "data.shapes.count_scope": "any",
    "balance.temperature": 0.5,
    # One replicate and the paper's λ, so that λ can be checked against compute_lambda on the
    # validation table; tests/e2e/test_replicates_run.py runs the demo's replicates and evidence rule.
    "prep.replicates": 1,
    "balance.shrinkage": "none",
}


def set_fields(config, overrides):
  """Sets dotted fields ("train.epochs") of a ConfigDict or plain dict in place; returns it."""
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def micro_config():
  """configs/demo.py shrunk by MICRO_OVERRIDES (a fresh, unlocked ConfigDict each call)."""
  from visatb_jax.cli import launch
  return set_fields(launch.load_config(os.path.join(REPO, "configs", "demo.py")),
                    MICRO_OVERRIDES)


@pytest.fixture(scope="module")
def meshes():
  """{1: a mesh of one device, 8: the data mesh over all 8 simulated devices}."""
  import jax
  from visatb_jax.runtime import sharding
  assert len(jax.devices()) == 8, "tests/conftest.py sets 8 simulated CPU devices"
  return {1: sharding.make_mesh(devices=jax.devices()[:1]), 8: sharding.make_mesh()}


@pytest.fixture(scope="session", autouse=True)
def _image_digest_cache(tmp_path_factory):
  """Image content digests (data/image_digest.py) cached in the session's temp dir, never in the
  user's ~/.cache; subprocesses inherit it through the environment."""
  os.environ["VISATB_CACHE_DIR"] = str(tmp_path_factory.mktemp("visatb_cache"))
  yield


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """One XLA cache for the session: pipelines in tests and their subprocesses compile once."""
  import jax
  directory = str(tmp_path_factory.mktemp("xla_cache"))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield
