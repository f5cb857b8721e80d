"""The training system: data parallelism, checkpoints and resume, logging, bad input."""

import dataclasses
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import optax
import pytest

from f8net_jax.configs import default, smoke
from f8net_jax import data as data_lib
from f8net_jax import checkpoints, run_config, steps, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(args, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.xdist_group("cpu_devices")  # one multi-device process at a time
@pytest.mark.slow  # four devices on two cores: XLA:CPU stalls it for minutes when busy
@pytest.mark.parametrize("mode", ["float", "fixed"])
def test_pmap_over_four_devices_matches_one_device(mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    for attempt in range(2):
        out = subprocess.run([sys.executable, "tests/scripts/pmap_equivalence.py", mode],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        # XLA:CPU's own stall of 4 devices on a busy 2-core machine (f8net_jax/runtime.py)
        # ends the process at a collective; it says nothing of our step: run once more.
        if out.returncode == 0 or "rendezvous" not in out.stderr:
            break
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["params_moved"] > 1e-3
    for step in report["steps"]:
        # Formats come from statistics over the global batch: identical on every split.
        assert step["quant_stats"] == 0.0
    if mode == "float":
        for step in report["steps"]:
            assert step["params"] < 1e-5 and step["batch_stats"] < 1e-5, report
    else:
        # Fixed point is discontinuous: an ulp of difference in a batch statistic can move a
        # weight across a rounding tie. After one step the parameters still agree closely.
        assert report["steps"][0]["params"] < 1e-2, report


def test_several_cpu_devices_compute_on_their_own_threads_and_wait_longer():
    from f8net_jax import runtime

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=99"}
    added = runtime.configure_cpu_devices(env)
    assert "--xla_cpu_multi_thread_eigen=false" in added
    # What the user set is kept, and nothing is added twice.
    assert env["XLA_FLAGS"].count("terminate_timeout_seconds") == 1
    assert "terminate_timeout_seconds=99" in env["XLA_FLAGS"]
    assert runtime.configure_cpu_devices(env) == []
    single = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert runtime.configure_cpu_devices(single) == [] and "eigen" not in single["XLA_FLAGS"]
    assert runtime.configure_cpu_devices({}) == []
    # XLA aborts on a flag it does not know: these start a backend with four devices.
    out = run_script(["-c", "from f8net_jax import runtime; runtime.configure_cpu_devices(); "
                            "import jax; print(jax.device_count())"],
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.stdout.split()[-1] == "4"


@pytest.mark.slow
@pytest.mark.xdist_group("cpu_devices")
def test_a_device_a_minute_and_a_half_late_does_not_abort_the_process():
    # XLA's own limit aborts after about a minute.
    out = run_script(["tests/scripts/late_device.py", "90"],
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["seconds"] > 70, report


def small_config(**overrides):
    config = default.get_config()
    config.dataset = "synthetic"
    config.channels = 1
    config.image_size = 8
    config.batch_size = 16
    config.synthetic_train_size = 96   # 6 steps per epoch
    config.synthetic_eval_size = 24
    config.num_epochs = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.quant.rescale_classifier = False
    config.learning_rate = 0.05
    for key, value in overrides.items():
        config[key] = value
    return config


def latest_params(workdir):
    restored, step = checkpoints.restore_latest(workdir, move_aside=False)
    return step, restored


def killed_at(data, steps):
    """The same data, whose training stream dies after ``steps`` batches, like a killed job."""
    left = [steps]

    def train_batches(epoch, start=0):
        for batch in data.train_batches(epoch, start):
            if left[0] == 0:
                raise KeyboardInterrupt("killed")
            left[0] -= 1
            yield batch

    return dataclasses.replace(data, train_batches=train_batches)


def make_data(config):
    return data_lib.create(config, local_devices=jax.local_device_count())


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint_with_the_same_data_order(tmp_path):
    config = small_config()
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config, straight)
    killed = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, killed, data=killed_at(make_data(config), 7))
    step, _ = latest_params(killed)
    assert step == 6  # checkpoints at 4 and at the end of epoch 1 (6)
    train.train_and_evaluate(config, killed)
    (s1, a), (s2, b) = latest_params(straight), latest_params(killed)
    assert s1 == s2 == 12
    for col in ("params", "batch_stats", "quant_stats"):
        for x, y in zip(jax.tree_util.tree_leaves(a[col]), jax.tree_util.tree_leaves(b[col])):
            np.testing.assert_array_equal(x, y)


def test_smoke_run_writes_checkpoints_events_and_formats_and_does_not_retrain(tmp_path):
    workdir = str(tmp_path / "smoke")
    result = train.train_and_evaluate(smoke.get_config(), workdir)
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and np.isfinite(result["eval_loss"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    formats = json.load(open(os.path.join(workdir, "formats.json")))
    assert formats["step"] == 12
    assert formats["layers"]["stem"]["input_fraclen"] == 8.0
    assert 0 <= formats["layers"]["classifier"]["weight_fraclen"] <= 7
    assert json.load(open(os.path.join(workdir, "config.json")))["dataset"] == "mnist5k"
    stamp = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))}
    again = train.train_and_evaluate(smoke.get_config(), workdir)
    assert again["eval_accuracy"] == result["eval_accuracy"]
    assert {p: os.path.getmtime(p) for p in stamp} == stamp
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    train.train_and_evaluate(small_config(num_train_steps=4, checkpoint_every_steps=2), workdir)
    # The same run continued with an exploding learning rate.
    config = small_config(num_train_steps=8, checkpoint_every_steps=1, log_every_steps=1,
                          learning_rate=1e30)
    with pytest.raises(FloatingPointError) as error:
        train.train_and_evaluate(config, workdir)
    match = re.fullmatch(r"(training loss is (nan|inf)|non-finite values in \S+) at step (\d+): "
                         r"stopping; the last good checkpoint \(step (\d+)\) is kept in (.*)",
                         str(error.value))
    assert match, str(error.value)
    failed, kept = int(match.group(3)), int(match.group(4))
    assert 4 <= kept < failed <= 8
    assert checkpoints.steps(workdir)[-1] == kept
    for step in checkpoints.steps(workdir):
        restored = checkpoints.restore(workdir, step)  # verifies its digest
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(restored))


def test_fixed_point_run_initialized_from_a_float_run(tmp_path):
    float_dir = str(tmp_path / "fp")
    config = small_config(num_epochs=1)
    config.quant.mode = "float"
    train.train_and_evaluate(config, float_dir)
    _, fp_state = latest_params(float_dir)
    f8 = small_config(num_train_steps=1, learning_rate=0.0, init_from=float_dir)
    model = steps.create_model(f8, 10)
    state = steps.create_train_state(jax.random.PRNGKey(1), f8, model, (8, 8, 1),
                                     optax.constant_schedule(0.0))
    state = train._init_from(state, f8, float_dir)
    ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.params))
    theirs = flax.traverse_util.flatten_dict(fp_state["params"])
    assert set(ours) == set(theirs)  # float with clipping: the same tree, alphas included
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_training_runs_without_tensorflow(tmp_path):
    out = run_script(["tests/scripts/train_without_tensorflow.py", str(tmp_path / "no_tf")])
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= report["result"]["eval_accuracy"] <= 1.0
    assert {"checkpoints", "metrics.jsonl", "formats.json"} <= set(report["files"])
    lines = [json.loads(l) for l in open(tmp_path / "no_tf" / "metrics.jsonl")]
    assert any("train_loss" in l for l in lines) and any("eval_accuracy" in l for l in lines)


