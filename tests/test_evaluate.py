"""The evaluation binary: probe correctness, features, end-to-end probe/low-data/finetune/bits."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from sklearn.linear_model import LogisticRegression

import forked
from conftest import REPO
from conftest import run_tool
from conftest import quickstart_config as quickstart
from conftest import run_on_fake_devices
from igpt_jax import config_lib
from igpt_jax import eval_tasks
from igpt_jax import evaluators
from igpt_jax import features as features_lib
from igpt_jax import input_pipeline
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import probe


# --- the probe itself ------------------------------------------------------------------------

def test_probe_separates_linearly_separable_features():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 32)) * 4
  def draw(n):
    y = rng.integers(0, 5, n)
    return centers[y] + rng.normal(size=(n, 32)), y
  r = probe.fit_and_select(draw(500), draw(200), draw(500), num_classes=5,
                           l2_grid=(1e-4, 1e-2))
  assert r.val_acc == 1.0 and r.test_acc == 1.0


def test_probe_on_raw_cifar10_pixels_matches_sklearn(cifar10_dir, tfds_dir):
  """Same data, same objective (C = 1 / (l2 n)): accuracy within 1 point of scikit-learn."""
  config = config_lib.base_config()
  config.dataset, config.data_dir, config.image_size = cifar10_dir, tfds_dir, 8
  source = input_pipeline.open_source(config)
  x, y = features_lib.raw_pixels(config, source, "test")  # 10,000 real images, 192 features
  assert x.shape == (10_000, 192) and x.dtype == np.uint8 and x.max() > 200
  tr, va, te = (x[:6000], y[:6000]), (x[6000:7000], y[6000:7000]), (x[7000:], y[7000:])
  r = probe.fit_and_select(tr, va, te, num_classes=10, l2_grid=(1e-3, 1e-2))
  scaler = probe.Standardizer.fit(tr[0])
  sk = LogisticRegression(C=1.0 / (r.l2 * len(tr[1])), max_iter=3000, tol=1e-6)
  sk.fit(scaler(tr[0]), tr[1])
  sk_acc = sk.score(scaler(te[0]), te[1])
  assert r.test_acc == pytest.approx(sk_acc, abs=0.01), (r.test_acc, sk_acc)
  assert 0.25 < r.test_acc < 0.5  # raw-pixel logistic regression on CIFAR-10 is ~30-40%


def test_probe_rejects_out_of_range_labels_and_empty_splits():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="num_classes"):
    probe.fit_and_select((x, np.array([0, 1, 2, 5])), (x, np.zeros(4, int)),
                         (x, np.zeros(4, int)), num_classes=3, l2_grid=(0.1,))
  with pytest.raises(ValueError, match="non-empty"):
    probe.fit_and_select((x[:0], np.zeros(0, int)), (x, np.zeros(4, int)),
                         (x, np.zeros(4, int)), num_classes=3, l2_grid=(0.1,))


def test_probe_records_convergence_and_warns_when_cut_off():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 40)).astype(np.float32)
  y = (x[:, :3].argmax(axis=1) + (rng.random(300) < 0.2)) % 3
  done = probe.fit_lbfgs(x, y, 1e-3, num_classes=3)
  assert done.converged and done.grad_norm < 1e-4 and 0 < done.iterations < 1000
  cut = probe.fit_lbfgs(x, y, 1e-3, num_classes=3, max_iters=3)
  assert not cut.converged and cut.iterations == 3 and cut.grad_norm > 1e-5
  assert cut.final_loss > done.final_loss  # the cut-off fit is further from the optimum
  logged = []
  r = probe.fit_and_select((x, y), (x[:100], y[:100]), (x[:100], y[:100]), num_classes=3,
                           l2_grid=(1e-3,), max_iters=3, log=logged.append)
  assert r.record()["converged"] is False and r.unconverged_l2
  assert any("iteration cap" in m and "probe_max_iters" in m for m in logged)


def test_probe_widens_the_l2_grid_once_when_the_best_is_at_an_edge():
  """Few noisy examples in many dimensions want strong regularisation: from a grid of weak
  strengths the best is its top end, so two stronger decades are tried."""
  rng = np.random.default_rng(2)
  def draw(n):
    y = rng.integers(0, 2, n)
    return rng.normal(size=(n, 200)) + 0.3 * y[:, None], y
  logged = []
  r = probe.fit_and_select(draw(40), draw(400), draw(400), num_classes=2,
                           l2_grid=(1e-6, 1e-5), log=logged.append)
  assert sorted(r.val_acc_by_l2) == [1e-6, 1e-5, 1e-4, 1e-3]  # widened once, upwards
  assert r.l2 > 1e-5 and r.val_acc == max(r.val_acc_by_l2.values())
  assert r.l2_at_edge == (r.l2 == 1e-3) == any("edge of the swept grid" in m for m in logged)
  assert probe.widen([1e-3, 1e-2, 1e-1], 1e-2) == []
  assert probe.widen([1e-5, 1e-4], 1e-5) == [1e-6, 1e-7]  # round decades, not 1.0000000000000001e-07
  assert probe.widen([0.0, 1e-2], 0.0) == []  # nothing weaker than no regularisation


def test_low_data_probe_chooses_l2_inside_its_own_labels():
  """k-fold cross-validation inside the labelled subset only: stratified folds, the chosen L2
  from the grid, a converged final fit, and the same answer for the same seed."""
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(4, 16)) * 2
  def draw(n):
    y = np.repeat(np.arange(4), n // 4)
    return (centers[y] + rng.normal(size=(len(y), 16))).astype(np.float32), y
  train, test = draw(40), draw(400)
  folds = probe.stratified_folds(train[1], 5, seed=0)
  for f in range(5):  # every fold holds 2 of each class's 10
    assert np.bincount(train[1][folds == f], minlength=4).tolist() == [2, 2, 2, 2]
  r = probe.fit_low_data(train, test, num_classes=4, l2_grid=(1e-3, 1e-1, 10.0), seed=0)
  assert r["cv_folds"] == 5 and r["l2"] in (1e-3, 1e-1, 10.0) and set(r["cv_acc_by_l2"]) == {
      1e-3, 1e-1, 10.0}
  assert r["converged"] and r["test_acc"] > 0.8 and r["cv_acc_by_l2"][r["l2"]] == max(
      r["cv_acc_by_l2"].values())
  assert probe.fit_low_data(train, test, num_classes=4, l2_grid=(1e-3, 1e-1, 10.0),
                            seed=0) == r
  with pytest.raises(probe.ProbeError, match="at least 2 labelled examples"):
    probe.fit_low_data((train[0][::10], train[1][::10]), test, num_classes=4, l2_grid=(1.0,))


def test_standardizer_in_chunks_matches_the_whole_array():
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(5000, 7)) * [1, 10, 1e3, 1, 1, 1, 0] + [0, 5, 1e4, 0, 0, 0, 3]).astype(
      np.float32)
  whole = probe.Standardizer.fit(x, rows=10**9)
  chunked = probe.Standardizer.fit(x, rows=333)
  np.testing.assert_allclose(chunked.mean, x.astype(np.float64).mean(0), rtol=1e-6)
  np.testing.assert_allclose(chunked.std[:6], x.astype(np.float64).std(0)[:6], rtol=1e-5)
  assert chunked.std[6] == 1.0  # a constant feature is left unscaled, not divided by 0
  np.testing.assert_allclose(chunked.apply(x, rows=333), whole(x), rtol=1e-5, atol=1e-5)


STREAMED_PEAK_SCRIPT = r"""
import functools, json, sys, tracemalloc
import numpy as np
from igpt_jax import probe
x, y = np.load(sys.argv[1], mmap_mode="r"), np.load(sys.argv[2])
logged = []
fit = functools.partial(
    probe.fit_and_select, (x[:40_000], y[:40_000]), (x[40_000:50_000], y[40_000:50_000]),
    (x[50_000:], y[50_000:]), num_classes=10, l2_grid=(1e-4, 1e-3), sgd_epochs=2,
    max_host_bytes=int(sys.argv[3]), log=logged.append)
