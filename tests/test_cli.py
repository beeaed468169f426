"""The `calm` command: every subcommand helps, validates, and fails with one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from train_worker import char_tokenizer, make_assets, write_jsonl

import calm
from calm.cli import base_dtype, main, resolve_device
from calm.eval import generate_completions, greedy_decode, mean_loss

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
    (["train", "--anchor", "a", "--augment", "b", "--train-data", "t.jsonl"], "required: --output_dir/--output-dir"),
    (["generate", "--composition", "x", "--prompt", "a", "--prompts-file", "p.txt"], "not allowed with"),
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


# ------------------------------------------------------------------------- checks before any weights load


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model's weights fails the test: what runs under it must not get that far."""
    def refuse(*args, **kwargs):
        raise AssertionError("AutoModelForCausalLM.from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--connections", "0:5"], "connections[0] anchor layer 5 is out of range: expected an integer in [-1, 1]"),
    (["--connections", "0:0;1:1"], "connections has 2 lists but there are 1 augments"),
    (["--num-heads", "3"], "num_heads=3 must divide the anchor's hidden width 32"),
    (["--every", "3"], "every=3 is invalid"),
    (["--augment-dropout", "1.5"], "augment_dropout=1.5 is invalid"),
])
def test_a_bad_composition_fails_before_any_weights_load(assets, no_weights, tmp_path, flags, message, capsys):
    bases = ["--anchor", str(assets["anchor"]), "--augment", str(assets["augment"])]
    assert main(["compose", *bases, *flags]) == 2
    assert message in capsys.readouterr().err
    assert main(["train", *bases, "--tokenizer", str(assets["tokenizer"]), "--train-data", str(assets["train"]),
                 "--output-dir", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_tokenizer_mismatch_and_an_existing_run_fail_before_any_weights_load(tmp_path, no_weights, capsys):
    assets = make_assets(tmp_path, num_examples=4, augment_tokenizer=True)
    train = ["train", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]), "--tokenizer",
             str(assets["tokenizer"]), "--train-data", str(assets["train"])]
    assert main([*train, "--output-dir", str(tmp_path / "new")]) == 2
    assert "do not share a tokenizer" in capsys.readouterr().err
    done = tmp_path / "done"
    (done / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (done / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert main([*train, "--output-dir", str(done)]) == 2
    assert "already holds checkpoints (latest checkpoint-4)" in capsys.readouterr().err
    (done / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    (done / "train_config.json").write_text("{}")  # a run that ended before its first checkpoint
    assert main([*train, "--output-dir", str(done)]) == 2
    assert f"{done} already holds a run (train_config.json)" in capsys.readouterr().err


def test_a_missing_local_path_and_a_composition_given_as_a_base_are_named(assets, composition, no_weights, capsys,
                                                                          monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    assert main(["compose", "--anchor", "./anchr", "--augment", str(assets["augment"])]) == 2
    assert capsys.readouterr().err.strip() == "calm: error: --anchor ./anchr: no such file or directory (and not a " \
                                              "Hub model id)"
    assert main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(composition)]) == 2
    assert f"--augment {composition}: this is a composition (calm_config.json), not a base model: use " \
           f"--composition {composition}" in capsys.readouterr().err
    assert main(["eval", "--composition", "../nowhere/run", "--data", str(assets["eval"])]) == 2
    assert "--composition ../nowhere/run: no such file or directory" in capsys.readouterr().err


def test_eval_checks_the_bases_it_is_given_against_the_composition_first(assets, composition, no_weights, capsys):
    assert main(["eval", "--composition", str(composition), "--anchor", str(assets["augment"]), "--tokenizer",
                 str(assets["tokenizer"]), "--data", str(assets["eval"])]) == 2
    assert "anchor does not match the saved composition: width is 16" in capsys.readouterr().err


# ------------------------------------------------------------------------------ train, eval and generate


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory) -> dict:
    """A run `calm train` made (2 steps, a checkpoint every step): its directory, flags, and what it printed."""
    out = tmp_path_factory.mktemp("run") / "run"
    argv = ["train", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]), "--tokenizer",
            str(assets["tokenizer"]), "--train-data", str(assets["train"]), "--eval-data", str(assets["eval"]),
            "--max-steps", "2", "--batch-size", "4", "--save-steps", "1", "--no-progress-bar", "--init", "random"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main([*argv, "--output-dir", str(out)]) == 0
    return {"dir": out, "argv": argv, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_train_ends_with_a_summary_and_resume_says_what_it_resumed(run, tmp_path, capsys):
    out = run["dir"]
    assert f"calm: training into {out}\n" in run["stderr"]
    summary = run["stdout"][run["stdout"].index("calm: trained 2 steps in "):]
    assert f"  composition: {out}\n" in summary and "  train_loss: " in summary and "  eval_loss: " in summary
    assert "  eval_exact_match: " in summary and "resumed" not in summary
    again = tmp_path / "again"
    shutil.copytree(out, again)
    argv = [*run["argv"], "--output-dir", str(again), "--resume"]
    argv[argv.index("--max-steps") + 1] = "3"
    assert main(argv) == 0
    captured = capsys.readouterr()
    checkpoint = again / "checkpoints" / "checkpoint-2"
    assert f"calm: training into {again}, resuming {checkpoint} (step 2 of 2, epoch 1.00)" in captured.err
    assert "calm: trained 3 steps in " in captured.out and f"  resumed from: {checkpoint}\n" in captured.out


def test_eval_writes_predictions_beside_its_metrics_with_the_runs_own_tokenizer(run, assets, capsys):
    out = run["dir"]
    # No --tokenizer, and the anchor's directory has none: the tokenizer saved with the run is the one used.
    assert main(["eval", "--composition", str(out), "--data", str(assets["eval"]), "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    saved = json.loads((out / "eval" / "eval.metrics.json").read_text())
    lines = (out / "eval" / "eval.predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    examples = [json.loads(line) for line in assets["eval"].read_text().splitlines()]
    assert saved == metrics and metrics["examples"] == len(predictions) == len(examples) == 4
    assert [(p["prompt"], p["completion"]) for p in predictions] == [(e["prompt"], e["completion"]) for e in examples]
    assert {"generated", "ended", "exact_match", "loss"} <= set(predictions[0])
    assert metrics["exact_match"] == sum(p["exact_match"] for p in predictions) / 4
    assert all(p["exact_match"] == (p["generated"].strip() == p["completion"]) for p in predictions)
    assert f"calm: wrote {out / 'eval' / 'eval.metrics.json'} and " in captured.err


def test_generate_batches_a_file_of_prompts(run, tmp_path, monkeypatch, capsys):
    out = run["dir"]
    prompts = ["12+7=", "3+4=", "40+2="]
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    jsonl_file = write_jsonl([{"prompt": p} for p in prompts], tmp_path / "prompts.jsonl")
    calls = []
    real = calm.CALMForCausalLM.generate
    monkeypatch.setattr(calm.CALMForCausalLM, "generate",
                        lambda self, *a, **k: calls.append(k["input_ids"].shape[0]) or real(self, *a, **k))
    capsys.readouterr()
    assert main(["generate", "--composition", str(out), "--prompts-file", str(text_file), "--batch-size", "2",
                 "--max-new-tokens", "3"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert calls == [2, 1]
    assert main(["generate", "--composition", str(out), "--prompts-file", str(jsonl_file), "--batch-size", "2",
                 "--max-new-tokens", "3", "--output", str(tmp_path / "out.jsonl"), "--device", "cpu"]) == 0
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == printed and [w["prompt"] for w in written] == prompts
    model = calm.CALMForCausalLM.from_pretrained(out)
    expected = generate_completions(model, model.tokenizer, prompts, 3, batch_size=2, do_sample=False)
    assert [(w["generated"], w["ended"]) for w in written] == [(c.text, c.ended) for c in expected]


def test_device_map_places_the_bases_through_from_pretrained(run, monkeypatch, capsys):
    out = run["dir"]
    argv = ["generate", "--composition", str(out), "--prompt", "12+7=", "--max-new-tokens", "3"]
    assert main([*argv, "--device", "cpu"]) == 0
    on_device = capsys.readouterr().out
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("device_map")) or real(*a, **k))
    assert main([*argv, "--device-map", "cpu"]) == 0
    assert capsys.readouterr().out == on_device and seen == ["cpu", "cpu"]
    assert main([*argv, "--device", "cpu", "--device-map", "auto"]) == 2
    assert "--device cpu and --device-map auto: give one of them" in capsys.readouterr().err


def test_eval_and_generate_use_the_tokenizer_saved_with_the_composition(assets, tmp_path, capsys):
    """A composition saved with a changed tokenizer (one more token) is read and written through it, not through
    the anchor's."""
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(["<sep>"])
    anchor = transformers.AutoModelForCausalLM.from_pretrained(assets["anchor"])
    with torch.no_grad():
        anchor.lm_head.weight.mul_(30.0)  # confident predictions: the loss depends on the tokens it reads
    anchor.save_pretrained(tmp_path / "anchor")
    anchor = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "anchor")
    augment = transformers.AutoModelForCausalLM.from_pretrained(assets["augment"])
    model = calm.compose(anchor, augment, init="random", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "composition")
    data = write_jsonl([{"prompt": "1<sep>2=", "completion": "3"}, {"prompt": "4<sep>4=", "completion": "8"}],
                       tmp_path / "sep.jsonl")
    capsys.readouterr()
    assert main(["eval", "--composition", str(tmp_path / "composition"), "--data", str(data),
                 "--max-new-tokens", "2"]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert loss == pytest.approx(mean_loss(model, tokenizer, data), rel=1e-5)
    assert abs(loss - mean_loss(model, char_tokenizer(), data)) > 0.1  # what the anchor's tokenizer would give
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1<sep>2=\n")
    assert main(["generate", "--composition", str(tmp_path / "composition"), "--prompts-file", str(prompts),
                 "--max-new-tokens", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["generated"] == greedy_decode(model, tokenizer, ["1<sep>2="], 3)[0].text


def test_device_auto_is_the_gpu_when_there_is_one_else_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert main(["generate", "--composition", "x", "--prompt", "a", "--device", "cuda"]) == 2
    assert "--device cuda: there is no CUDA device here" in capsys.readouterr().err
    assert main(["generate", "--composition", "x", "--prompt", "a", "--device", "tpu9"]) == 2
    assert "--device 'tpu9' is invalid" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert base_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert base_dtype("auto", torch.device("cpu")) == torch.float32  # --device cpu on a GPU machine


def test_train_and_eval_on_chat_data(assets, tmp_path, capsys):
    """`messages` records go through the anchor tokenizer's chat template, which is saved with the run."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    tokenizer.save_pretrained(tmp_path / "chat_tokenizer")
    chats = [{"messages": [{"role": "user", "content": f"{a}+{a}"}, {"role": "assistant", "content": str(2 * a)}]}
             for a in range(8)]
    data = write_jsonl(chats, tmp_path / "chat.jsonl")
    assert main(["train", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]), "--tokenizer",
                 str(tmp_path / "chat_tokenizer"), "--train-data", str(data), "--max-steps", "1", "--batch-size",
                 "4", "--no-progress-bar", "--output-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", "--composition", str(tmp_path / "run"), "--data", str(data)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    predictions = [json.loads(line) for line in (tmp_path / "run" / "eval" / "chat.predictions.jsonl").open()]
    assert metrics["examples"] == 8 and "exact_match" not in metrics
    assert [p["messages"] for p in predictions] == [c["messages"] for c in chats]
    turn_tokens = [len(c["messages"][1]["content"]) + 1 for c in chats]  # one token a character, then </s>
    weighted = sum(p["loss"] * n for p, n in zip(predictions, turn_tokens)) / sum(turn_tokens)
    assert metrics["loss"] == pytest.approx(weighted, rel=1e-5)  # the loss is on the assistant turns only
