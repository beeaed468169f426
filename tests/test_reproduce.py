"""End to end: the installed `calm reproduce kv-arithmetic --quick` runs the whole pipeline on tiny sizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

CALM = shutil.which("calm", path=str(Path(sys.executable).parent)) or "calm"


@pytest.mark.slow
def test_quick_reproduction_writes_every_output(tmp_path, kv_research):
    out = tmp_path / "kv"
    done = subprocess.run([CALM, "reproduce", "kv-arithmetic", "--quick", "--ablations", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| CALM |" in done.stdout
    for name in ("results.md", "results.json", "learning_curves.png", "attention.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "results.json").read_text())
    assert set(result["table"]) == {"m_A", "m_B", "CALM", "m_B + LoRA", "m_B fine-tuned", "CALM, D_C + KV-Substitution",
                                    "CALM, then D_C + KV-Substitution", "CALM, vanilla m_A", "CALM, random m_A",
                                    "CALM, m_A on prompt only"}
    assert result["settings"]["d_c_tasks"] == ["kv_arithmetic"]
    assert set(result["table"]["CALM"]) == {"kv_substitution", "numeric_arithmetic", "kv_arithmetic_seen",
                                            "kv_arithmetic_unseen"}
    # The D_C (with KV-Substitution) adds a connection from m_A's last block into m_B's last.
    config = json.loads((out / "config.json").read_text())
    last = [config["m_a"]["num_layers"] - 1, config["m_b"]["num_layers"] - 1]
    runs = result["runs"]
    assert runs["CALM, D_C + KV-Substitution"]["connections"] == [runs["CALM"]["connections"][0] + [last]]
    assert runs["CALM, then D_C + KV-Substitution"]["connections"] == [runs["CALM"]["connections"][0] + [last]]
    assert "for \"CALM, D_C + KV-Substitution\"" in (out / "results.md").read_text()
    calm_params, lora_params = (result["runs"][k]["trainable_params"] for k in ("CALM", "m_B + LoRA"))
    assert abs(lora_params - calm_params) <= 0.1 * calm_params  # the LoRA baseline matches CALM's size
    assert (out / "models" / "m_a" / "config.json").is_file()  # base models are real HF checkpoints
    assert (out / "runs" / "calm" / "model.safetensors").is_file()

    # The probe of m_A's states reads the run directory: one row per layer (+ embeddings) and position.
    from kv_probe import probe

    probes = probe(out)
    layers = json.loads((out / "models" / "m_a" / "config.json").read_text())["num_hidden_layers"]
    assert set(probes) == {"key", "end", "key_one_hot_error", "key_nearest_digits"}
    assert all(len(rows) == layers + 1 for rows in probes.values())
    digits = len(str(json.loads((out / "config.json").read_text())["task"]["value_max"]))
    accuracies = [row for position in ("key", "end") for row in probes[position]]
    assert all(len(row) == digits and all(0 <= acc <= 100 for acc in row) for row in accuracies)
    assert all(len(row) == 2 and all(err >= 0 for err in row) for row in probes["key_one_hot_error"])
    assert all(len(row) == 2 and all(0 <= share <= 100 for share in row) for row in probes["key_nearest_digits"])

    # Composition seeds: the same seed retrains the same composition, another seed another one.
    from kv_draws import draws, markdown, run_spec

    from calm.experiments import with_changes
    from calm.experiments.kv_reproduce import CompositionSpec

    assert run_spec(out) == CompositionSpec.quick()  # the recipe the run was made with, not today's default
    records = draws(out, [0, 1, 0], every=4, examples=3, spec=CompositionSpec.quick())
    assert [[s["step"] for s in r["along_the_way"]] for r in records] == [[4, 8]] * 3
    assert all(set(r["final"]) == {"kv_arithmetic_seen", "kv_arithmetic_unseen"} for r in records)
    assert records[0]["train_loss"] == records[2]["train_loss"] != records[1]["train_loss"]
    assert markdown(records).count("\n| 0 |") == 2 and (out / "draws" / "seed1" / "model.safetensors").is_file()
    decayed = draws(out, [0], every=8, examples=3, spec=with_changes(CompositionSpec.quick(), ["weight_decay=1.0"]))
    assert decayed[0]["train_loss"] != records[0]["train_loss"]  # the spec's weight decay reaches the optimizer

    # The slot diagnostic: what the composition writes into the keys' slots, and how m_B reads it.
    from kv_slots import SlotReader, measure

    reader = SlotReader(out, out / "runs" / "calm")
    assert reader.nearest_digit(reader.embed[reader.digit_ids]).tolist() == list(range(10))
    x, slots = reader.written(result_prompt(out))
    assert len(slots) == 2 * digits and x.shape[0] == len(slots) + 3  # BOS, '+', '=' besides the slots
    slots_table = measure(out, out / "runs" / "calm", limit=4)
    assert set(slots_table) == {"kv_arithmetic_seen", "kv_arithmetic_unseen"}
    for row in slots_table.values():
        assert list(row) == [f"digit {i + 1} written" for i in range(digits)] + ["m_B, slots as written",
                                                                                  "m_B, slots snapped"]
        assert all(0 <= v <= 100 for v in row.values())

    # The steering test fits free vectors in the keys' slots through the frozen m_B.
    from kv_steer import multi_key_arithmetic, steer

    examples = [{"prompt": p, "completion": ""} for p in ("ab_+cd_=", "ab_=", "07+22=", "ab_+cd_:")]
    assert multi_key_arithmetic(examples, "=") == examples[:1]  # no single key, twin or substitution

    before, after = steer(out, steps=0), steer(out, steps=20, lr=0.1)
    assert set(after) == {"d_c", "held_out"} and all(0 <= v <= 100 for v in after.values())
    assert before == steer(out, steps=0)  # m_B and the data on disk are left as they were

    # Several seeds' runs combine into mean ± std (a second run faked from the first, CALM moved by 10 points).
    second = tmp_path / "kv2"
    second.mkdir()
    result["seed"] = 1
    v = result["table"]["CALM"]["kv_substitution"]
    result["table"]["CALM"]["kv_substitution"] = v + 10
    (second / "results.json").write_text(json.dumps(result))
    shutil.copy(out / "results.md", second / "results.md")
    done = subprocess.run([CALM, "reproduce", "kv-arithmetic", "--summarize", str(out), str(second),
                           "--output-dir", str(tmp_path / "summary")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "summary" / "results.md").read_text()
    assert f"| CALM | {v + 5:.1f} ± 7.1 |" in summary and "seeds [0, 1]" in summary
    assert json.loads((tmp_path / "summary" / "results.json").read_text())["seeds"] == [0, 1]


def result_prompt(out: Path) -> str:
    """The first two-key KV-Arithmetic evaluation prompt of a run."""
    return json.loads((out / "data" / "eval_kv_arithmetic_unseen.jsonl").read_text().splitlines()[0])["prompt"]


def test_slot_digits_are_each_keys_value_in_fixed_width(kv_research):
    from kv_slots import slot_digits

    assert slot_digits({"ab": 7, "cde": 420}, "ab__+cde__=", 3) == [0, 0, 7, 4, 2, 0]
    assert slot_digits({"ab": 7, "cde": 42}, "ab_-cde_*ab_=", 2) == [0, 7, 4, 2, 0, 7]


def test_draws_spec_changes_are_checked_json():
    from calm.experiments import with_changes
    from calm.experiments.kv_reproduce import CompositionSpec

    changed = with_changes(CompositionSpec(), ["weight_decay=0.5", "connections=[[0, 1]]", "rope_theta=null"])
    assert (changed.weight_decay, changed.connections, changed.rope_theta) == (0.5, [[0, 1]], None)
    for bad, message in (("heads=4", "FIELD one of"), ("num_heads", "FIELD one of"), ("lr=1e", "not JSON")):
        with pytest.raises(ValueError, match=message):
            with_changes(CompositionSpec(), [bad])


def test_draws_rebuild_a_run_from_before_augment_norm_without_it(tmp_path, kv_research):
    from kv_draws import run_spec

    from calm.experiments.kv_reproduce import CompositionSpec

    composition = asdict(CompositionSpec())
    del composition["augment_norm"]
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"composition": composition}}))
    assert run_spec(tmp_path) == replace(CompositionSpec(), augment_norm=False)


def test_summarize_names_a_run_without_results(tmp_path, capsys):
    from calm.cli import main

    assert main(["reproduce", "kv-arithmetic", "--summarize", str(tmp_path / "nope"),
                 "--output-dir", str(tmp_path / "s")]) == 2
    assert "no results.json in" in capsys.readouterr().err


@pytest.mark.parametrize("experiment, module", [("kv-arithmetic", "kv_reproduce"), ("translation", "translation")])
def test_default_output_dir_is_scratch(experiment, module, monkeypatch):
    """`calm reproduce` writes runs/<experiment> unless told otherwise: the committed results/ only on request."""
    import importlib

    from calm import cli

    given = []
    monkeypatch.setattr(importlib.import_module(f"calm.experiments.{module}"), "run_from_args",
                        lambda args: given.append(args.output_dir))
    for flags in ([], ["--output-dir", f"results/{experiment}"]):
        cli.cmd_reproduce(cli.build_parser().parse_args(["reproduce", experiment, *flags]))
    assert given == [Path("runs") / experiment.replace("-", "_"), Path(f"results/{experiment}")]


@pytest.mark.slow
@pytest.mark.filterwarnings("error:No artists with labels")  # --quick logs no loss: an empty plot, but no warning
def test_default_run_is_the_main_table_and_baselines(tmp_path):
    """Without --ablations: no issue's-D_C row, no ablation rows, and no vanilla m_A trained (the time budget)."""
    from calm.experiments.kv_reproduce import reproduce

    result = reproduce(tmp_path / "kv", quick=True, threads=1)
    assert list(result.table) == ["m_A", "m_B", "CALM", "m_B + LoRA", "m_B fine-tuned"]
    assert not (tmp_path / "kv" / "models" / "m_a_vanilla").exists()