first = fit()  # its imports and compilations allocate host memory too: not the probe's
tracemalloc.start()
r = fit()
_, peak = tracemalloc.get_traced_memory()
print("RESULT", json.dumps({
    "peak": peak, "streamed": r.streamed, "solver": r.solver, "test_acc": r.test_acc,
    "same": r.test_acc == first.test_acc and r.l2 == first.l2, "iterations": r.fit.iterations,
    "grad_norm": float(r.fit.grad_norm), "said": any("eval.max_host_gib" in m for m in logged)}))
"""


def test_probe_streams_features_from_disk_within_the_host_budget(tmp_path):
  """Features on disk (float16 memory map) larger than the host budget: the probe never holds
  them in memory (peak host allocations stay within the budget, measured by tracemalloc on a
  second, identical fit in a process of its own, where no other test's threads allocate), fits
  by streamed minibatch SGD, and still finds the classes."""
  rng = np.random.default_rng(5)
  n, d, k = 60_000, 256, 10
  centers = rng.normal(size=(k, d)).astype(np.float32)
  x = np.lib.format.open_memmap(str(tmp_path / "f.npy"), "w+", np.float16, (n, d))
  y = rng.integers(0, k, n).astype(np.int32)
  for a, b in probe.chunks(n, 10_000):
    x[a:b] = centers[y[a:b]] * 0.5 + rng.normal(size=(b - a, d))
  x.flush()
  np.save(str(tmp_path / "y.npy"), y)
  x = np.load(str(tmp_path / "f.npy"), mmap_mode="r")
  budget = 8 * 2**20  # 8 MiB, against 61 MiB of float32 training features
  r = run_on_fake_devices(STREAMED_PEAK_SCRIPT, tmp_path / "f.npy", tmp_path / "y.npy", budget,
                          tag="RESULT", devices=1)
  assert r["streamed"] and r["solver"] == "sgd" and r["said"] and r["same"]
  # Within the budget (5.3 MB measured): at most probe.SGD_STEPS_IN_FLIGHT steps wait for the
  # device, each holding its host batch (unbounded, the peak varied 4-18 MB from run to run).
  assert r["peak"] < budget, r["peak"]
  assert r["test_acc"] > 0.9 and r["iterations"] > 0 and np.isfinite(r["grad_norm"])
  # Within budget, the same data is fit in memory with L-BFGS.
  small = probe.fit_and_select((x[:2000], y[:2000]), (x[2000:3000], y[2000:3000]),
                               (x[3000:4000], y[3000:4000]), num_classes=k, l2_grid=(1e-3,),
                               max_host_bytes=budget)
  assert not small.streamed and small.solver == "lbfgs"
  # A long SGD fit says where it is (here at every step).
  lines = []
  probe.fit_sgd(x[:4096], y[:4096], 1e-3, num_classes=k, epochs=2, batch_size=1024,
                transform=probe.Standardizer.fit(x[:4096]), log=lines.append, log_every_s=0)
  assert len(lines) == 8 and "epoch 1/2, step 1/8" in lines[0], lines
  assert "epoch 2/2, step 8/8 (0s left)" in lines[-1], lines


SHARDED_PROBE_SCRIPT = r"""
import json
import jax
import numpy as np
from igpt_jax import probe
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)  # as sharding.make_mesh
rng = np.random.default_rng(0)
n, d, k = 1999, 48, 10  # 1999 rows: padded to 2000 with weight-0 rows over 8 devices
centers = rng.normal(size=(k, d))
y = rng.integers(0, k, n + 1000).astype(np.int32)
x = (centers[y] * 0.3 + rng.normal(size=(len(y), d))).astype(np.float32)
tr, va, te = (x[:n], y[:n]), (x[n:n + 500], y[n:n + 500]), (x[n + 500:], y[n + 500:])
xs, ys, ws = probe.on_devices(tr[0], tr[1], None, mesh)
out = {"rows_per_device": sorted({s.data.shape[0] for s in xs.addressable_shards}),
       "devices": len(xs.sharding.device_set), "padding_weight": float(np.asarray(ws)[n:].sum())}
