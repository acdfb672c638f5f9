"""The run directory: stage hashes and the sections they cover, the manifest, claims, caches."""

import ml_collections
import pytest

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import runner
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.run_dir import Manifest, RunDir, config_hash
from visatb_jax.runtime import fileio

from conftest import micro_config


def _hashes(**overrides):
  config = micro_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return runner.stage_hashes(config_lib.build(config))


def test_stage_hashes_chain_only_downstream():
  base = _hashes()
  t = _hashes(**{"balance.temperature": 1.0})
  assert all(t[s] == base[s] for s in ("data", "prep", "validate"))
  assert all(t[s] != base[s] for s in ("lambda", "final", "test", "report"))
  f = _hashes(**{"balance.form": "precise"})  # it decides which preparation models exist
  assert f["data"] == base["data"] and f["prep"] != base["prep"]
  d = _hashes(**{"data.max_len": 100})
  assert all(d[s] != base[s] for s in base)
  e = _hashes(**{"eval.max_new_tokens": 4})
  assert e["prep"] == base["prep"] and e["validate"] != base["validate"]


def test_every_stage_reads_its_own_and_earlier_sections():
  allowed = runner.allowed_sections()
  assert allowed["data"] == ("seed", "tasks", "data", "model")
  assert "balance.form" in allowed["prep"] and "balance" not in allowed["prep"]
  assert set(allowed["data"]) <= set(allowed["report"])


def test_hash_ignores_key_order():
  a = ml_collections.ConfigDict({"x": 1, "y": {"a": 1, "b": 2}})
  b = ml_collections.ConfigDict({"y": {"b": 2, "a": 1}, "x": 1})
  assert config_hash(a) == config_hash(b)


def test_manifest_roundtrip(tmp_path):
  m = Manifest(str(tmp_path), "c1")
  assert not m.is_done("data", "h1")
  m.mark("data", "running", "h1")
  assert not m.is_done("data", "h1")
  m.mark("data", "done", "h1", seconds=1.5)
  again = Manifest(str(tmp_path), "c1")
  assert again.is_done("data", "h1") and not again.is_done("data", "h2")
  on_disk = fileio.read_json(tmp_path / "manifest.json")
  assert on_disk["stages"]["data"]["seconds"] == 1.5
  assert on_disk["config_hash"] == "c1"
  m.mark("prep", "done", "h2")
  m.mark("lambda", "running", "h3")
  assert list(fileio.read_json(tmp_path / "manifest.json")["stages"]) == ["data", "prep", "lambda"]
  assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp files left


def test_claims_and_score_cache(tmp_path):
  run_dir = RunDir(str(tmp_path))
  assert not run_dir.claim("prep/mini", "h1")
  run_dir.finish("prep/mini", {"hash": "h1", "train": {}})
  assert run_dir.claim("prep/mini", "h1")
  assert run_dir.run_info("prep/mini")["done"]
  # Another configuration's directory is removed, never resumed.
  (tmp_path / "prep" / "mini" / "stale.txt").write_text("x")
  assert not run_dir.claim("prep/mini", "h2")
  assert not (tmp_path / "prep" / "mini" / "stale.txt").exists()
  with pytest.raises(PipelineError, match="has no finished training run"):
    run_dir.run_info("prep/mini")
  run_dir.cache_scores("prep/mini", "val", "h2", {"a": 0.5}, {"a": {"s1": 1.0, "s2": 0.0}},
                       {"a": ["x", "y"]})
  assert run_dir.cached_scores("prep/mini", "val", "h2", ["a"]) == (
      {"a": 0.5}, {"a": {"s1": 1.0, "s2": 0.0}})
  assert run_dir.cached_scores("prep/mini", "val", "h3", ["a"]) is None
  assert run_dir.cached_scores("prep/mini", "val", "h2", ["a", "b"]) is None