def test_learning_rate_follows_the_official_rule():
    config = default.get_config()
    config.learning_rate, config.batch_size, config.warmup_epochs = 0.1, 2048, 5
    lr = steps.learning_rate_fn(config, steps_per_epoch=10, total_steps=150)
    assert float(lr(0)) == pytest.approx(0.1)            # starts from the unscaled value
    assert float(lr(25)) == pytest.approx(0.45)          # linear warm-up, halfway
    assert float(lr(50)) == pytest.approx(0.8)           # peak: 0.1 * 2048 / 256
    assert float(lr(100)) == pytest.approx(0.4)          # cosine, halfway through the decay
    assert float(lr(150)) == pytest.approx(0.0, abs=1e-7)
    config.batch_size = 256
    lr = steps.learning_rate_fn(config, steps_per_epoch=10, total_steps=100)
    assert float(lr(0)) == pytest.approx(0.1) and float(lr(50)) == pytest.approx(0.05)


def test_weight_decay_scheme_excludes_depthwise_batchnorm_and_alpha():
    params = {"conv": {"kernel": np.zeros((3, 3, 4, 8)), "scale": np.zeros(8),
                       "bias": np.zeros(8), "input": {"alpha": np.zeros(())}},
              "dw": {"kernel": np.zeros((3, 3, 1, 8))},
              "classifier": {"kernel": np.zeros((8, 10)), "bias": np.zeros(10)}}
    mask = flax.traverse_util.flatten_dict(steps.weight_decay_mask(params, "no_depthwise_no_bn"))
    assert {"/".join(k) for k, v in mask.items() if v} == {"conv/kernel", "classifier/kernel"}
    assert all(flax.traverse_util.flatten_dict(steps.weight_decay_mask(params, "all")).values())


