"""The `calm` command with missing or invalid arguments: every subcommand exits non-zero with a one-line
message and no traceback; `--debug` shows the traceback instead."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from robust_support import make_assets

import calm
from calm.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-assets")
    paths = make_assets(root, num_examples=4)
    assert main(["compose", "--anchor", str(paths["anchor"]), "--augment", str(paths["augment"]),
                 "--save", str(root / "composition")]) == 0
    paths["composition"] = root / "composition"
    return paths


def fill(argv: list[str], assets: dict, tmp_path: Path) -> list[str]:
    """Replace {anchor}, {augment}, {tokenizer}, {train}, {composition}, {tmp} placeholders."""
    names = {**{k: str(v) for k, v in assets.items()}, "tmp": str(tmp_path)}
    return [a.format(**names) for a in argv]


BASES = ["--anchor", "{anchor}", "--augment", "{augment}"]
TRAIN = [*BASES, "--tokenizer", "{tokenizer}", "--train-data", "{train}", "--output-dir", "{tmp}/run",
         "--max-steps", "1", "--no-progress-bar"]
GEN = ["--composition", "{composition}", "--tokenizer", "{tokenizer}"]

# Refused by the argument parser: exit 2, exactly one line on stderr.
PARSER_ERRORS = [
    ([], "the following arguments are required: COMMAND"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["compose"], "the following arguments are required: --anchor, --augment"),
    (["compose", "--anchor", "a"], "required: --augment"),
    (["compose", *BASES, "--num-connections", "two"], "argument --num-connections: invalid int value: 'two'"),
    (["compose", *BASES, "--every", "1.5"], "argument --every: invalid int value: '1.5'"),
    (["compose", *BASES, "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["compose", *BASES, "--init", "zeros"], "argument --init: invalid choice: 'zeros'"),
    (["compose", *BASES, "--augment-mode", "encoder"], "argument --augment-mode: invalid choice: 'encoder'"),
    (["compose", *BASES, "--connections", "a:b"], "bad connection 'a:b': expected augment_block:anchor_block"),
    (["compose", *BASES, "--connections", "1:2:3"], "bad connection '1:2:3'"),
    (["train", *BASES], "required: --output_dir/--output-dir, --train-data"),
    (["train", *TRAIN, "--precision", "bfloat16"], "argument --precision: invalid choice: 'bfloat16'"),
    (["train", *TRAIN, "--on-nan", "ignore"], "argument --on_nan/--on-nan: invalid choice: 'ignore'"),
    (["train", *TRAIN, "--max-steps", "1.5"], "argument --max_steps/--max-steps: invalid int value: '1.5'"),
    (["train", *TRAIN, "--learning-rate", "fast"],
     "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
    (["eval"], "required: --composition, --data"),
    (["eval", *GEN, "--data", "{train}", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["eval", *GEN, "--data", "{train}", "--max-new-tokens", "-1"], "expected a positive integer, got -1"),
    (["generate"], "required: --composition"),
    (["generate", *GEN, "--top-p", "0"], r"--top-p: expected float in (0.0, 1.0], got 0"),
    (["generate", *GEN, "--top-p", "1.5"], r"--top-p: expected float in (0.0, 1.0], got 1.5"),
    (["generate", *GEN, "--temperature", "-1"], "--temperature: expected float in [0.0, inf], got -1"),
    (["generate", *GEN, "--temperature", "nan"], "--temperature: expected float in [0.0, inf], got nan"),
    (["generate", *GEN, "--top-k", "-5"], "--top-k: expected int in [0, inf], got -5"),
    (["generate", *GEN, "--top-k", "many"], "--top-k: expected int in [0, inf], got 'many'"),
    (["reproduce"], "required: experiment"),
    (["reproduce", "kv-arithmetic", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
]


@pytest.mark.parametrize(("argv", "message"), PARSER_ERRORS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in PARSER_ERRORS])
def test_argument_errors_are_one_line(assets, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(fill(argv, assets, tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and "--help" in err and "Traceback" not in err


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def corrupted_composition(assets: dict, tmp_path: Path) -> str:
    import shutil

    target = tmp_path / "broken"
    shutil.copytree(assets["composition"], target)
    (target / "model.safetensors").write_bytes(b"\x00" * 10)
    return str(target)


# Refused when the command runs: exit 2, the last stderr line is the one-line error, no traceback.
RUNTIME_ERRORS = [
    (["compose", "--anchor", "{tmp}/nowhere", "--augment", "{augment}"], "nowhere: no such file or directory"),
    (["compose", *BASES, "--num-connections", "0"], "num_connections=0 is invalid: expected an integer in [1, 2]"),
    (["compose", *BASES, "--connections", "0:9"], "connections[0] anchor layer 9 is out of range"),
    (["compose", *BASES, "--every", "0"], "every=0 is invalid"),
    (["compose", *BASES, "--num-heads", "5"], "num_heads=5 must divide the anchor's hidden width 32"),
    (["compose", "--config", "{tmp}/missing.yaml"], "cannot read --config"),
    (["compose", "--config", lambda t: write(t, "c.yaml", "anchor: [")], "cannot read --config"),
    (["compose", "--config", lambda t: write(t, "c.yaml", "- a\n- b\n")], "must hold a mapping"),
    (["compose", *BASES, "--config", lambda t: write(t, "c.yaml", "dtype: float8\n")],
     "--dtype='float8' is invalid: expected one of auto, float32, bfloat16, float16"),
    (["compose", *BASES, "--config", lambda t: write(t, "c.yaml", "num_connections: 2.5\n")],
     "--num-connections=2.5 is invalid"),
    (["compose", *BASES, "--config", lambda t: write(t, "c.yaml", "init: zeros\n")], "--init='zeros' is invalid"),
    (["train", *TRAIN, "--train-data", lambda t: write(t, "bad.jsonl", '{"prompt": "1+1="}\n')],
     "bad.jsonl:1: missing key 'completion'"),
    (["train", *TRAIN, "--max-length", "0"], "TrainConfig.max_length=0 is invalid: expected > 0"),
    (["train", *TRAIN, "--batch-size", "-1"], "TrainConfig.per_device_train_batch_size=-1 is invalid"),
    (["train", *TRAIN, "--config", lambda t: write(t, "c.yaml", "precision: bfloat16\n")],
     "--precision='bfloat16' is invalid: expected one of auto, fp32, bf16, fp16"),
    (["eval", "--composition", "{tmp}/nowhere", "--data", "{train}"], "nowhere: no such file or directory"),
    (["eval", "--composition", "{tmp}", "--data", "{train}"], "calm_config.json not found"),
    (["eval", "--composition", corrupted_composition, "--data", "{train}"], "is corrupted or truncated"),
    (["eval", *GEN, "--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such data file"),
    (["eval", *GEN, "--data", lambda t: write(t, "bad.jsonl", b"\xff\n")], "bad.jsonl:1: not valid UTF-8"),
    (["generate", *GEN, "--prompt", ""], "--prompt is empty"),
    (["generate", *GEN, "--prompt", "1+1=", "--anchor", "{tmp}/nowhere"], "nowhere: no such file or directory"),
    (["generate", *GEN, "--prompts-file", lambda t: write(t, "p.jsonl", '{"text": "1+1="}\n')],
     "p.jsonl:1: expected an object with a non-empty string 'prompt'"),
    (["generate", *GEN, "--prompts-file", lambda t: write(t, "p.txt", "\n \n")], "p.txt: no prompts"),
]


def resolve(argv: list, assets: dict, tmp_path: Path) -> list[str]:
    argv = [a(tmp_path) if callable(a) and a is not corrupted_composition else a for a in argv]
    argv = [corrupted_composition(assets, tmp_path) if a is corrupted_composition else a for a in argv]
    return fill(argv, assets, tmp_path)


def assert_one_line_error(err: str, message: str, prefix: str = "calm: error: ") -> None:
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("calm")]
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0], err  # earlier lines: progress bars
    assert ours[0].startswith(prefix) and message in ours[0], ours[0]


@pytest.mark.parametrize(("argv", "message"), RUNTIME_ERRORS,
                         ids=[f"{a[0]}-{m[:30]}" for a, m in RUNTIME_ERRORS])
def test_runtime_errors_are_one_line_and_debug_shows_the_traceback(assets, tmp_path, capsys, argv, message):
    argv = resolve(argv, assets, tmp_path)
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, message)
    with pytest.raises(Exception, match=".") as raised:  # --debug: the exception itself, with its traceback
        main(["--debug", *argv])
    assert raised.traceback and not isinstance(raised.value, SystemExit)


def test_an_unexpected_failure_is_one_line_with_a_hint(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("calm.cli.cmd_info", broken)
    assert main(["info"]) == 1
    assert_one_line_error(capsys.readouterr().err, "RuntimeError: boom (rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="boom"):
        main(["info", "--debug"])


def test_a_failing_generation_reports_instead_of_hanging(assets, tmp_path, monkeypatch, capsys):
    """generate streams from a worker thread: an error there used to leave the command waiting forever."""
    def failing_generate(self, *args, **kwargs):
        raise ValueError("`top_k` has to be a strictly positive integer")

    monkeypatch.setattr(calm.CALMForCausalLM, "generate", failing_generate)
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(main(fill(["generate", *GEN, "--prompt", "1+1="], assets,
                                                                   tmp_path))), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "calm generate hangs when generation fails"
    assert codes == [2]
    assert_one_line_error(capsys.readouterr().err, "`top_k` has to be a strictly positive integer")


def test_a_scalar_where_a_list_is_expected_in_a_config_file(assets, tmp_path, capsys):
    """`augment: path` (not a list) used to be read character by character."""
    config = write(tmp_path, "c.yaml", f"anchor: {assets['anchor']}\naugment: {assets['augment']}\n")
    assert main(["compose", "--config", config, "--num-connections", "1"]) == 0
    assert "augment[0]" in capsys.readouterr().out


def test_a_runs_own_train_config_json_is_a_valid_config_file(assets, tmp_path):
    """docs/training.md promises it; before, its `train`/`model`/`data` sections were "unknown options"."""
    from calm.cli import apply_config_file, build_parser, train_config_from_args

    argv = fill(["train", *TRAIN, "--connections", "0:0,1:1", "--learning-rate", "0.003"], assets, tmp_path)
    assert main(argv) == 0
    again = apply_config_file(build_parser(), ["train", "--config", str(tmp_path / "run" / "train_config.json")])
    assert train_config_from_args(again) == train_config_from_args(apply_config_file(build_parser(), argv))
    assert (again.anchor, again.augment, again.train_data) == (str(assets["anchor"]), [str(assets["augment"])],
                                                                [str(assets["train"])])
    assert again.connections == [[[0, 0], [1, 1]]]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["format"] == "calm-run/5"


def test_a_run_record_from_a_newer_calm_is_refused(tmp_path, capsys):
    record = tmp_path / "train_config.json"
    record.write_text(json.dumps({"format": "calm-run/6", "train": {}, "model": {"connections": [[[0, 0]]]}}))
    assert main(["train", "--config", str(record)]) == 2
    assert "format 'calm-run/6' was written by a newer version of calm" in capsys.readouterr().err


def test_a_runs_record_carries_every_composition_option(assets, tmp_path):
    """A resumed or repeated run must rebuild the same composition: every option in `calm.config.OPTIONS`."""
    from calm.cli import apply_config_file, build_parser
    from calm.config import OPTIONS

    chosen = {"num_heads": 2, "qk_norm": False, "value_norm": False, "init": "random", "augment_mode": "prompt",
              "rope_theta": None, "augment_dropout": 0.25, "augment_norm": False, "composition_dtype": "bfloat16"}
    assert set(chosen) == set(OPTIONS)
    argv = fill(["train", *TRAIN, "--num-connections", "1", "--num-heads", "2", "--no-qk-norm", "--no-value-norm",
                 "--init", "random", "--augment-mode", "prompt", "--rope-theta", "none", "--augment-dropout", "0.25",
                 "--no-augment-norm", "--composition-dtype", "bfloat16"], assets, tmp_path)
    assert main(argv) == 0
    again = apply_config_file(build_parser(), ["train", "--config", str(tmp_path / "run" / "train_config.json")])
    assert {key: getattr(again, key) for key in OPTIONS} == chosen