def test_one_hot_errors_tell_an_exact_linear_code_from_noise(kv_research):
    import torch
    from kv_probe import nearest_digits_right, one_hot_errors, one_hots

    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 1000, (300,), generator=generator)
    y = one_hots(values, [100, 10, 1]).double()
    exact = y @ torch.randn(30, 40, generator=generator, dtype=torch.float64)  # one vector per digit and place
    assert max(one_hot_errors(exact[:100], y[:100], exact[100:], y[100:])) < 1e-3
    noise = torch.randn(300, 40, generator=generator, dtype=torch.float64)
    assert one_hot_errors(noise[:100], y[:100], noise[100:], y[100:])[1] > 1.0
    assert nearest_digits_right(exact[:100], y[:100], exact[100:], y[100:]) == (1.0, 1.0)
    # Noise: the fit reads some of its 100 examples, few other ones (chance: 1 in 1000 per value).
    fitted, other = nearest_digits_right(noise[:100], y[:100], noise[100:], y[100:])
    assert fitted > 0.1 and other < 0.02


def test_extend_starts_the_shared_connections_from_the_trained_weights(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from calm.experiments.kv_reproduce import CompositionSpec, compose, extend

    def llama(width: int) -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))

    llama(32).save_pretrained(tmp_path / "m_b")
    spec = CompositionSpec.quick()
    trained = compose(tmp_path / "m_b", llama(16), spec, "prompt", ("kv_arithmetic",))
    with torch.no_grad():
        for p in trained.composition.parameters():
            p.add_(1.0)  # stands in for training

    both = extend(trained, tmp_path / "m_b", spec, ("kv_arithmetic", "kv_substitution"))
    assert both.config.connections == [[[-1, -1], [1, 1]]] and both.config.augment_mode == "prompt"
    shared, added = both.composition[0]
    old = trained.composition[0][0].state_dict()
    assert all(torch.equal(v, old[k]) for k, v in shared.state_dict().items())
    assert not any(torch.equal(v, old[k]) for k, v in added.state_dict().items() if "norm" not in k)
    with torch.no_grad():
        shared.o.weight.zero_()
    assert not torch.equal(trained.composition[0][0].o.weight, shared.o.weight)  # a copy, not the same tensor

    other = CompositionSpec.quick()
    other.connections = [[0, 0]]
    with pytest.raises(ValueError, match="do not start with the trained connections"):
        extend(trained, tmp_path / "m_b", other, ("kv_arithmetic",))


@pytest.mark.parametrize("module", ["calm.experiments.kv_reproduce", "calm.experiments.translation"])
def test_rows_train_in_float32_on_any_device(module, monkeypatch, tmp_path):
    """Both reproductions' recipes are float32: on a GPU the trainer must not switch to bf16 autocast."""
    import importlib

    import torch

    experiment = importlib.import_module(module)
    seen = []

    def fake_train(model, tokenizer, data, config, **kwargs):
        seen.append(config)
        raise RuntimeError("stop")

    monkeypatch.setattr(experiment, "train", fake_train)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="stop"):
        if module.endswith("kv_reproduce"):
            experiment.train_on_d_c(model, None, [], tmp_path, experiment.CompositionSpec.quick(), 1e-3, 0)
        else:
            data = experiment.Data(train=[], eval=[], shots=[])
            experiment.train_on_d_c(model, None, data, experiment.TranslationSpec.quick(), tmp_path, 1e-3, 0)
    assert seen[0].precision == "fp32"
