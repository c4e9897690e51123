"""The conventions users bring from torchrun, Horovod, Flower and Opacus: a command line that
refuses what it would ignore, runs that never overwrite runs, --print-config, logging, TOML
errors that name the file, key and type, and one data-folder variable per data set."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys

import pytest
import tomllib
from helpers import ROOT, assert_clean_failure, needs_mnist, run_hpcfl

import hpcfl
from hpcfl import cli, config, data, log
from hpcfl.config import Config
from hpcfl.errors import UsageError


def parse(*args):
    return cli.parse_config([str(a) for a in args], world_size=2)


# ---------------------------------------------------------------- options that would be ignored

@pytest.mark.parametrize("args,words", [
    (("--mode", "fl", "--lr", 0.3), ["--lr applies to --mode dp only", "use --local-lr"]),
    (("--mode", "fl", "--epochs", 3), ["--epochs", "use --rounds"]),
    (("--mode", "fl", "--batch-size", 64), ["use --local-batch-size"]),
    (("--local-lr", 0.3), ["--local-lr applies to --mode fl only", "use --lr"]),
    (("--rounds", 5), ["use --epochs"]),
    (("--optimizer", "adam", "--momentum", 0.5), ["--momentum is not read with --optimizer adam"]),
    (("--mode", "fl", "--server-momentum", 0.5), ["--server-opt fedavgm"]),
    (("--mode", "fl", "--trim-fraction", 0.2), ["--aggregator trimmed-mean"]),
    (("--mode", "fl", "--alpha", 0.3), ["--partition dirichlet"]),
    (("--mode", "fl", "--secagg-neighbors", 4), ["--secure-agg"]),
    (("--dp-delta", 1e-6), ["without differential privacy"]),
    (("--aggregator", "median",), ["applies to --mode fl only"]),
])
def test_an_option_the_run_would_ignore_is_refused_naming_the_one_that_applies(args, words):
    with pytest.raises(UsageError) as err:
        parse(*args)
    assert err.value.exit_code == 2
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("args", [
    ("--mode", "fl", "--local-lr", 0.3), ("--optimizer", "adam"), ("--momentum", 0.5),
    ("--mode", "fl", "--server-opt", "fedavgm", "--server-momentum", 0.5),
    ("--mode", "fl", "--partition", "dirichlet", "--alpha", 0.3),
    ("--dp-sgd", "--dp-epsilon", 2, "--dp-delta", 1e-6),
    ("--mode", "fl", "--secure-agg", "--secagg-neighbors", 4, "--num-clients", 40),
])
def test_options_that_apply_pass(args):
    cfg = parse(*args)
    tokens = [str(a) for a in args]
    for i, token in enumerate(tokens):                      # each given value is the one the run uses
        if not token.startswith("--"):
            continue
        value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else True
        got = getattr(cfg, token[2:].replace("-", "_"))
        assert got is True if value is True else str(got) == value or got == type(got)(value), (token, value, got)


def test_derived_defaults_do_not_count_as_given():
    cfg = parse("--optimizer", "adam")          # momentum is derived (0.9), not given
    assert cfg.momentum == 0.9 and not cfg.given("momentum")
    assert parse("--momentum", 0.5).given("momentum")


def test_no_abbreviations_and_a_suggestion_for_a_typo():
    with pytest.raises(UsageError) as err:
        parse("--epoch", 3)
    assert "--epoch" in str(err.value) and "did you mean --epochs?" in str(err.value)


def test_every_on_off_flag_has_a_no_form():
    flags = [n for n, f in config.FIELDS.items() if f.type in ("bool", bool) and f.metadata["cli"]]
    assert "quiet" in flags and "secure_agg" in flags
    for name in flags:
        on = parse(f"--{name.replace('_', '-')}") if name in ("quiet", "overwrite") else None
        off = parse(f"--no-{name.replace('_', '-')}")
        assert getattr(off, name) is False
        if on is not None:
            assert getattr(on, name) is True


def test_the_command_line_turns_off_what_a_config_file_turned_on(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("quiet = true\nepochs = 2\n")
    assert parse("--config", path).quiet is True
    assert parse("--config", path, "--no-quiet").quiet is False


def test_each_default_is_printed_once_and_every_argument_has_help():
    text = cli.train_parser().format_help()
    for option in ("--krum-m", "--secagg-threshold", "--dp-noise-seed", "--data-dir"):
        block = text.split(option, 1)[1].split("\n  --", 1)[0]
        assert block.count("(default:") == 1, block
    for command, fn in cli.COMMANDS.items():
        if command in ("train", "info"):
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            fn(cli._NoComm(), ["--help"])
        lines = out.getvalue().split("positional arguments:")[-1].split("options:")[0]
        for line in lines.strip().splitlines():            # FILE, RUN.jsonl: each with its help
            assert len(line.split()) > 1 or not line.strip(), (command, line)


def run_cli(*args, env=None):
    """python -m hpcfl in one process (no mpirun): what a user types for the usage errors."""
    import os

    return subprocess.run([sys.executable, "-m", "hpcfl", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_version_and_the_usage_line():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"hpcfl {hpcfl.__version__}"
    usage = cli.train_parser().format_usage()
    for command in cli.COMMANDS:
        assert command in usage


@pytest.mark.parametrize("args,words", [
    (("evalute", "--model", "x"), ["unknown command 'evalute'", "did you mean evaluate?"]),
    (("nosuchcmd", "--help"), ["unknown command 'nosuchcmd'"]),
    (("evaluate", "--model", "/no/such/model"), ["--model /no/such/model: no such file"]),
    (("--config", "/no/such.toml"), ["--config /no/such.toml: cannot read it"]),
    (("--mode", "fl", "--lr", "0.3"), ["use --local-lr"]),
    (("--epoch", "3"), ["did you mean --epochs?"]),
])
def test_every_usage_error_exits_2_with_one_message(args, words):
    assert_clean_failure(run_cli(*args), 2, *words)


# ---------------------------------------------------------------- config files

def test_toml_errors_name_the_file_the_key_and_the_type(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = "3"\n')
    with pytest.raises(UsageError) as err:
        Config.from_file(path)
    assert str(path) in str(err.value) and "epochs" in str(err.value) and "integer" in str(err.value)
    assert "epochs = 3" in str(err.value)           # how to write it
    path.write_text("quiet = 1\n")
    with pytest.raises(UsageError, match="expected a boolean"):
        Config.from_file(path)
    path.write_text("hidden = [256, \"x\"]\n")
    with pytest.raises(UsageError, match=r"array of layer sizes such as \[256, 128\]"):
        Config.from_file(path)


def test_hidden_from_a_file_as_an_array_or_the_command_line_string(tmp_path):
    for text in ('hidden = [64, 32]\n', 'hidden = "64,32"\n'):
        path = tmp_path / "h.toml"
        path.write_text(text)
        assert parse("--config", path).hidden == (64, 32)


def test_print_config_loads_back_to_the_same_settings(tmp_path):
    for args in [("--dp-sgd", "--dp-epsilon", 2), ("--optimizer", "adam", "--hidden", "64"),
                 ("--mode", "fl", "--secure-agg", "--dp-epsilon", 4, "--rounds", 20)]:
        cfg = parse(*args)
        text = config.to_toml(cfg)
        assert "# derived" in text
        path = tmp_path / "printed.toml"
        path.write_text(text)
        assert parse("--config", path) == cfg
        assert Config.from_dict(tomllib.loads(text)) == cfg


def test_print_config_marks_derived_values_and_the_calibrated_noise():
    proc = run_cli("--dp-sgd", "--dp-epsilon", 2, "--print-config")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "lr = 20.0  # derived" in lines and "batch_size = 4096  # derived" in lines
    assert "dp_pca = 100  # derived" in lines
    noise = next(line for line in lines if line.startswith("# dp_noise"))
    assert "calibrated to --dp-epsilon 2" in noise
    z = float(noise.split("derived at start: ")[1].split(",")[0])
    from hpcfl.privacy import accountant as privacy

    steps = 60 * (60000 // 4096)
    prior = [(1.0, privacy.pca_noise_for(2.0, 1e-5), 1)]                      # DP-PCA's share first
    assert z == pytest.approx(privacy.calibrate_noise(4096 / 60000, steps, 1e-5, 2.0, prior=prior), rel=1e-3)


def test_config_json_keeps_what_defines_the_run_not_where_it_wrote():
    cfg = Config(out="o", metrics="m.jsonl", checkpoint_dir="ck", resume=True, quiet=True,
                 tensorboard="tb", log_file="l.log", overwrite=True)
    kept = json.loads(cfg.to_json(this_mode_only=True))
    for name in ("out", "metrics", "checkpoint_dir", "resume", "quiet", "tensorboard", "log_file", "overwrite"):
        assert name not in kept
    assert kept["lr"] == cfg.lr and kept["epochs"] == cfg.epochs


# ---------------------------------------------------------------- data folders

def test_each_catalogue_data_set_has_its_own_folder_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("HPCFL_DATA_DIR_FASHION_MNIST", str(tmp_path / "f"))
    monkeypatch.setenv("HPCFL_DATA_DIR", str(tmp_path / "m"))
    assert data.resolve_data_dir(None, "fashion-mnist") == tmp_path / "f"
    assert data.resolve_data_dir(None, "mnist") == tmp_path / "m"
    monkeypatch.setenv("HPCFL_DATA_DIR_MNIST", str(tmp_path / "m2"))
    assert data.resolve_data_dir(None, "mnist") == tmp_path / "m2"
    assert data.resolve_data_dir(str(tmp_path / "given"), "mnist") == tmp_path / "given"
    with pytest.raises(hpcfl.DataError, match="HPCFL_DATA_DIR_FASHION_MNIST"):
        from hpcfl.data import catalogue as datasets

        data.prepare_cache(tmp_path / "f", spec=datasets.get("fashion-mnist"))


# ---------------------------------------------------------------- logging

def test_the_log_levels_the_quiet_switch_and_the_file(tmp_path, capsys):
    import logging

    path = tmp_path / "run.log"
    child = logging.getLogger("hpcfl.training.federated")     # a module's logger: a child of hpcfl
    try:
        log.configure(0, "info", log_file=str(path))
        child.debug("not shown")
        child.info("an epoch line")
        child.warning("a warning")
        log.configure(0, "info", quiet=True)
        child.info("hidden by --quiet")
        child.log(log.RESULT, "final test accuracy 1%")
        log.configure(0, "info", quiet=True, show_result=False)
        child.log(log.RESULT, "hidden from a quiet API run")
        log.configure(1, "debug")                               # the rank filter: errors only
        child.info("rank 1 shows no info")
        child.warning("nor warnings")
        child.error("but its errors")
    finally:
        log.reset()
    out, err = capsys.readouterr()
    assert out == "an epoch line\nfinal test accuracy 1%\n"
    assert err == "hpcfl: warning: a warning\nhpcfl: error: but its errors\n"
    written = path.read_text().splitlines()
    assert len(written) == 2 and written[0].endswith("rank 0 INFO an epoch line")
    assert written[0][:4].isdigit() and "WARNING a warning" in written[1]


def test_a_program_keeps_its_own_logging_set_up(capsys):
    import logging

    mine = logging.StreamHandler(io.StringIO())
    log.logger.addHandler(mine)
    try:
        log.configure(0, "info")
        logging.getLogger("hpcfl.io.report").info("to my handler only")
    finally:
        log.logger.removeHandler(mine)
        log.reset()
    assert mine.stream.getvalue() == "to my handler only\n"
    assert capsys.readouterr().out == ""


@needs_mnist
def test_the_api_is_silent_on_stdout_with_quiet(capfd):
    result = hpcfl.train(Config(quiet=True, epochs=1, max_steps=5))
    assert result.test_accuracy is not None
    assert capfd.readouterr().out == ""


# ---------------------------------------------------------------- runs never replace runs

def digest(*paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@needs_mnist
def test_the_same_command_twice_keeps_the_first_runs_files(tmp_path):
    import importlib.util

    events = importlib.util.find_spec("tensorboardX") is not None     # the optional extra
    args = ["--epochs", 1, "--max-steps", 10, "--out", tmp_path / "run", "--metrics", tmp_path / "run/run.jsonl",
            *(["--tensorboard", tmp_path / "run/tb"] if events else [])]
    first = run_hpcfl(2, *args, timeout=180)
    assert first.returncode == 0, first.stderr
    files = [tmp_path / "run/run.jsonl", tmp_path / "run/model.npz", tmp_path / "run/config.json",
             *(sorted((tmp_path / "run/tb").iterdir()) if events else [])]
    before = digest(*files)
    second = run_hpcfl(2, *args, timeout=180)
    assert_clean_failure(second, 2, "holds the results of an earlier run", "--overwrite")
    assert digest(*files) == before
    again = run_hpcfl(2, *args, "--overwrite", "--seed", 1, timeout=180)
    assert again.returncode == 0, again.stderr
    assert digest(tmp_path / "run/model.npz") != before[1:2]
    assert not events or len(list((tmp_path / "run/tb").iterdir())) == 1   # the old events went too
    # the saved settings run again elsewhere, with an on/off flag turned off
    rerun = run_hpcfl(2, "--config", tmp_path / "run/config.json", "--no-quiet", "--out", tmp_path / "other",
                      timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "other/model.npz").exists() and "epoch   1" in rerun.stdout
    # ... and exported for ONNX Runtime: the same classes as hpcfl's on all 10,000 test images
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime

    exported = run_hpcfl(2, "export", "--model", tmp_path / "other", "--onnx", tmp_path / "m.onnx", timeout=120)
    assert exported.returncode == 0 and exported.stdout.count("wrote") == 1, exported.stderr
    model = hpcfl.load_model(tmp_path / "other")
    images = np.asarray(hpcfl.load_dataset("mnist").test_x).reshape(-1, 28, 28)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits, classes = session.run(["logits", "class"], {"pixels": images})
    assert np.abs(logits - model.logits(images)).max() <= 1e-4
    assert (classes == model.predict(images)).all()


def test_dp_sgd_alone_names_what_is_missing_not_a_default():
    with pytest.raises(UsageError) as err:
        parse("--dp-sgd")
    assert str(err.value).startswith("--dp-sgd needs --dp-noise Z or --dp-epsilon E")


def test_a_file_that_is_no_model_is_refused_without_numpy_offering_to_unpickle_it(tmp_path):
    path = tmp_path / "notimages.txt"
    path.write_text("hello\n")
    with pytest.raises(hpcfl.DataError) as err:
        hpcfl.load_model(path)
    assert "not an hpcfl model" in str(err.value) and "unsafe" not in str(err.value)


def test_the_console_script_names_itself():
    import shutil
    from pathlib import Path

    script = Path(sys.executable).parent / "hpcfl"
    if not script.exists():
        script = shutil.which("hpcfl")
    if script is None:
        pytest.skip("the hpcfl console script is not installed here")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: hpcfl [")


def test_the_reference_options_table_is_the_generated_one_and_lines_fit_100_columns():
    text = (ROOT / "docs" / "reference.md").read_text()
    block = text.split(cli.OPTIONS_BEGIN, 1)[1].split(cli.OPTIONS_END, 1)[0]
    assert block.strip() == cli.options_table().strip(), "run python -m hpcfl.cli options-table"
    wide = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_code = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            in_code ^= line.startswith("```")
            if len(line) > 100 and not line.startswith("|") and not in_code:
                wide.append(f"{path.name}:{number}")
    assert not wide, f"lines wider than 100 columns: {wide}"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350          # the reference is in docs/
