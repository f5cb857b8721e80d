"""The ablation launcher: every setting's config, a real run of two settings that resumes
and never reruns what finished, and the report from the CSV."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import ablations, report
from f8net_jax import run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION = str(ROOT / "configs" / "fashion_mnist_resnet20_f8.py")
IMAGENET = str(ROOT / "configs" / "imagenet_resnet18_f8.py")


def build(setting, base=FASHION, **kwargs):
    return ablations.build_config(setting, 1, base=base, fp_base="", workdir="/runs", **kwargs)


@pytest.mark.parametrize("setting", list(ablations.SETTINGS))
def test_every_setting_is_a_valid_config_of_the_base(setting):
    config = build(setting, fp_epochs=3, f8_epochs=1, sets=["train_examples=2000"])
    check = config.copy_and_resolve_references()
    check.init_from = ""
    run_config.check_config(check)
    assert config.seed == 1 and config.train_examples == 2000
    from_fp, overrides = ablations.SETTINGS[setting]
    assert config.init_from == ("/runs/fp/seed1" if from_fp else "")
    assert config.quant.mode == ("float" if setting == "fp" else "fixed")
    for path, value in overrides.items():
        node = config
        for part in path.split("."):
            node = node[part]
        assert node == value, path
    epochs = {"fp": 3, "f8_scratch": 4}.get(setting, 1)
    if setting == "tiny_ft":
        assert config.num_train_steps == 100 and config.learning_rate == 0.0
    else:
        assert config.num_epochs == epochs and config.num_train_steps == -1


def test_the_imagenet_base_takes_its_fp_config_and_the_paper_budget():
    fp, f8, scratch = build("fp", IMAGENET), build("f8", IMAGENET), build("f8_scratch", IMAGENET)
    assert (fp.learning_rate, fp.quant.mode, fp.num_epochs) == (0.05, "float", 150)
    assert (f8.learning_rate, f8.quant.mode, f8.num_epochs) == (0.1, "fixed", 150)
    assert (scratch.learning_rate, scratch.num_epochs) == (0.05, 300)
    assert f8.dataset == "imagenet2012" and f8.batch_size == 2048


@pytest.mark.parametrize("kwargs, match", [
    (dict(sets=["quant.no_such_field=1"]), "config field 'quant.no_such_field' does not exist"),
    (dict(sets=["batch_size"]), "--set needs field=value"),
    (dict(sets=["quant.clipping=maybe"]), "quant.clipping=maybe: expected a bool"),
    (dict(base="configs/missing.py"), "config file 'configs/missing.py' does not exist"),
])
def test_bad_launcher_input_names_the_culprit(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build("f8", **kwargs)


def launch(workdir, *extra):
    args = [sys.executable, "-m", "experiments.ablations", f"--base={FASHION}",
            f"--workdir={workdir}", "--seeds=0", "--fp_epochs=1", "--f8_epochs=1",
            "--set=dataset=synthetic", "--set=image_size=8", "--set=channels=1",
            "--set=synthetic_train_size=64", "--set=synthetic_eval_size=32",
            "--set=batch_size=16", *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_launcher_records_resumes_and_never_reruns_a_finished_run(tmp_path):
    results = tmp_path / "results.csv"
    out = launch(tmp_path, "--settings=fp,f8_no_sharing", f"--results={results}")
    assert out.returncode == 0, out.stderr[-3000:]
    table = rows(results)
    assert [(r["setting"], r["seed"]) for r in table] == [("fp", "0"), ("f8_no_sharing", "0")]
    fixed = table[1]
    # The integer program of the fixed-point model gives the simulation's top-1, exactly.
    assert fixed["integer_exact"] == "True" and fixed["integer_top1"] == fixed["top1"]
    result = json.load(open(tmp_path / "f8_no_sharing" / "seed0" / "result.json"))
    assert result["config"]["quant"]["share_alpha"] is False
    assert result["config"]["init_from"].endswith(os.path.join("fp", "seed0"))
    assert result["wall_s"] > 0 and result["machine"]["cores"] >= 1
    assert result["integer_verified_images"] > 0 and not result["resumed"]

    # A second launch skips both runs: nothing is rerun, the CSV is unchanged.
    stamp = os.path.getmtime(tmp_path / "fp" / "seed0" / "result.json")
    out = launch(tmp_path, "--settings=fp,f8_no_sharing", f"--results={results}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(rows(results)) == 2 and "finished, skipped" in out.stderr
    assert os.path.getmtime(tmp_path / "fp" / "seed0" / "result.json") == stamp

    # In one launch: a launcher killed after fp finished but before its CSV row (the row
    # comes back from result.json, without training), and an f8 run killed before it
    # finished (it resumes from its checkpoint).
    os.remove(tmp_path / "f8_no_sharing" / "seed0" / "result.json")
    with open(results, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ablations.CSV_FIELDS)
        writer.writeheader()
    out = launch(tmp_path, "--settings=fp,f8_no_sharing", f"--results={results}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fp seed 0: training in" not in out.stderr
    assert os.path.getmtime(tmp_path / "fp" / "seed0" / "result.json") == stamp
    again = json.load(open(tmp_path / "f8_no_sharing" / "seed0" / "result.json"))
    assert again["resumed"] and again["top1"] == result["top1"]
    assert [r["setting"] for r in rows(results)] == ["fp", "f8_no_sharing"]
    assert rows(results)[0]["top1"] == table[0]["top1"]

    # The report: a table and a plot from the CSV.
    report.main([f"--csv={results}"])
    text = (tmp_path / "results.md").read_text()
    assert "| fp | 1 |" in text and "| f8_no_sharing | 1 |" in text and "yes, every seed" in text
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_launcher_refuses_unknown_settings_and_runs_without_their_fp(tmp_path):
    out = launch(tmp_path, "--settings=f8,f8_magic")
    assert out.returncode != 0 and "unknown setting(s) ['f8_magic']" in out.stderr
    out = launch(tmp_path, "--settings=f8")
    assert out.returncode != 0 and "include 'fp' in --settings" in out.stderr
    assert not (tmp_path / "f8").exists()


def test_report_summarizes_mean_and_sample_std_per_setting(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("setting,seed,top1,integer_top1,integer_exact,wall_s\n"
                    "fp,0,90.00,,,10\nfp,1,92.00,,,10\n"
                    "f8,0,91.00,91.00,True,10\nf8,1,91.50,91.50,True,10\n")
    summary = report.summarize(rows(path))
    assert summary[0][:3] == ("fp", 2, 91.0) and abs(summary[0][3] - 2 ** 0.5) < 1e-9
    assert summary[1][0] == "f8" and summary[1][4] == 91.25 and summary[1][5] is True
    table = report.markdown(summary)
    assert "| fp | 2 | 91.00 ± 1.41 | - | - |" in table
    assert "| f8 | 2 | 91.25 ± 0.35 | 91.25 | yes, every seed |" in table
