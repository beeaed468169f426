"""The `calm` command: every subcommand helps, validates, and fails with one line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_worker import make_assets

import calm
from calm.cli import main

SUBCOMMANDS = ["info", "compose", "train", "eval", "generate", "reproduce"]
CALM = shutil.which("calm", path=str(Path(sys.executable).parent)) or "calm"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("cli"), num_examples=8)


@pytest.fixture(scope="module")
def composition(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("composition")
    code = main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
                 "--num-connections", "2", "--init", "random", "--save", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_python_m_calm_train_is_calm_train():
    """`python -m calm.train` (what `torchrun -m calm.train` runs) takes the flags of `calm train`."""
    done = subprocess.run([sys.executable, "-m", "calm.train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--train-data" in done.stdout and "--max-steps" in done.stdout


def test_installed_command_runs_and_reports_errors_in_one_line():
    info = subprocess.run([CALM, "info"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "transformers" in info.stdout
    bad = subprocess.run([CALM, "compose", "--anchor", "no/such/model", "--augment", "x"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "no/such/model" in bad.stderr


@pytest.mark.parametrize("argv,message", [
    (["compose"], "required"),
    (["compose", "--anchor", "a", "--augment", "b", "--connections", "3-7"], "bad connection '3-7'"),
    (["compose", "--anchor", "a", "--augment", "b", "--num-connections", "2", "--every", "4"], "not allowed"),
    (["eval", "--composition", "x"], "--data"),
    (["generate", "--composition", "x", "--max-new-tokens", "0"], "positive integer"),
    (["reproduce", "table-9"], "invalid choice"),
    (["train", "--anchor", "a", "--augment", "b"], "--train-data"),
    (["frobnicate"], "invalid choice"),
])
def test_argument_errors_exit_non_zero(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(assets, capsys):
    argv = ["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]), "--num-heads", "3"]
    assert main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # earlier lines: transformers' loading progress bars
    assert last.startswith("calm: error: num_heads=3 must divide")
    with pytest.raises(ValueError, match="num_heads=3"):
        main(["--debug", *argv])


def test_augment_dropout_flag_reaches_the_saved_config_and_bad_values_are_one_line(assets, tmp_path, capsys):
    base = ["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]), "--num-connections",
            "1"]
    assert main([*base, "--augment-dropout", "0.1", "--save", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "calm_config.json").read_text())["augment_dropout"] == 0.1
    assert main([*base, "--augment-dropout", "1.5"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("calm: error: augment_dropout=1.5 is invalid")


def test_no_augment_norm_flag_reaches_the_saved_config(assets, tmp_path):
    assert main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
                 "--num-connections", "1", "--no-augment-norm", "--save", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "calm_config.json").read_text())["augment_norm"] is False


@pytest.mark.parametrize("flag, saved", [(["--augment-norm", "block"], "block"), (["--augment-norm"], True),
                                         (["--augment-norm", "none"], False)])
def test_augment_norm_flag_takes_a_mode(assets, tmp_path, flag, saved):
    assert main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
                 "--num-connections", "1", *flag, "--save", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "calm_config.json").read_text())["augment_norm"] == saved


def test_bad_augment_norm_mode_is_named(assets, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
              "--augment-norm", "layer"])
    assert exit_.value.code == 2
    assert "invalid choice 'layer': expected one of rms, block, none" in capsys.readouterr().err


def test_compose_prints_connections_and_parameter_count(assets, capsys):
    assert main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
                 "--connections", "0:0,1:1"]) == 0
    out = capsys.readouterr().out
    assert "augment block   0 -> anchor block   0" in out and "trainable params:" in out


def test_yaml_config_with_flag_override(assets, tmp_path, capsys):
    config = tmp_path / "compose.yaml"
    config.write_text(f"anchor: {assets['anchor']}\naugment: [{assets['augment']}]\nnum_connections: 1\n")
    assert main(["compose", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("-> anchor block") == 1
    assert main(["compose", "--config", str(config), "--num-connections", "2"]) == 0
    assert capsys.readouterr().out.count("-> anchor block") == 2
    config.write_text("anchor: a\nlearning_rate: 3\n")
    assert main(["compose", "--config", str(config)]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err


def test_generate_streams_a_completion(composition, assets, capsys):
    code = main(["generate", "--composition", str(composition), "--tokenizer", str(assets["tokenizer"]),
                 "--prompt", "12+7=", "--max-new-tokens", "4"])
    assert code == 0
    assert capsys.readouterr().out.endswith("\n")


def test_eval_reports_exact_match(composition, assets, capsys):
    code = main(["eval", "--composition", str(composition), "--tokenizer", str(assets["tokenizer"]),
                 "--data", str(assets["eval"]), "--max-new-tokens", "4"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["examples"] == 4 and metrics["loss"] > 0


def test_eval_on_a_bad_data_file_names_the_line(composition, assets, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="\n')
    code = main(["eval", "--composition", str(composition), "--tokenizer", str(assets["tokenizer"]),
                 "--data", str(data)])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: malformed JSON" in err and "Loading weights" not in err  # checked before any model loads


def test_version_is_exposed():
    assert calm.__version__


def test_a_composition_across_tokenizers_from_compose_to_generate(tmp_path, capsys):
    """`--augment-tokenizer` through compose, train, eval and generate; the trained run keeps both tokenizers,
    so eval and generate need neither flag."""
    assets = make_assets(tmp_path, num_examples=8, augment_tokenizer=True)
    bases = ["--anchor", str(assets["anchor"]), "--augment", str(assets["augment"])]
    assert main(["compose", *bases]) == 2
    assert "--augment-tokenizer, once per --augment" in capsys.readouterr().err
    own = ["--tokenizer", str(assets["tokenizer"]), "--augment-tokenizer", str(assets["augment_tokenizer"])]
    assert main(["compose", *bases, *own, "--augment-tokenizer", str(assets["augment_tokenizer"])]) == 2
    assert "--augment-tokenizer is given 2 time(s) for 1 --augment" in capsys.readouterr().err
    assert main(["compose", *bases, *own, "--num-connections", "1"]) == 0
    run = tmp_path / "run"
    assert main(["train", *bases, *own, "--train-data", str(assets["train"]), "--max-steps", "2",
                 "--batch-size", "4", "--no-progress-bar", "--output-dir", str(run)]) == 0
    assert (run / "augment_tokenizer_0" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["eval", "--composition", str(run), "--data", str(assets["eval"]), "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 4
    assert main(["generate", "--composition", str(run), "--prompt", "12+7=", "--max-new-tokens", "4"]) == 0
    assert main(["generate", "--composition", str(run), "--augment-tokenizer", str(assets["tokenizer"]),
                 "--prompt", "12+7="]) == 2
    assert "is not the tokenizer this composition was trained with" in capsys.readouterr().err