placed, put_rows = [], probe.put_rows
probe.put_rows = lambda x, mesh: placed.append(len(x)) or put_rows(x, mesh)
for name, m in (("one", None), ("mesh", mesh)):
  placed.clear()
  r = probe.fit_and_select(tr, va, te, num_classes=k, l2_grid=(1e-3, 1e-2), mesh=m)
  out[name + "_placed"] = list(placed)  # rows placed on the mesh by the whole L2 sweep
  sgd = probe.fit_sgd(tr[0], tr[1], 1e-3, num_classes=k, epochs=2, batch_size=256, mesh=m)
  low = probe.fit_low_data((tr[0][:200], tr[1][:200]), te, num_classes=k, l2_grid=(1e-2, 1e-1),
                           folds=3, mesh=m)
  out[name] = {"l2": r.l2, "val": r.val_acc, "test": r.test_acc, "w": r.params["w"].tolist(),
               "iters": r.fit.iterations, "sgd_w": np.asarray(sgd.params["w"]).tolist(),
               "low": low["test_acc"], "low_l2": low["l2"]}
print("RESULT", json.dumps(out))
"""


def test_probe_splits_its_examples_over_the_mesh():
  """With the evaluation mesh (8 fake CPU devices), the probe's features, labels and logits are
  split by rows over every device (padded with weight-0 rows), L-BFGS, SGD and the low-data
  probe give the one-device answer, and the results are replicated (readable by every process)."""
  r = run_on_fake_devices(SHARDED_PROBE_SCRIPT, tag="RESULT")
  assert r["devices"] == 8 and r["rows_per_device"] == [250] and r["padding_weight"] == 0.0
  assert r["one_placed"] == [] and r["mesh_placed"] == [2000, 2000, 2000]  # x, y, w once
  one, mesh = r["one"], r["mesh"]
  assert one["l2"] == mesh["l2"] and one["low_l2"] == mesh["low_l2"]
  assert abs(one["val"] - mesh["val"]) <= 0.004 and abs(one["test"] - mesh["test"]) <= 0.004
  assert abs(one["low"] - mesh["low"]) <= 0.004 and one["test"] > 0.5
  np.testing.assert_allclose(mesh["w"], one["w"], atol=1e-5)
  np.testing.assert_allclose(mesh["sgd_w"], one["sgd_w"], atol=1e-5)


KILL_SCRIPT = r"""
import sys
sys.path.insert(0, "tests")
from conftest import quickstart_config
from igpt_jax import evaluators, features
features.FLUSH_BATCHES = 8
config = quickstart_config(sys.argv[1], **{"eval.batch_size": 8, "eval.layers": "2,4"})
data = evaluators.EvalData(config, sys.argv[1])
fs = data.features("train")
print("ROWS", len(fs.labels))
"""


def test_a_killed_feature_extraction_resumes_where_it_stopped(trained_quickstart, tmp_path):
  """kill -9 in the middle of writing the train split's features; the rerun starts at the
  recorded batch, and the result equals an uninterrupted extraction."""
  import shutil  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_quickstart, workdir, ignore=shutil.ignore_patterns("eval"))
  cmd = [sys.executable, "-c", KILL_SCRIPT, workdir]
  proc = forked.popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True)
  deadline, progress = time.time() + 240, None
  while time.time() < deadline and proc.poll() is None:
    found = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, "eval"))
             for f in fs if f == "progress.json" and "train" in r]
    if found:
      with open(found[0]) as f:
        try:
          progress = json.load(f)
        except ValueError:
          progress = None
      if progress and 16 <= progress["batches"] and not progress["complete"]:
        proc.send_signal(signal.SIGKILL)
        break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-2000:]
  killed_at = progress["batches"]
  assert 0 < killed_at < 169  # 1,350 training images in batches of 8
  out = forked.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resuming at batch {killed_at}" in out.stdout + out.stderr
  assert "ROWS 1350" in out.stdout
  directory = os.path.dirname(found[0])
  resumed = features_lib.FeatureSet.open(directory)
  # The same extraction, uninterrupted, in a fresh directory.
  fresh_dir = str(tmp_path / "fresh")
  shutil.copytree(trained_quickstart, fresh_dir, ignore=shutil.ignore_patterns("eval"))
  out = forked.run([sys.executable, "-c", KILL_SCRIPT, fresh_dir], cwd=REPO,
                   capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  fresh = features_lib.FeatureSet.open(directory.replace(workdir, fresh_dir))
  np.testing.assert_array_equal(resumed.labels, fresh.labels)
  np.testing.assert_array_equal(resumed.features, fresh.features)
  assert resumed.features.dtype == np.float16 and resumed.features.shape == (1350, 2, 128)


def test_per_class_subset():
  labels = np.repeat(np.arange(3), 10)
  idx = probe.per_class_subset(labels, 4, 3, seed=0)
  assert np.bincount(labels[idx]).tolist() == [4, 4, 4]
  assert not np.array_equal(idx, probe.per_class_subset(labels, 4, 3, seed=1))
  with pytest.raises(ValueError, match="fewer than the 11"):
    probe.per_class_subset(labels, 11, 3, seed=0)


# --- features --------------------------------------------------------------------------------

def test_parse_layers():
  assert config_lib.parse_layers("auto", 4) == [1, 2, 3, 4]
  assert config_lib.parse_layers("all", 2) == [0, 1, 2]
  auto = config_lib.parse_layers("auto", 48)
  assert len(auto) in (8, 9) and 24 in auto and auto[-1] == 48
  assert config_lib.parse_layers("3, 1,3", 4) == [1, 3]
  for bad in ("5", "-1", "x", ","):
    with pytest.raises(ValueError, match="config.eval.layers"):
      config_lib.parse_layers(bad, 4)


def test_parse_concat_layers():
  layers = [1, 2, 3, 4]
  assert config_lib.parse_concat("", layers) is None
  assert config_lib.parse_concat("all", layers) == layers
  assert config_lib.parse_concat("4, 2", layers) == [2, 4]
  assert config_lib.parse_concat("best:3", layers) == 3
  # 'best:K': K consecutive extracted layers centred on the best one, shifted in at the ends.
  assert config_lib.centred(layers, 2, 3) == [1, 2, 3]
  assert config_lib.centred(layers, 1, 3) == [1, 2, 3]
  assert config_lib.centred(layers, 4, 2) == [3, 4]
  assert config_lib.centred([4, 8, 12, 16, 20], 12, 4) == [8, 12, 16, 20]
  for bad in ("3", "2,5", "best:1", "best:5", "best:x", "two,three"):
    with pytest.raises(ValueError, match="config.eval.concat_layers"):
      config_lib.parse_concat(bad, layers)
  config = quickstart(**{"eval.layers": "2,4", "eval.concat_layers": "1,2"})
  with pytest.raises(ValueError, match=r"concat_layers='1,2'.*extracted layers \[2, 4\]"):
    config_lib.validate(config, 1)


def test_concatenated_layers_read_in_rows_equal_the_built_concatenation(tmp_path):
  """The probe on several layers side by side reads them from the memory maps in the rows it
  asks for; its fit equals the one on the concatenation built in memory."""
  rng = np.random.default_rng(0)
  views, built = [], []
  for name, n in (("train", 400), ("val", 100), ("test", 100)):
    feats = rng.normal(size=(n, 4, 8)).astype(np.float16)
    labels = (feats[:, 1, 0] + feats[:, 3, 2] > 0).astype(np.int32)
    np.save(tmp_path / f"{name}.npy", feats)
    view = features_lib.Concatenated(np.load(tmp_path / f"{name}.npy", mmap_mode="r"), [1, 3])
    views.append((view, labels))
    built.append((np.concatenate([feats[:, 1], feats[:, 3]], axis=1), labels))
  view, whole = views[0][0], built[0][0]
  assert view.shape == whole.shape == (400, 16) and len(view) == 400
  np.testing.assert_array_equal(view[10:20], whole[10:20])
  np.testing.assert_array_equal(view[np.array([3, 7, 300])], whole[[3, 7, 300]])
  fits = [probe.fit_and_select(*splits, num_classes=2, l2_grid=(1e-3, 1e-1))
          for splits in (views, built)]
  assert fits[0].test_acc == fits[1].test_acc > 0.9
  np.testing.assert_allclose(fits[0].params["w"], fits[1].params["w"], rtol=1e-5, atol=1e-6)


def test_features_are_pooled_normalised_inputs_of_the_next_block():
  """Row l of the features equals what a model truncated after block l produces when its
  final norm is the next block's ln_1: mean logits = feature @ wtet^T."""
  cfg = model_lib.ModelConfig(vocab_size=16, seq_len=36, num_layers=3, width=32, num_heads=4)
  m = model_lib.IGPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 36), 0, 16)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(1), tokens)["params"])
  params["wtet"] = jax.random.normal(jax.random.PRNGKey(2), params["wtet"].shape)
  params = jax.tree_util.tree_map(  # non-trivial gains
      lambda x: x * (1 + 0.3 * jax.random.normal(jax.random.PRNGKey(3), x.shape))
      if x.ndim <= 2 and x.shape[-1] == 32 and x.ndim >= 1 else x, params)
  feats = m.apply({"params": params}, tokens, output="features")
  assert feats.shape == (2, 4, 32) and feats.dtype == jnp.float32
  logits, both = m.apply({"params": params}, tokens, output="both")
  np.testing.assert_array_equal(feats, both)
  np.testing.assert_allclose(logits, m.apply({"params": params}, tokens), atol=0)
  for layer in range(1, 4):
    short = model_lib.IGPT(model_lib.ModelConfig(vocab_size=16, seq_len=36, num_layers=layer,
                                                 width=32, num_heads=4))
    p = dict(params)
    p["blocks"] = jax.tree_util.tree_map(lambda x: x[:layer], params["blocks"])
    if layer < 3:
      p["ln_f"] = {"scale": params["blocks"]["ln_1"]["scale"][layer]}
    mean_logits = short.apply({"params": p}, tokens).mean(axis=1)
    np.testing.assert_allclose(feats[:, layer] @ params["wtet"].T, mean_logits,
                               rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="output="):
    m.apply({"params": params}, tokens, output="hidden")
  # Extraction runs only the blocks its deepest layer needs (the next block's ln_1 included),
  # with the same numbers as the whole forward.
  for layers, blocks in (([0], 1), ([1], 2), ([0, 2], 3), ([1, 3], 3)):
    extract = features_lib.make_extract_fn(m, layers)
    np.testing.assert_allclose(jax.jit(extract)(params, tokens), feats[:, np.asarray(layers)],
                               rtol=1e-6, atol=1e-6)
    scans = [e for e in jax.make_jaxpr(extract)(params, tokens).eqns
             if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [blocks], (layers, scans)


# --- end to end on the quickstart ------------------------------------------------------------

def test_linear_probe_low_data_and_bits_end_to_end(trained_quickstart, capsys):
  workdir = trained_quickstart
  config = quickstart(workdir, **{"eval.tasks": "linear_probe,low_data,bits_per_dim",
                                  "eval.low_data_per_class": (5, 20, 400),
                                  "eval.low_data_seeds": 2, "eval.concat_layers": "best:2"})
  results = eval_tasks.evaluate(config, workdir)
  with open(os.path.join(workdir, "eval", "linear_probe.json")) as f:
    lp = json.load(f)
  assert lp == json.loads(json.dumps(results["linear_probe"]))
  assert lp["dataset"] == "digits" and lp["checkpoint_step"] == 120
  assert sorted(lp["layers"], key=int) == ["1", "2", "3", "4"]
  assert (lp["num_train"], lp["num_val"], lp["num_test"]) == (1350, 150, 297)
  assert lp["solver"] == lp["solver_requested"] == "lbfgs"
  for row in lp["layers"].values():
    assert 0.5 < row["test_acc"] <= 1.0 and row["l2"] in row["l2_grid"]
    assert set(config.eval.probe_l2) <= set(row["l2_grid"])  # widened only when at an edge
    # Converged: stopped by its gradient-norm rule; otherwise stopped by the cap, and said so.
    if row["converged"]:
      assert row["grad_norm"] < 1e-4 and 0 < row["iterations"] < 1000
    else:
      assert row["iterations"] == 1000 and row["l2"] in row["unconverged_l2"]
    assert row["final_loss"] > 0
  assert sum(row["converged"] for row in lp["layers"].values()) >= 2
  assert isinstance(lp["best_layer"], int)
  assert str(lp["best_layer"]) == max(lp["layers"], key=lambda k: lp["layers"][k]["val_acc"])
  assert lp["test_acc"] == lp["layers"][str(lp["best_layer"])]["test_acc"]
  # The paper's concatenated-layer probe beside the single layers: two layers, one the best.
  cat = lp["concat"]
  assert cat["spec"] == "best:2" and lp["best_layer"] in cat["layers"] and len(cat["layers"]) == 2
  assert cat["layers"] == config_lib.centred([1, 2, 3, 4], lp["best_layer"], 2)
  assert 0.5 < cat["test_acc"] <= 1.0 and cat["l2"] in cat["l2_grid"]
  assert lp["converged"] == (cat["converged"] and all(
      row["converged"] for row in lp["layers"].values()))
  assert 0.8 < lp["raw_pixel_test_acc"] < 1.0  # logistic regression on 8x8 digits: ~89%
  assert lp["raw_pixel"]["converged"] and 0 < lp["raw_pixel"]["iterations"] < 1000
  assert os.path.getsize(os.path.join(workdir, "eval", "linear_probe.png")) > 5_000

  with open(os.path.join(workdir, "eval", "low_data.json")) as f:
    ld = json.load(f)
  assert ld["layer"] == lp["best_layer"]
  assert ld["layer_source"] == "best layer of linear_probe.json"
  assert "cross-validation" in ld["l2_selection"]
  assert sorted(ld["per_class"], key=int) == ["5", "20"]  # digits has ~135 images a class, not 400
  assert "smallest class has" in ld["skipped"]["400"]
  few, more = ld["per_class"]["5"], ld["per_class"]["20"]
  assert few["labels"] == 50 and len(few["test_accs"]) == 2 and len(few["l2"]) == 2
  assert 0.2 < few["test_acc_mean"] < more["test_acc_mean"] + 0.05

  with open(os.path.join(workdir, "eval", "bits_per_dim.json")) as f:
    bpd = json.load(f)
  assert bpd["num_images"] == 297 and 0.4 < bpd["bits_per_dim"] < 1.0  # uniform: 4/3
  assert bpd["bits_per_dim"] == pytest.approx(bpd["nats_per_token"] / (3 * np.log(2)))

  # A second run reads every split's features from the cache and gives the same numbers.
  capsys.readouterr()
  again = eval_tasks.evaluate(quickstart(workdir, **{"eval.tasks": "linear_probe"}), workdir)
  assert capsys.readouterr().out.count("features from cache") == 3
  assert again["linear_probe"]["layers"] == lp["layers"]


def test_finetune_learns_the_labels(trained_quickstart):
  workdir = trained_quickstart
  config = quickstart(workdir, **{"eval.tasks": "finetune", "eval.finetune_steps": 90,
                                  "eval.finetune_eval_every_steps": 30,
                                  "eval.finetune_warmup_steps": 10,
                                  "eval.finetune_learning_rate": 3e-3})
  ft = eval_tasks.evaluate(config, workdir)["finetune"]
  with open(os.path.join(workdir, "eval", "finetune.json")) as f:
    assert json.load(f)["test_acc"] == ft["test_acc"]
  hist = ft["history"]
  assert [h["step"] for h in hist] == [30, 60, 90]
  # The zero-initialised head starts at ln(10) = 2.30 nats; 90 steps take it well below.
  assert hist[-1]["clf_loss"] < 1.6 and hist[-1]["clf_loss"] < hist[0]["clf_loss"] - 0.4
  assert ft["val_acc"] == max(h["val_acc"] for h in hist) > 0.5  # chance is 0.1
  assert ft["test_acc"] > 0.4
  # The generative loss keeps the model a good density model meanwhile (uniform: 2.77 nats).
  assert all(np.isfinite(h["gen_loss"]) and h["gen_loss"] < 2.0 for h in hist)
  assert ft["augmentation"] == {"crop_fraction": [1.0, 1.0], "pad_crop": 0, "flip": False}
  assert ft["mask_ensemble"] == 0  # a next-pixel model sees whole images
  # The pre-training checkpoints are untouched.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["120", "60"]


def test_missing_run_and_missing_step_fail_with_a_fix(trained_quickstart, tmp_path):
  with pytest.raises(FileNotFoundError, match="no palette.npy.*Train first"):
    eval_tasks.evaluate(quickstart(str(tmp_path)), str(tmp_path))
  config = quickstart(trained_quickstart, **{"eval.step": 7})
  with pytest.raises(FileNotFoundError, match=r"step 7.*have \[60, 120\]"):
    eval_tasks.evaluate(config, trained_quickstart)
  config = quickstart(trained_quickstart, **{"model.width": 64})
  with pytest.raises(ValueError, match="model.width: saved 128, now 64"):
    eval_tasks.evaluate(config, trained_quickstart)


def test_evaluate_cli(trained_quickstart):
  out = run_tool("evaluate", "--config=configs/quickstart.py", f"--workdir={trained_quickstart}",
                 "--config.eval.tasks=bits_per_dim,linear_probe", "--config.eval.layers=2",
                 "--config.eval.raw_pixel_baseline=False")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Test bits/dim:" in out.stdout and "Linear probe: best layer 2" in out.stdout
  with open(os.path.join(trained_quickstart, "eval", "linear_probe.json")) as f:
    lp = json.load(f)
  assert list(lp["layers"]) == ["2"] and "raw_pixel_test_acc" not in lp
  bad = run_tool("evaluate", "--config=configs/quickstart.py", f"--workdir={trained_quickstart}",
                 "--config.eval.tasks=knn", timeout=120)
  # A user error: status 2, the message naming the field, no traceback.
  assert bad.returncode == 2 and "ConfigError: config.eval.tasks='knn'" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_probe_on_another_dataset_real_cifar10(trained_quickstart, cifar10_dir, tfds_dir):
  """The digits model probed on real CIFAR-10 (read at its 8x8 resolution, its palette)."""
  config = quickstart(**{"eval.tasks": "linear_probe", "eval.dataset": cifar10_dir,
                         "data_dir": tfds_dir, "eval.layers": "1,2",
                         "eval.max_train_examples": 2000, "eval.holdout_fraction": 0.02})
  lp = eval_tasks.evaluate(config, trained_quickstart)["linear_probe"]
  assert lp["dataset"] == cifar10_dir
  assert (lp["num_train"], lp["num_val"], lp["num_test"]) == (2000, 1000, 10_000)
  assert list(lp["layers"]) == ["1", "2"]
  for row in lp["layers"].values():
    assert 0.15 < row["test_acc"] < 0.6  # above chance (0.1), far from a CIFAR model
  assert 0.2 < lp["raw_pixel_test_acc"] < 0.5


def test_probe_config_file_targets_the_paper_datasets():
  from configs import probe as module  # pylint: disable=g-import-not-at-top
  expect = {"cifar10": "test", "cifar100": "test", "stl10": "test",
            "imagenet2012": "validation"}
  for dataset, test_split in expect.items():
    c = module.get_config(f"s,{dataset}")
    config_lib.validate(c, 1)
    assert c.model.num_layers == 24
    data = config_lib.eval_data_config(c)
    assert (data.dataset, data.train_split, data.test_split) == (dataset, "train", test_split)
  assert module.get_config("l,imagenet2012").eval.probe_solver == "sgd"
  with pytest.raises(ValueError, match="MODEL,DATASET"):
    module.get_config("s")


def test_evaluate_sample_and_convert_restore_parameters_only(trained_quickstart, monkeypatch):
  """The tools read the parameters alone (orbax partial restore): no optimizer state is read
  or allocated, and nothing of a train state's size is alive after the restore."""
  import gc  # pylint: disable=g-import-not-at-top
  from igpt_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from igpt_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import train_state  # pylint: disable=g-import-not-at-top
  from igpt_jax import weights  # pylint: disable=g-import-not-at-top
  def refuse(*args, **kwargs):
    raise AssertionError("a tool built or restored a full train state")
  monkeypatch.setattr(train_state, "create_train_state", refuse)
  monkeypatch.setattr(checkpointing, "restore", refuse)
  config = quickstart(trained_quickstart)
  gc.collect()
  baseline = sum(x.nbytes for x in jax.live_arrays())
  param_bytes = 4 * 800_000  # the quickstart model: 0.8M float32 parameters
  data = evaluators.EvalData(config, trained_quickstart)
  assert model_lib.count_params(data.params) == 800_000 and data.step == 120
  grown = sum(x.nbytes for x in jax.live_arrays()) - baseline
  assert param_bytes <= grown < 1.2 * param_bytes  # parameters, not 3x (Adam's mu and nu)
  params, step = run_lib.Run(config, trained_quickstart).latest_params()  # `sample`'s restore
  assert step == 120
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                  jax.tree_util.tree_leaves(data.params)))
  params, step, _ = weights._params_and_model(trained_quickstart, config)  # export's restore
  assert step == 120 and model_lib.count_params(params) == 800_000