@pytest.mark.parametrize("field, value, error, match", [
    ("model", "vgg16", ValueError, r"config.model must be one of \['resnet18'"),
    ("optimizer", "lamb", ValueError, r"config.optimizer must be one of \['sgd', 'adam'\]"),
    ("weight_decay_scheme", "bn", ValueError, "config.weight_decay_scheme must be one of"),
    ("init_from", "/nonexistent/run", FileNotFoundError, "config.init_from .* holds no checkpoints"),
    ("quant.mode", "int4", ValueError, r"mode must be one of \['float', 'fixed'\]"),
])
def test_bad_config_values_fail_before_compiling(field, value, error, match):
    config = small_config()
    node, *rest = field.split(".")
    if rest:
        config[node][rest[0]] = value
    else:
        config[node] = value
    with pytest.raises(error, match=match):
        run_config.check_config(config)


def test_unknown_config_field_is_named():
    config = small_config()
    with config.unlocked():
        config.learning_rat = 0.1
    with pytest.raises(ValueError, match="config field 'learning_rat' does not exist"):
        run_config.check_config(config)


def test_batch_size_must_divide_over_devices():
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by the number of devices 4"):
        data_lib.synthetic(image_shape=(8, 8, 1), num_classes=2, train_size=40, eval_size=8,
                           global_batch_size=10, local_devices=4, seed=0)


