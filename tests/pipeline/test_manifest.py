import ml_collections

from visatb_jax.runtime import fileio
from visatb_jax.pipeline import manifest

_INPUTS = (("data", ("seed", "data")), ("prep", ("train",)), ("lambda", ("balance",)))


def _config(**overrides):
  c = ml_collections.ConfigDict({"seed": 0, "data": {"n": 1}, "train": {"lr": 0.1},
                                 "balance": {"temperature": 0.5}})
  for k, v in overrides.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


def test_stage_hashes_chain_only_downstream():
  base = manifest.stage_hashes(_config(), _INPUTS)
  t = manifest.stage_hashes(_config(**{"balance.temperature": 1.0}), _INPUTS)
  assert t["data"] == base["data"] and t["prep"] == base["prep"]
  assert t["lambda"] != base["lambda"]
  d = manifest.stage_hashes(_config(**{"data.n": 2}), _INPUTS)
  assert all(d[s] != base[s] for s in ("data", "prep", "lambda"))


def test_hash_ignores_key_order():
  a = ml_collections.ConfigDict({"x": 1, "y": {"a": 1, "b": 2}})
  b = ml_collections.ConfigDict({"y": {"b": 2, "a": 1}, "x": 1})
  assert manifest.config_hash(a) == manifest.config_hash(b)


def test_manifest_roundtrip(tmp_path):
  m = manifest.Manifest(str(tmp_path), _config())
  assert not m.is_done("data", "h1")
  m.mark("data", "running", "h1")
  assert not m.is_done("data", "h1")
  m.mark("data", "done", "h1", seconds=1.5)
  again = manifest.Manifest(str(tmp_path), _config())
  assert again.is_done("data", "h1") and not again.is_done("data", "h2")
  on_disk = fileio.read_json(tmp_path / "manifest.json")
  assert on_disk["stages"]["data"]["seconds"] == 1.5
  assert on_disk["config_hash"] == manifest.config_hash(_config())
  m.mark("prep", "done", "h2")
  m.mark("lambda", "running", "h3")
  assert list(fileio.read_json(tmp_path / "manifest.json")["stages"]) == ["data", "prep", "lambda"]
  assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp files left