def test_in_training_probe_logs_and_equals_the_offline_binary(tmp_path, monkeypatch):
  """config.evals: a linear probe every 4 steps inside `train_and_evaluate`, logged to
  metrics.jsonl; at the last step it gives the same numbers as `python -m igpt_jax.evaluate`
  on the final checkpoint with the same settings (one code path). One EvalData (data source,
  compiled extraction) serves both steps, on each step's parameters."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from conftest import metrics_by_step  # pylint: disable=g-import-not-at-top
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  config = quickstart(total_steps=8, checkpoint_every_steps=8, log_every_steps=2,
                      eval_every_steps=8, warmup_steps=2)
  probe_settings = dict(tasks="linear_probe", layers="2,4", concat_layers="all",
                        raw_pixel_baseline=True, max_train_examples=600)
  config.evals.digits = ml_collections.ConfigDict(dict(every_steps=4, **probe_settings))
  built, init = [], evaluators.EvalData.__init__
  raw_splits, raw_pixels = [], features_lib.raw_pixels

  def counting_init(self, *args, **kwargs):
    built.append(kwargs["step"])
    init(self, *args, **kwargs)

  def counting_raw_pixels(config, source, split):
    raw_splits.append(split)
    return raw_pixels(config, source, split)

  monkeypatch.setattr(evaluators.EvalData, "__init__", counting_init)
  monkeypatch.setattr(features_lib, "raw_pixels", counting_raw_pixels)
  monkeypatch.setattr(palette_lib, "load_for_run", None)  # the live palette, never re-read
  handed = []

  def in_training(live):
    handed.append((live, eval_tasks.InTraining(config, workdir, live)))
    return handed[-1][1]

  train.train_and_evaluate(config, workdir, in_training)
  monkeypatch.undo()
  assert built == [4]  # built at its first step, reused at step 8
  live, (probe_task,) = handed[0][0], handed[0][1].tasks["digits"]
  assert isinstance(probe_task, evaluators.LinearProbe)
  run = probe_task.data.run
  assert run.mesh is live.mesh and run.model is live.model  # the training run's own
  assert run.palette is live.palette and run.config.dataset == "digits"
  assert raw_splits == ["train", "validation", "test"]  # the baseline is fit once
  rows = metrics_by_step(workdir)
  for step in (4, 8):
    for layer in (2, 4):
      assert 0.1 < rows[step][f"probe/digits/layer{layer}/test_acc"] <= 1.0
    assert rows[step]["probe/digits/best_test_acc"] in (
        rows[step]["probe/digits/layer2/test_acc"], rows[step]["probe/digits/layer4/test_acc"])
  assert "probe/digits/best_test_acc" not in rows[2]  # only on its own steps
  step8 = os.path.join(workdir, "evals", "digits", "step8")
  assert os.path.exists(os.path.join(step8, "linear_probe.json"))
  assert not os.path.exists(os.path.join(step8, "features"))  # dropped after use
  offline = quickstart(total_steps=8, **{f"eval.{k}": v for k, v in probe_settings.items()})
  lp = eval_tasks.evaluate(offline, workdir)["linear_probe"]
  for layer in (2, 4):
    assert lp["layers"][str(layer)]["test_acc"] == rows[8][f"probe/digits/layer{layer}/test_acc"]
  assert lp["concat"]["layers"] == [2, 4]
  assert lp["concat"]["test_acc"] == rows[8]["probe/digits/concat/test_acc"]
  assert 0.1 < rows[4]["probe/digits/concat/test_acc"] <= 1.0
  assert (rows[4]["probe/digits/raw_pixel_test_acc"] == rows[8]["probe/digits/raw_pixel_test_acc"]
          == lp["raw_pixel_test_acc"])


def test_a_failing_in_training_evaluator_is_skipped_after_the_checkpoint(tmp_path, capsys,
                                                                         monkeypatch):
  """An evaluator whose dataset cannot be opened stops the run before the first step, naming
  its config.evals field. One that fails at run time is reported in one line and skipped; the
  checkpoint due at the same step is already written and training goes on."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from conftest import metrics_by_step  # pylint: disable=g-import-not-at-top
  from igpt_jax import errors  # pylint: disable=g-import-not-at-top
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = quickstart(total_steps=6, checkpoint_every_steps=3, log_every_steps=3,
                      eval_every_steps=6, warmup_steps=2)
  config.evals.broken = ml_collections.ConfigDict(dict(
      every_steps=3, tasks="bits_per_dim", dataset=str(tmp_path / "no_such_folder")))
  in_training = functools.partial(eval_tasks.InTraining, config, workdir)
  with pytest.raises(ValueError, match="no evaluators were handed"):
    train.train_and_evaluate(config, workdir)
  with pytest.raises(errors.UserError, match="in-training evaluator config.evals.broken: its "
                                             "dataset .*no_such_folder.* cannot be opened"):
    train.train_and_evaluate(config, workdir, in_training)
  assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
      os.path.join(workdir, "checkpoints"))
  config.evals.broken.dataset = ""  # the training data: opens; now it fails at run time

  def fails(self, params, step, out_dir):
    raise RuntimeError("the evaluation broke")

  monkeypatch.setattr(evaluators.BitsPerDim, "run", fails)
  train.train_and_evaluate(config, workdir, in_training)
  out = capsys.readouterr().out
  assert ("evaluator broken failed at step 3 and was skipped (RuntimeError: the evaluation "
          "broke)") in out
  assert "evaluator broken failed at step 6" in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert sorted(metrics_by_step(workdir)) == [3, 6]