def test_data_errors_name_the_field(tmp_path):
    config = small_config(dataset="mnist5k", data_dir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="data_dir .* does not exist: set --config.data_dir"):
        make_data(config)
    config = small_config(dataset="fashion_mnist_offline", fashion_mnist_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_data(config)
    config = small_config(dataset="no_such_dataset_abc")
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_abc'"):
        make_data(config)


def test_command_line_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "f8net_jax.main", "--config=configs/smoke.py",
            f"--workdir={tmp_path}"]
    for extra, message in ((["--config.learnig_rate=0.1"], "config field 'learnig_rate' does not exist"),
                           (["--config.model=resnet99"], "config.model must be one of")):
        out = subprocess.run(base + extra, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("f8net_jax: ") and message in last, out.stderr[-2000:]


def test_offline_mnist5k_and_synthetic_data_are_deterministic():
    config = small_config(dataset="mnist5k", image_size=28, batch_size=100)
    data = make_data(config)
    assert (data.train_size, data.eval_size, data.num_classes) == (4000, 1000, 10)
    first = next(data.train_batches(0, 0))
    again = next(make_data(config).train_batches(0, 0))
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["image"].dtype == np.uint8 and first["image"].shape[-3:] == (28, 28, 1)
    later = next(data.train_batches(0, 3))
    np.testing.assert_array_equal(later["label"], list(data.train_batches(0, 0))[3]["label"])
    assert not np.array_equal(next(data.train_batches(1, 0))["label"], first["label"])
    eval_labels = np.concatenate([b["label"][b["mask"]] for b in data.eval_batches()])
    assert np.bincount(eval_labels).tolist() == [100] * 10


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_offline_reads_the_idx_files():
    from f8net_jax.data import builders
    images, labels = builders.fashion_mnist_arrays(builders.FASHION_MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_a_failed_collective_is_told_from_the_runs_own_errors():
    import jax

    from f8net_jax.runtime import lost_contact

    gloo = ValueError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/"
                      "pair.cc:538] Read error [127.0.0.1]:39296: Connection reset by peer")
    assert lost_contact(gloo)
    try:
        try:
            raise jax.errors.JaxRuntimeError("INTERNAL: something")
        except jax.errors.JaxRuntimeError as e:
            raise ValueError("while saving") from e
    except ValueError as wrapped:
        assert lost_contact(wrapped)
    assert not lost_contact(ValueError("config.learning_rate must be > 0, got -1"))
    assert not lost_contact(FloatingPointError("non-finite values in params"))


@pytest.mark.slow
def test_two_processes_with_jax_distributed_survive_a_killed_process_and_resume(tmp_path):
    """Both processes train the smoke config; once the checkpoint at step 6 is written, one
    is killed: the other stops within seconds, saying so, and rerunning both resumes from
    that checkpoint and completes."""
    workdir = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def start(port):
        return [subprocess.Popen(
            [sys.executable, "-m", "f8net_jax.main", "--config=configs/smoke.py",
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={pid}", "--config.num_train_steps=18"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for pid in range(2)]

    procs = start(12000 + os.getpid() % 1000)
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / "6").is_dir():
        assert time.time() < deadline and procs[0].poll() is None, procs[0].stdout.read()[-3000:]
        time.sleep(0.2)
    procs[1].kill()
    killed = time.time()
    out = procs[0].communicate(timeout=300)[0]
    procs[1].communicate()
    assert procs[0].returncode != 0 and time.time() - killed < 120, out[-3000:]
    message = [line for line in out.splitlines() if line.startswith("f8net_jax:")]
    assert message and "lost contact with another process" in message[-1], out[-3000:]
    assert "rerun every process to resume from the last checkpoint (step" in message[-1]

    procs = start(13000 + os.getpid() % 1000)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert re.search(r"Resumed from .* at step (6|12)", outputs[0]), outputs[0][-3000:]
    assert "eval_accuracy" in outputs[0]
    assert (workdir / "checkpoints" / "18").is_dir()
    assert not (workdir / checkpoints.DAMAGED).exists()


@pytest.mark.slow
def test_two_processes_resume_from_the_newest_step_both_verified(tmp_path):
    """Two processes train to step 12 (checkpoints 6 and 12); on the rerun process 1 cannot
    read checkpoint 12 (its host's read fails, the files are intact): both resume from step
    6, the newest that every process verified, and complete."""
    workdir = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    flaky = [str(ROOT / "tests" / "scripts" / "unreadable_checkpoint.py"), "12"]

    def run(port, steps, fails=False):
        procs = [subprocess.Popen(
            [sys.executable, *(flaky if fails and pid == 1 else ["-m", "f8net_jax.main"]),
             "--config=configs/smoke.py", f"--workdir={workdir}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={pid}", f"--config.num_train_steps={steps}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for pid in range(2)]
        outputs = [p.communicate(timeout=900)[0] for p in procs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]
        return outputs

    run(14000 + os.getpid() % 1000, 12)
    assert (workdir / "checkpoints" / "12").is_dir()
    outputs = run(15000 + os.getpid() % 1000, 18, fails=True)
    assert "checkpoint at step 12 cannot be read" in outputs[1], outputs[1][-3000:]
    for out in outputs:
        assert re.search(r"Resumed from .* at step 6\b", out), out[-3000:]
    assert "the newest that all 2 processes verified" in outputs[0], outputs[0][-3000:]
    assert (workdir / "checkpoints" / "18").is_dir()
    assert (workdir / checkpoints.DAMAGED / "12").is_dir()  # kept, never deleted


@pytest.mark.parametrize("dataset", ["fashion_mnist_offline", "mnist5k"])
def test_offline_datasets_load_without_tensorflow(dataset):
    if dataset == "fashion_mnist_offline" and not os.path.exists(
            os.path.join(default.get_config().fashion_mnist_dir, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    code = (
        "import sys, json; sys.modules['tensorflow'] = None\n"
        "from f8net_jax.configs import default; from f8net_jax import data\n"
        "c = default.get_config(); c.dataset = sys.argv[1]; c.image_size = 28\n"
        "c.train_examples = 1000\n"
        "d = data.create(c, local_devices=1)\n"
        "b = next(d.train_batches(0, 0)); e = next(d.eval_batches())\n"
        "print(json.dumps([d.train_size, d.eval_size, d.num_classes, list(d.image_shape),\n"
        "                  str(b['image'].dtype), int(b['label'].max()),\n"
        "                  'tensorflow' in sys.modules and sys.modules['tensorflow'] is not None]))\n"
        "c.image_size = 32\n"
        "try:\n    data.create(c, local_devices=1)\nexcept ValueError as err:\n    print(err)\n")
    out = run_script(["-c", code, dataset])
    lines = out.stdout.strip().splitlines()
    train_size, eval_size, classes, shape, dtype, top_label, imported = json.loads(lines[-2])
    assert (train_size, classes, shape, dtype) == (1000, 10, [28, 28, 1], "uint8")
    assert eval_size == (10000 if dataset == "fashion_mnist_offline" else 1000)
    assert 0 <= top_label < 10 and not imported
    assert "config.image_size 32: without TensorFlow" in lines[-1]


def test_imagenet_configs_follow_the_official_recipes():
    """docs/METHOD.md 7: learning rates and weight decay per model; tiny fine-tuning at the
    official batch 128 on one device, grid formats, no clipping."""
    import importlib
    expected = {  # config: (model, mode, lr, weight decay scheme)
        "imagenet_resnet18_fp": ("resnet18", "float", 0.05, "all"),
        "imagenet_resnet18_f8": ("resnet18", "fixed", 0.1, "all"),
        "imagenet_mobilenet_v1_fp": ("mobilenet_v1", "float", 0.05, "all"),
        "imagenet_mobilenet_v1_f8": ("mobilenet_v1", "fixed", 0.05, "all"),
        "imagenet_mobilenet_v2_fp": ("mobilenet_v2", "float", 0.1, "no_depthwise_no_bn"),
        "imagenet_mobilenet_v2_f8": ("mobilenet_v2", "fixed", 0.1, "no_depthwise_no_bn"),
    }
    for name, (model, mode, lr, scheme) in expected.items():
        config = importlib.import_module(f"f8net_jax.configs.{name}").get_config()
        assert (config.model, config.quant.mode, config.learning_rate,
                config.weight_decay_scheme) == (model, mode, lr, scheme), name
        assert (config.batch_size, config.num_epochs, config.weight_decay) == (2048, 150, 4e-5)
        run_config.check_config(config)
    for name, num_steps, lr in (("imagenet_resnet18_tiny_finetune", 100, 0.0),
                                ("imagenet_resnet50_tiny_finetune", 500, 1e-4)):
        config = importlib.import_module(f"f8net_jax.configs.{name}").get_config()
        assert (config.batch_size, config.num_train_steps, config.learning_rate) == (
            128, num_steps, lr)
        assert (config.quant.clipping, config.quant.format_rule, config.lr_schedule) == (
            False, "grid", "constant")


def test_checkpoints_written_before_digests_still_load(tmp_path):
    import orbax.checkpoint as ocp

    config = small_config()
    model = steps.create_model(config, 10)
    lr_fn = steps.learning_rate_fn(config, 6, 12)
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (8, 8, 1), lr_fn)
    host = jax.device_get(state)
    workdir = str(tmp_path / "old")
    mngr = ocp.CheckpointManager(checkpoints.directory(workdir),
                                 options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(3, args=ocp.args.StandardSave(host))  # the layout of earlier versions
    mngr.wait_until_finished()
    mngr.close()
    restored, step = checkpoints.restore_latest(workdir, state)
    assert step == 3 and checkpoints.digest(restored) == checkpoints.digest(host)
