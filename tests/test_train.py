"""Training compositions: options, run directory, exact and kill-proof resume, augment cache, baselines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file
from train_worker import char_tokenizer, make_assets, sum_examples, write_jsonl
from transformers import TrainerCallback

import calm
from calm.cli import train_config_from_args, train_main
from calm.data import DataError
from calm.eval import exact_match_count
from calm.train import STAGING_PREFIX, AugmentStateCache, TrainConfig, latest_checkpoint, read_metrics, train

WORKER = Path(__file__).parent / "train_worker.py"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def composed(augment_mode: str = "iterative") -> calm.CALMForCausalLM:
    anchor, augment = tiny("llama", 32, 2, 4, seed=0), tiny("qwen2", 16, 2, 2, seed=1)
    torch.manual_seed(0)
    return calm.compose(anchor, augment, augment_mode=augment_mode)


def quick(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    options = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                   save_steps=0, progress_bar=False, warmup_steps=0.25, learning_rate=1e-3)
    return TrainConfig(**{**options, **overrides})


def composition_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.composition.state_dict().items()}


class StopAt(TrainerCallback):
    """Ends training after `step` optimizer steps, as an interrupted run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class CountCalls:
    """Counts forward calls of a module (the augment's decoder) through a pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"per_device_train_batch_size": "8"}, "per_device_train_batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"lr_scheduler_type": "exponential"}, "lr_scheduler_type"),
        ({"precision": "fp8"}, "precision"),
        ({"loss_on": "prompt"}, "loss_on"),
        ({"save_steps": -5}, "save_steps"),
        ({"resume": 1}, "resume"),
        ({"adam_beta2": 1.0}, "adam_beta2"),
        ({"num_train_epochs": 0.0}, "num_train_epochs"),
        ({"deepspeed": "no/such/ds_config.json"}, "deepspeed"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**overrides)


def test_yaml_config_file_sets_options_and_flags_override(tmp_path):
    from calm.cli import apply_config_file, build_parser

    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nmax_steps: 3\nanchor: a\naugment: [b]\noutput_dir: r\n")
    base = ["train", "--train-data", "x.jsonl", "--config", str(tmp_path / "c.yaml")]
    args = apply_config_file(build_parser(), base)
    config = train_config_from_args(args)
    assert (config.learning_rate, config.max_steps, args.anchor, args.augment) == (1e-4, 3, "a", ["b"])
    assert train_config_from_args(apply_config_file(build_parser(), [*base, "--max-steps", "9"])).max_steps == 9
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['lr'\]"):
        TrainConfig.from_dict({"lr": 1.0})


# Every flag `calm train` had before TrainConfig became a TrainingArguments (calm 0.1's TrainConfig fields), a
# value for it, and the field and value it must still set.
EARLIER_FLAGS = [
    (["--num-epochs", "2"], "num_train_epochs", 2.0), (["--max-steps", "7"], "max_steps", 7),
    (["--batch-size", "3"], "per_device_train_batch_size", 3),
    (["--grad-accum-steps", "2"], "gradient_accumulation_steps", 2),
    (["--learning-rate", "0.003"], "learning_rate", 0.003), (["--weight-decay", "0.1"], "weight_decay", 0.1),
    (["--adam-beta1", "0.8"], "adam_beta1", 0.8), (["--adam-beta2", "0.99"], "adam_beta2", 0.99),
    (["--lr-scheduler", "linear"], "lr_scheduler_type", "linear"), (["--warmup-steps", "5"], "warmup_steps", 5.0),
    (["--max-grad-norm", "0.5"], "max_grad_norm", 0.5), (["--on-nan", "skip"], "on_nan", "skip"),
    (["--precision", "fp32"], "precision", "fp32"), (["--max-length", "64"], "max_length", 64),
    (["--strict-length"], "strict_length", True), (["--no-strict-length"], "strict_length", False),
    (["--loss-on", "all"], "loss_on", "all"), (["--no-append-eos"], "append_eos", False),
    (["--append-eos"], "append_eos", True), (["--no-shuffle"], "shuffle", False),
    (["--eval-steps", "4"], "eval_steps", 4.0), (["--eval-batch-size", "5"], "per_device_eval_batch_size", 5),
    (["--no-exact-match"], "exact_match", False), (["--exact-match-mode", "exact"], "exact_match_mode", "exact"),
    (["--max-new-tokens", "9"], "max_new_tokens", 9),
    (["--max-exact-match-examples", "11"], "max_exact_match_examples", 11),
    (["--save-steps", "6"], "save_steps", 6.0), (["--save-total-limit", "3"], "save_total_limit", 3),
    (["--resume"], "resume", True), (["--no-resume"], "resume", False), (["--overwrite"], "overwrite", True),
    (["--no-overwrite"], "overwrite", False), (["--logging-steps", "2"], "logging_steps", 2.0),
    (["--seed", "4"], "seed", 4), (["--cache-augment-states"], "cache_augment_states", True),
    (["--no-cache-augment-states"], "cache_augment_states", False),
    (["--augment-cache-dir", "/x"], "augment_cache_dir", "/x"), (["--num-workers", "1"], "dataloader_num_workers", 1),
    (["--no-progress-bar"], "progress_bar", False), (["--progress-bar"], "progress_bar", True),
    (["--no-tensorboard"], "tensorboard", False), (["--report-to", "none"], "report_to", []),
    (["--no-plot"], "plot", False), (["--plot"], "plot", True),
]


@pytest.mark.parametrize(("flags", "name", "expected"), EARLIER_FLAGS, ids=[f[0][0] for f in EARLIER_FLAGS])
def test_every_earlier_train_flag_still_sets_its_option(tmp_path, flags, name, expected):
    from calm.cli import apply_config_file, build_parser

    base = ["train", "--anchor", "a", "--augment", "b", "--train-data", "x.jsonl", "--output-dir", str(tmp_path)]
    config = train_config_from_args(apply_config_file(build_parser(), [*base, *flags]))
    value = getattr(config, name)
    assert getattr(value, "value", value) == expected


def test_the_fsdp_and_deepspeed_flags_are_still_there():
    from calm.cli import _subparsers, build_parser

    train = _subparsers(build_parser()).choices["train"]
    flags = {flag for action in train._actions for flag in action.option_strings}
    assert {"--fsdp-config", "--deepspeed", "--output-dir"} <= flags


def test_train_config_is_training_arguments_and_hf_argument_parser_reads_it(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    (tmp_path / "a.json").write_text(json.dumps({"output_dir": "r", "max_steps": 3, "optim": "sgd"}))
    (tmp_path / "a.yaml").write_text("output_dir: r\nmax_steps: 3\noptim: sgd\n")
    for config in (HfArgumentParser(TrainConfig).parse_json_file(tmp_path / "a.json")[0],
                   HfArgumentParser(TrainConfig).parse_yaml_file(tmp_path / "a.yaml")[0]):
        assert isinstance(config, TrainingArguments) and isinstance(config, TrainConfig)
        assert (config.max_steps, config.optim.value, config.learning_rate) == (3, "sgd", 1e-4)  # calm's default


def test_a_config_file_or_run_record_with_earlier_option_names_still_works(tmp_path):
    from calm.cli import apply_config_file, build_parser

    (tmp_path / "c.yaml").write_text("batch_size: 3\nnum_epochs: 2\nlr_scheduler: linear\noutput_dir: r\n")
    (tmp_path / "train_config.json").write_text(json.dumps({
        "format": "calm-run/5", "train": {"batch_size": 5, "grad_accum_steps": 2, "num_workers": 0,
                                          "eval_batch_size": 0, "output_dir": "r"},
        "model": {"anchor": "a", "augments": ["b"]}, "data": {"train": ["x.jsonl"]}}))
    base = ["train", "--anchor", "a", "--augment", "b", "--train-data", "x.jsonl", "--config"]
    config = train_config_from_args(apply_config_file(build_parser(), [*base, str(tmp_path / "c.yaml")]))
    assert (config.per_device_train_batch_size, config.num_train_epochs, config.lr_scheduler_type.value) == \
        (3, 2.0, "linear")
    config = train_config_from_args(apply_config_file(build_parser(), [*base, str(tmp_path / "train_config.json")]))
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps,
            config.per_device_eval_batch_size) == (5, 2, 5)
    with pytest.raises(ValueError, match=r"\('batch_size', 'per_device_train_batch_size'\)\] name the same"):
        TrainConfig.from_dict({"batch_size": 2, "per_device_train_batch_size": 2, "output_dir": "r"})


def test_a_training_arguments_option_reaches_the_trainer(tmp_path, tok):
    seen = {}

    class Optimizer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen["optimizer"], seen["clip"] = type(optimizer.optimizer if hasattr(optimizer, "optimizer")
                                                   else optimizer).__name__, args.max_grad_norm

    train(composed(), tok, sum_examples(8), config=quick(tmp_path, max_steps=1, optim="sgd", max_grad_norm=0.25),
          callbacks=[Optimizer()])
    assert seen == {"optimizer": "SGD", "clip": 0.25}


# ------------------------------------------------------------------------------------------------ a run


def test_run_directory_holds_model_config_metrics_and_curve(tmp_path, tok):
    model = composed()
    bases_before = {k: v.clone() for k, v in model.anchor.state_dict().items()}
    result = train(model, tok, sum_examples(16), sum_examples(8, seed=1),
                   quick(tmp_path, max_steps=6, eval_steps=3, save_steps=3, exact_match=True))
    run = tmp_path / "run"
    for name in ("calm_config.json", "config.json", "model.safetensors", "README.md", "train_config.json",
                 "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert not (run / "training_args.bin").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert result.global_step == 6 and result.world_size == 1 and result.tokens_per_second > 0
    assert {"eval_loss", "eval_exact_match"} <= set(result.eval_metrics)

    records = read_metrics(run / "metrics.jsonl")
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4, 5, 6]
    assert all({"learning_rate", "tokens_per_second", "grad_norm"} <= set(r) for r in train_logs)
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["data"]["train_examples"] == 16

    # Only the composition trained, and what was saved reloads onto the same bases.
    assert all(torch.equal(v, model.anchor.state_dict()[k]) for k, v in bases_before.items())
    reloaded = calm.CALMForCausalLM.from_pretrained(run, anchor=model.anchor, augments=list(model.augments))
    trained = composition_state(model)
    assert all(torch.equal(v, trained[k]) for k, v in composition_state(reloaded).items())
    assert any(v.abs().sum() > 0 for k, v in composition_state(model).items() if k.endswith("o.weight"))


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, tok):
    train(composed(), tok, sum_examples(8), config=quick(tmp_path, max_steps=2, save_steps=2))
    with pytest.raises(ValueError, match="already holds checkpoints .*resume=True"):
        train(composed(), tok, sum_examples(8), config=quick(tmp_path, max_steps=2, save_steps=2))
    result = train(composed(), tok, sum_examples(8),
                   config=quick(tmp_path, max_steps=2, save_steps=2, overwrite=True))
    assert result.resumed_from is None
    fresh = train(composed(), tok, sum_examples(8), config=quick(tmp_path, "other", max_steps=2, resume=True))
    assert fresh.resumed_from is None and fresh.global_step == 2  # nothing to resume: starts from scratch


def test_twenty_steps_equal_ten_plus_resume_plus_ten_bit_for_bit(tmp_path, tok):
    # 16 examples, micro-batch 2, accumulation 2: 4 steps per epoch, so step 10 stops mid-epoch and the
    # resumed run must replay the shuffled order, skip the consumed batches and restore every state exactly.
    options = dict(max_steps=20, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=5,
                   logging_steps=5, lr_scheduler_type="cosine", warmup_steps=3, weight_decay=0.01)
    straight = composed()
    train(straight, tok, sum_examples(16), config=quick(tmp_path, "straight", **options))

    interrupted = composed()
    first = train(interrupted, tok, sum_examples(16), config=quick(tmp_path, "resumed", **options),
                  callbacks=[StopAt(10)])
    assert first.global_step == 10
    resumed = composed()  # a new process would rebuild the model from scratch
    second = train(resumed, tok, sum_examples(16), config=quick(tmp_path, "resumed", resume=True, **options))
    assert second.resumed_from.endswith("checkpoint-10") and second.global_step == 20

    expected, got = composition_state(straight), composition_state(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert steps == [5, 10, 15, 20]


def test_checkpoints_record_the_data_position_and_resume_refuses_other_data(tmp_path, tok):
    train(composed(), tok, sum_examples(8), config=quick(tmp_path, max_steps=2, save_steps=2))
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "data_state.json").read_text())
    assert state["global_step"] == 2 and state["examples_seen"] == 8 and state["train_examples"] == 8
    with pytest.raises(ValueError, match="train_fingerprint was"):
        train(composed(), tok, sum_examples(8, seed=5), config=quick(tmp_path, max_steps=4, resume=True))
    with pytest.raises(ValueError, match="global_batch_size was 4 and is now 2"):
        train(composed(), tok, sum_examples(8),
              config=quick(tmp_path, max_steps=4, per_device_train_batch_size=2, resume=True))


def test_half_written_checkpoints_are_never_resumed(tmp_path, tok):
    train(composed(), tok, sum_examples(8), config=quick(tmp_path, max_steps=4, save_steps=2))
    checkpoints = tmp_path / "run" / "checkpoints"
    # What a kill leaves behind: a staging directory mid-write (never renamed into place).
    staging = checkpoints / f"{STAGING_PREFIX}checkpoint-6" / "checkpoint-6"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\x00" * 10)
    # A checkpoint-N directory without its trainer state (e.g. written by a non-atomic tool) is skipped too.
    (checkpoints / "checkpoint-8").mkdir()
    assert latest_checkpoint(checkpoints).name == "checkpoint-4"
    result = train(composed(), tok, sum_examples(8),
                   config=quick(tmp_path, max_steps=6, save_steps=2, resume=True))
    assert result.resumed_from.endswith("checkpoint-4") and result.global_step == 6
    assert not any(p.name.startswith(STAGING_PREFIX) for p in checkpoints.iterdir())


def checkpoint_step(run: Path) -> int:
    latest = latest_checkpoint(run / "checkpoints")
    return int(latest.name.split("-")[1]) if latest else 0


def test_killed_run_resumes_and_finishes(tmp_path):
    assets = make_assets(tmp_path)
    run = tmp_path / "run"
    flags = ["--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
             "--tokenizer", str(assets["tokenizer"]), "--train-data", str(assets["train"]),
             "--output-dir", str(run), "--max-steps", "100", "--batch-size", "2", "--save-steps", "5",
             "--save-total-limit", "2", "--logging-steps", "5", "--no-progress-bar", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, str(WORKER), *flags, "--report", str(tmp_path / "report")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while checkpoint_step(run) < 10:  # kill it somewhere after its second checkpoint
        assert worker.poll() is None, worker.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(timeout=60) == -signal.SIGKILL
    worker.stderr.close()
    assert not (run / "model.safetensors").exists(), "the worker finished before it could be killed"

    resumed = train_main([*flags, "--resume"])
    assert resumed.resumed_from is not None and resumed.global_step == 100
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(5, 101, 5))  # one history: the killed run's extra records were dropped

    straight = train_main([*flags[: flags.index("--output-dir")], "--output-dir", str(tmp_path / "straight"),
                           *flags[flags.index("--output-dir") + 2:]])
    expected, got = load_file(tmp_path / "straight" / "model.safetensors"), load_file(run / "model.safetensors")
    assert straight.global_step == 100
    assert all(torch.allclose(expected[k], got[k], rtol=0, atol=1e-6) for k in expected)


# ---------------------------------------------------------------------------------- augment-state cache


@pytest.mark.parametrize("on_disk", [False, True])
def test_augment_cache_skips_augments_after_the_first_epoch_with_the_same_losses(tmp_path, tok, on_disk):
    data = sum_examples(12)  # 3 batches per epoch
    options = dict(num_train_epochs=3.0, max_steps=0, warmup_steps=0)
    plain = composed()
    train(plain, tok, data, config=quick(tmp_path, "plain", **options))

    cached = composed()
    augment_calls = CountCalls(cached.augments[0].model)
    per_epoch = []
    epoch_marks = EpochCalls(augment_calls, per_epoch)
    cache_dir = str(tmp_path / "cache") if on_disk else ""
    result = train(cached, tok, data, callbacks=[epoch_marks],
                   config=quick(tmp_path, "cached", cache_augment_states=True, augment_cache_dir=cache_dir,
                                **options))
    assert per_epoch == [3, 0, 0]
    assert len(result.epoch_seconds) == 3
    if on_disk:
        assert len(list((tmp_path / "cache").glob("rank0-*.safetensors"))) == 3

    losses = [[r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
              for name in ("plain", "cached")]
    assert len(losses[0]) == 9
    assert losses[0][:3] == losses[1][:3]  # first epoch: the same computation
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(v, composition_state(cached)[k], atol=1e-5)
               for k, v in composition_state(plain).items())


class EpochCalls(TrainerCallback):
    """Augment forward calls per epoch."""

    def __init__(self, counter: CountCalls, out: list[int]) -> None:
        self.counter, self.out, self.start = counter, out, 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = self.counter.calls

    def on_epoch_end(self, args, state, control, **kwargs):
        self.out.append(self.counter.calls - self.start)


def test_augment_cache_rebuilds_padded_batches():
    cache = AugmentStateCache()
    states = [{1: torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)}]
    cache.store([7, 9], [[3, 1]], states)
    assert cache.lookup([7, 8], [3], torch.device("cpu")) is None
    batch = cache.lookup([9, 7], [4], torch.device("cpu"))
    assert batch[0][1].shape == (2, 4, 2)
    assert torch.equal(batch[0][1][0, :1], states[0][1][1, :1]) and batch[0][1][0, 1:].abs().sum() == 0
    assert torch.equal(batch[0][1][1, :3], states[0][1][0])


def test_augment_cache_needs_a_composition(tmp_path, tok):
    with pytest.raises(ValueError, match="cache_augment_states=True needs a CALMForCausalLM"):
        train(tiny("llama", 32, 2, 4), tok, sum_examples(4),
              config=quick(tmp_path, cache_augment_states=True))


# ----------------------------------------------------------------------------------- evaluation, modes


class Oracle(torch.nn.Module):
    """Generates the right answer to 'a+b=' prompts, to check exact-match scoring itself."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            a, b = prompt.rstrip("=").split("+")
            answer = self.tokenizer(str(int(a) + int(b)), add_special_tokens=False)["input_ids"]
            new = (answer + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(ids + new)
        return torch.tensor(rows)


def test_exact_match_scores_greedy_completions(tok):
    examples = sum_examples(5)
    assert exact_match_count(Oracle(tok), tok, examples, max_new_tokens=4, batch_size=2) == 5
    wrong = [dict(e, completion=e["completion"] + "0") for e in examples]
    assert exact_match_count(Oracle(tok), tok, wrong, max_new_tokens=4, batch_size=2) == 0


def test_prompt_mode_training_and_text_data_run(tmp_path, tok):
    result = train(composed("prompt"), tok, sum_examples(8), sum_examples(4, seed=2),
                   quick(tmp_path, "prompt", max_steps=2, cache_augment_states=True))
    assert result.global_step == 2 and "eval_exact_match" in result.eval_metrics
    text = [{"text": f"{e['prompt']}{e['completion']}"} for e in sum_examples(8)]
    result = train(composed(), tok, text, text[:4], quick(tmp_path, "text", max_steps=2))
    assert "eval_loss" in result.eval_metrics and "eval_exact_match" not in result.eval_metrics


def test_bf16_autocast_on_cpu(tmp_path, tok):
    result = train(composed(), tok, sum_examples(8), config=quick(tmp_path, max_steps=2, precision="bf16"))
    assert result.global_step == 2 and result.train_loss == result.train_loss  # not NaN


# -------------------------------------------------------------------------------------- other models


def test_plain_causal_lm_full_fine_tuning(tmp_path, tok):
    model = tiny("llama", 32, 2, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tok, sum_examples(8), config=quick(tmp_path, max_steps=2, save_steps=1))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "run" / "model.safetensors").is_file()
    resumed = train(tiny("llama", 32, 2, 4), tok, sum_examples(8),
                    config=quick(tmp_path, max_steps=3, save_steps=1, resume=True))
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 3


def test_peft_lora_anchor(tmp_path, tok):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(tiny("llama", 32, 2, 4), lora)
    train(model, tok, sum_examples(8), config=quick(tmp_path, max_steps=2))
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ entry point


def test_entry_point_checks_data_before_loading_any_model(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    flags = ["--anchor", str(tmp_path / "no-such-model"), "--augment", str(tmp_path / "no-such-model"),
             "--train-data", str(empty), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(DataError, match="no examples"):
        train_main(flags)
    write_jsonl([{"prompt": "1+1=", "completion": "2"}], tmp_path / "ok.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing key 'completion'"):
        train_main([*flags[:-4], "--train-data", str(tmp_path / "ok.jsonl"),
                    "--eval-data", str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"TrainConfig\.per_device_train_batch_size=0"):
        train_main([*flags, "--batch-size", "0"])


def test_report_to_is_the_users_choice(tmp_path):
    assert TrainConfig(output_dir=str(tmp_path)).for_trainer(tmp_path, has_eval=False).report_to == []
    with pytest.raises(ValueError, match=r"TrainConfig.report_to names \['no_such_tracker'\]"):
        TrainConfig(output_dir=str(tmp_path), report_to="no_such_tracker")