def test_masked_pixel_predictions_average_a_mask_ensemble():
  """Masked-pixel models are tested as they were fine-tuned: the mean class log-probabilities
  over `ensemble` random masks, the same masks for the same seed."""
  from igpt_jax import finetune  # pylint: disable=g-import-not-at-top
  from igpt_jax import objectives  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig(vocab_size=16, seq_len=64, num_layers=2, width=32, num_heads=4,
                              causal=False)
  m = model_lib.IGPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (6, 64), 0, 16)
  params = {"model": jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
      m.init(jax.random.PRNGKey(2), tokens)["params"]),
            "head": {"w": jax.random.normal(jax.random.PRNGKey(3), (32, 5)),
                     "b": jnp.zeros(5)}}
  batch = {"tokens": tokens, "label": jnp.zeros(6, jnp.int32), "mask": jnp.ones(6, bool)}
  kw = dict(model=m, objective="masked_pixel", mask_prob=0.15, seed=7)
  pred, _, _ = finetune.predict_step(params, batch, ensemble=4, **kw)
  again, _, _ = finetune.predict_step(params, batch, ensemble=4, **kw)
  np.testing.assert_array_equal(pred, again)
  by_hand = []
  for k in range(4):
    keep = objectives.keep_mask_for("masked_pixel", jax.random.fold_in(jax.random.PRNGKey(7), k),
                                    tokens.shape, 0.15)
    feats = m.apply({"params": params["model"]}, tokens, keep, output="features")
    by_hand.append(jax.nn.log_softmax(finetune.class_logits(params["head"], feats[:, -1])))
  np.testing.assert_array_equal(pred, jnp.argmax(jnp.mean(jnp.stack(by_hand), 0), -1))
  assert not np.allclose(by_hand[0], by_hand[1])  # different masks, different logits


