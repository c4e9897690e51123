"""The settings: every field declares its help, check and resume rule; the command line, the
config files and the API all go through them."""
from __future__ import annotations

import json

import pytest

from hpcfl import cli
from hpcfl.config import DP_DEFAULTS, DP_SGD_BUDGETS, FIELDS, IGNORE, MODES, MUST, WARN, Config, check_fields
from hpcfl.errors import UsageError


def test_every_setting_is_classified_for_resume_in_every_mode():
    for name, f in FIELDS.items():
        rules = f.metadata["resume"]
        assert set(rules) == set(MODES), name
        assert all(r in (MUST, WARN, IGNORE) for r in rules.values()), name
        assert f.metadata["help"], name
        assert set(f.metadata["modes"]) <= set(MODES) and f.metadata["modes"], name


def test_seed_and_data_settings_must_match_in_fl():
    for name in ("seed", "num_clients", "client_fraction", "partition", "alpha", "dataset", "hidden", "mode"):
        assert FIELDS[name].metadata["resume"]["fl"] == MUST, name
    assert FIELDS["optimizer"].metadata["resume"]["fl"] == IGNORE   # fl clients use plain SGD


def test_help_lists_every_option_with_its_default(capsys):
    parser = cli.train_parser()
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    for name, _f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    # each option's own help (argparse wraps lines at hyphens when it prints them)
    text = " ".join(a.help.replace("%%", "%") for a in parser._actions if a.help)
    assert "(default: 12; with --dp-sgd --dp-epsilon E: 60 for E <= 1, 60 for 1 < E <= 4, 240 for E > 4; " \
           "60 with --dp-noise)" in text
    assert "(default: 0.05; with --dp-sgd --dp-epsilon E: 20.0; 20.0 with --dp-noise)" in text
    assert "(default: none; with --dp-sgd --dp-epsilon E: 60 for E <= 1, 100 for 1 < E <= 4, 60 for E > 4)" in text
    assert "(default: auto)" in text


def test_float_options_refuse_inf_and_nan():
    for name, f in FIELDS.items():
        if "float" in str(f.type) and f.metadata["check"] is not None:
            for bad in (float("inf"), float("nan")):
                with pytest.raises(UsageError, match="--" + name.replace("_", "-")):
                    check_fields(Config(**{name: bad}))


def test_config_files_and_options_merge_with_options_winning(tmp_path):
    (tmp_path / "c.toml").write_text('epochs = 3\nbatch-size = 256\nhidden = [64, 32]\nlr = 0.2\n')
    cfg = cli.parse_config(["--config", str(tmp_path / "c.toml"), "--lr", "0.1"])
    assert (cfg.epochs, cfg.batch_size, cfg.hidden, cfg.lr) == (3, 256, (64, 32), 0.1)
    (tmp_path / "bad.toml").write_text("epoch = 3\n")
    with pytest.raises(UsageError, match="unknown setting 'epoch'"):
        cli.parse_config(["--config", str(tmp_path / "bad.toml")])
    (tmp_path / "typed.toml").write_text('epochs = "many"\n')
    with pytest.raises(UsageError, match=r"typed.toml: epochs = 'many' is str: expected an integer$"):
        cli.parse_config(["--config", str(tmp_path / "typed.toml")], world_size=1)


def test_config_json_of_a_run_feeds_back_and_holds_only_its_mode(tmp_path):
    cfg = Config(mode="fl", rounds=7)
    d = json.loads(cfg.to_json(this_mode_only=True))
    assert "rounds" in d and "batch_size" not in d and "epochs" not in d and d["server_lr"] == 1.0
    (tmp_path / "config.json").write_text(cfg.to_json(this_mode_only=True))
    again = cli.parse_config(["--config", str(tmp_path / "config.json")])
    assert again == cfg
    assert "rounds" not in json.loads(Config().to_json(this_mode_only=True))


def test_each_server_optimizer_has_its_own_default_learning_rate():
    assert Config(server_opt="fedadam").server_lr == 0.01
    assert Config(server_opt="fedavg").server_lr == 1.0
    assert Config(server_opt="fedadam", server_lr=0.5).server_lr == 0.5
    assert Config(server_opt="fedadam").replace(server_opt="fedavg").server_lr == 1.0   # derived again


def test_dp_defaults_apply_to_the_settings_not_given():
    # --dp-sgd / --dp-epsilon alone: the tuned settings of benchmarks/PRIVACY.md (DP_DEFAULTS)
    plain, private = Config(), Config(dp_sgd=True, dp_epsilon=2)
    assert (plain.batch_size, plain.lr, plain.momentum, plain.epochs, plain.dp_clip) == (128, 0.05, 0.9, 12, None)
    assert plain.dp_pca is None
    # with a budget, the settings of its range (DP_SGD_BUDGETS: DP-PCA's among them); with --dp-noise
    # (no budget to size DP-PCA's noise from), DP_DEFAULTS["dp"] and no DP-PCA
    for eps in (0.5, 1.0, 2, 4.0, 8, 100):
        settings = next(s for upper, s in DP_SGD_BUDGETS if eps <= upper)
        for name, value in settings.items():
            assert getattr(Config(dp_sgd=True, dp_epsilon=eps), name) == value, (eps, name)
    by_noise = Config(dp_sgd=True, dp_noise=1.0)
    for name, value in DP_DEFAULTS["dp"].items():
        assert getattr(by_noise, name) == value, name
    assert by_noise.dp_pca is None and private.dp_pca == DP_SGD_BUDGETS[1][1]["dp_pca"]
    assert Config(dp_sgd=True, lr=1.0, dp_clip=3.0).lr == 1.0 and Config(dp_sgd=True, dp_clip=3.0).dp_clip == 3.0
    fl = Config(mode="fl", dp_epsilon=8, num_clients=6000, client_fraction=0.05)
    assert (fl.server_opt, fl.server_lr, fl.local_lr, fl.dp_clip) == ("fedavgm", 1.0, 0.1, 0.2)
    # the server step shrinks with fewer expected clients per round (the noise of the step held)
    assert Config(mode="fl", dp_epsilon=8, num_clients=1000, client_fraction=0.05).server_lr == pytest.approx(50 / 300)
    assert Config(mode="fl", dp_epsilon=8, num_clients=1000, client_fraction=0.05, server_lr=0.7).server_lr == 0.7
    assert Config(mode="fl", num_clients=1000, client_fraction=0.05).server_lr == 1.0        # no DP
    assert Config(mode="fl").server_opt == "fedavg" and Config(mode="fl").dp_clip is None
    assert Config(mode="fl", dp_epsilon=8, server_opt="fedadam").server_lr == 0.01   # its own default
    assert Config(mode="fl", dp_noise=1.0, local_lr=0.1).local_lr == 0.1
    # replace() derives the settings that were not given again, and keeps the given ones
    assert private.replace(dp_sgd=False).lr == 0.05 and Config(lr=0.3).replace(dp_sgd=True).lr == 0.3
    assert fl.replace(dp_epsilon=None).server_opt == "fedavg"
    # the CLI gets the same, and the help says so
    assert cli.parse_config(["--dp-sgd", "--dp-epsilon", "2"]) == private
    lr_help = next(a.help for a in cli.train_parser()._actions if "--lr" in a.option_strings)
    assert "(default: 0.05; with --dp-sgd --dp-epsilon E: 20.0; 20.0 with --dp-noise)" in lr_help
