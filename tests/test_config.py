"""The settings: every field declares its help, check and resume rule; the command line, the
config files and the API all go through them."""
from __future__ import annotations

import dataclasses
import json

import pytest

from hpcfl import cli
from hpcfl.config import FIELDS, IGNORE, MODES, MUST, WARN, Config, check_fields, resolve_defaults
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
    cli.train_parser().print_help()
    text = " ".join(capsys.readouterr().out.split())
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "(default: 12)" in text and "(default: 0.05)" in text and "(default: auto)" in text


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
    with pytest.raises(UsageError, match="--epochs"):
        cli.parse_config(["--config", str(tmp_path / "typed.toml")], world_size=1)


def test_config_json_of_a_run_feeds_back_and_holds_only_its_mode(tmp_path):
    cfg = resolve_defaults(Config(mode="fl", rounds=7))
    d = json.loads(cfg.to_json(this_mode_only=True))
    assert "rounds" in d and "batch_size" not in d and "epochs" not in d and d["server_lr"] == 1.0
    (tmp_path / "config.json").write_text(cfg.to_json(this_mode_only=True))
    again = cli.parse_config(["--config", str(tmp_path / "config.json")])
    assert again == cfg
    assert "rounds" not in json.loads(Config().to_json(this_mode_only=True))


def test_each_server_optimizer_has_its_own_default_learning_rate():
    assert resolve_defaults(Config(server_opt="fedadam")).server_lr == 0.01
    assert resolve_defaults(Config(server_opt="fedavg")).server_lr == 1.0
    assert resolve_defaults(Config(server_opt="fedadam", server_lr=0.5)).server_lr == 0.5
    assert dataclasses.replace(Config(), server_lr=None).server_lr is None