PROBE_MEMORY_SCRIPT = r"""
import json, sys
import numpy as np
from igpt_jax import probe

def kib(field):  # VmRSS: resident now; VmHWM: the peak since the last reset
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
path, solver = sys.argv[1], sys.argv[2]
x = np.load(path, mmap_mode="r")
n, d = x.shape
y = np.random.default_rng(0).integers(0, 10, n).astype(np.int32)
tr, va = slice(0, n - 2000), slice(n - 2000, n)
# Compile the solver first on a small slice, so that only the fit's own arrays are measured.
probe.fit_and_select((x[:3000], y[:3000]), (x[va], y[va]), (x[va], y[va]), num_classes=10,
                     l2_grid=(1e-3,), solver=solver, max_iters=5, sgd_epochs=1)
base = kib("VmRSS") * 1024
with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak to what is resident now
  f.write("5")
r = probe.fit_and_select((x[tr], y[tr]), (x[va], y[va]), (x[va], y[va]), num_classes=10,
                         l2_grid=(1e-3,), solver=solver, max_iters=20, sgd_epochs=1,
                         max_host_bytes=1e12)
peak = kib("VmHWM") * 1024
print("MEM" + json.dumps({"grown": peak - base, "f32": 4.0 * (n - 2000) * d,
                          "streamed": r.streamed}))
"""


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_in_memory_probe_peak_is_what_the_host_budget_assumes(tmp_path, solver):
  """eval.max_host_gib decides between fitting in memory and streaming from disk by the peak
  an in-memory fit reaches, IN_MEMORY_PEAK_FACTOR x the float32 training features. Measured
  here (the peak resident memory of the fit, from a reset high-water mark, float16 features on
  disk): within that factor, and above the 2x the rule used to assume."""
  n, d = 42_000, 768  # 123 MB of float32 training features
  rng = np.random.default_rng(1)
  x = np.lib.format.open_memmap(str(tmp_path / "f.npy"), "w+", np.float16, (n, d))
  for a, b in probe.chunks(n, 10_000):
    x[a:b] = rng.normal(size=(b - a, d))
  x.flush()
  del x
  m = run_on_fake_devices(PROBE_MEMORY_SCRIPT, str(tmp_path / "f.npy"), solver, tag="MEM",
                          devices=1)
  assert not m["streamed"]
  ratio = m["grown"] / m["f32"]
  assert 2.0 < ratio <= probe.IN_MEMORY_PEAK_FACTOR, ratio


def test_linear_probe_json_says_which_solver_the_layers_used(trained_quickstart, tmp_path):
  """Features over eval.max_host_gib are fit by streamed SGD whatever probe_solver asks: the
  top of linear_probe.json says so (and what was asked), as each layer's record does."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_quickstart, workdir, ignore=shutil.ignore_patterns("eval"))
  config = quickstart(workdir, **{"eval.tasks": "linear_probe", "eval.layers": "2",
                                  "eval.max_host_gib": 1e-6, "eval.probe_sgd_epochs": 1,
                                  "eval.raw_pixel_baseline": False})
  lp = eval_tasks.evaluate(config, workdir)["linear_probe"]
  assert lp["layers"]["2"]["solver"] == "sgd" and lp["layers"]["2"]["streamed"]
  assert lp["solver"] == "sgd" and lp["solver_requested"] == "lbfgs"
