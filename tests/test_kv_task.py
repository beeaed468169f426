"""Key-value arithmetic task: data, splits, tokenizer, collation, exact-match evaluation (fast)."""

from __future__ import annotations

import itertools
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

try:
    import calm  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import PreTrainedTokenizerFast

from calm.experiments.kv_arithmetic import (
    ExperimentConfig,
    ModelSpec,
    TrainSpec,
    build_task,
    collate,
    digit_mixup_loss,
    evaluate_exact_match,
    load_eval_sets,
    load_frozen,
    make_llama,
    mean_embed_untrained_tokens,
    noisy_digits,
    soft_label_loss,
    train_base_models,
    train_causal_lm,
)
from calm.tasks.kv_arithmetic import (
    Expression,
    KVConfig,
    NumberFormat,
    build_tokenizer,
    change_one_digit,
    evaluate_numeric,
    evaluate_prompt,
    example_stream,
    make_kv_data,
    make_splits,
    numeric_table,
    numeric_vocabulary,
    read_jsonl,
    trie_pattern,
    write_jsonl,
)

CFG = KVConfig.quick()
NUMBER_TOKENS = replace(CFG, number_tokens=True)


@pytest.fixture(scope="module")
def data():
    return make_kv_data(CFG)


@pytest.fixture(scope="module")
def splits(data):
    return make_splits(CFG, data)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CFG)


def _keys_of(prompt: str) -> list[str]:
    return prompt[:-1].replace("-", "+").replace("*", "+").replace("_", "").split("+")


def test_d_kv_keys_and_values(data):
    keys = data.all_keys
    assert len(keys) == len(set(keys)) == CFG.num_keys
    assert all(CFG.key_len_min <= len(k) <= CFG.key_len_max and k.isalpha() and k.islower() for k in keys)
    values = list(data.table.values())
    assert len(set(values)) == len(values)
    assert all(CFG.value_min <= v <= CFG.value_max for v in values)
    assert len(data.seen_keys) == round(CFG.seen_fraction * CFG.num_keys)
    assert make_kv_data(CFG).table == data.table  # seeded
    assert make_kv_data(replace(CFG, seed=1)).table != data.table


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="unique values"):
        KVConfig(num_keys=100, value_min=1, value_max=50)
    with pytest.raises(ValueError, match="operators"):
        KVConfig(operators="+/")
    with pytest.raises(ValueError, match="composition tasks"):
        KVConfig(composition_tasks=("kv_division",))
    with pytest.raises(ValueError, match="numeric_share"):
        KVConfig(numeric_share=1.5)


@pytest.mark.parametrize("fixed_width", [False, True])
def test_three_task_formats(fixed_width):
    data = make_kv_data(replace(CFG, fixed_width_numbers=fixed_width, pad_keys=False))
    k1, k2, k3 = data.all_keys[:3]
    data.table.update({k1: 10, k2: 7, k3: 24})
    e = Expression(keys=(k1, k2, k3), ops=("+", "-"))
    values, result = ("10+07-24", "-007") if fixed_width else ("10+7-24", "-7")  # quick(): values <= 60
    assert data.kv_substitution(e) == {"prompt": f"{k1}+{k2}-{k3}:", "completion": values}
    assert data.numeric_arithmetic(e) == {"prompt": f"{values}=", "completion": result}
    assert data.kv_arithmetic(e) == {"prompt": f"{k1}+{k2}-{k3}=", "completion": result}


def test_padded_keys_line_up_token_for_token_with_their_values(data, tmp_path):
    tokenizer = build_tokenizer(CFG, keys=list(data.table))
    e = Expression(keys=tuple(data.all_keys[:3]), ops=("+", "-"))
    numeric, keyed = data.numeric_arithmetic(e)["prompt"], data.kv_arithmetic(e)["prompt"]
    assert keyed == "+".join([f"{e.keys[0]}_", f"{e.keys[1]}_-{e.keys[2]}_="])  # quick(): 2-digit values
    numeric_tokens = tokenizer.convert_ids_to_tokens(tokenizer(numeric)["input_ids"])
    keyed_tokens = tokenizer.convert_ids_to_tokens(tokenizer(keyed)["input_ids"])
    assert len(numeric_tokens) == len(keyed_tokens)
    assert [t for t, n in zip(keyed_tokens, numeric_tokens) if not n.isdigit()] == \
        [t for t in numeric_tokens if not t.isdigit()]  # operators and markers at the same positions
    assert keyed_tokens[1:3] == [e.keys[0], "_"]
    assert data.kv_substitution(e)["prompt"] == keyed[:-1] + ":"
    with pytest.raises(ValueError, match="pad_keys"):
        replace(CFG, key_tokens=False)


def test_one_digit_changes_with_its_result():
    rng = random.Random(0)
    fmt = NumberFormat(value_width=2, result_width=3)
    assert evaluate_prompt("07+20-3=") == 24 and evaluate_prompt("2+3*4=") == 14
    with pytest.raises(ValueError, match="digits"):
        evaluate_prompt("ab+07=")
    for _ in range(50):
        i, changed = change_one_digit({"prompt": "07+20=", "completion": "+027"}, rng, fmt)
        assert changed["prompt"][i] != "07+20="[i] and changed["prompt"][i].isdigit()
        assert changed["prompt"][:i] + changed["prompt"][i + 1:] == "07+20="[:i] + "07+20="[i + 1:]
        assert changed["completion"] == fmt.result(evaluate_prompt(changed["prompt"]))


def test_fixed_width_numbers_cover_every_result():
    cfg = KVConfig(num_keys=99, value_max=200, operands_max=3)
    fmt = NumberFormat.for_config(cfg)
    assert (fmt.value(7), fmt.value(200), fmt.result(600), fmt.result(-5)) == ("007", "200", "+600", "-005")
    assert cfg.value_digits == fmt.value_width == 3  # what kv_probe and kv_slots read a key's digits by
    assert replace(cfg, fixed_width_numbers=False, pad_keys=False).value_digits == 3
    fmt = NumberFormat.for_config(KVConfig(value_max=20, operands_max=3, operators="+*", num_keys=20))
    assert fmt.result(20 * 20 * 20) == "+8000"
    assert NumberFormat(value_width=2, result_width=3, reversed_results=True).result(-127) == "-721"
    assert NumberFormat().result(-7) == "-7" and NumberFormat().value(7) == "7"  # the paper's plain numbers


def test_numeric_evaluation_uses_usual_precedence():
    assert evaluate_numeric([10, 22, 24], ("+", "-")) == 8
    assert evaluate_numeric([2, 3, 4], ("+", "*")) == 14
    assert evaluate_numeric([2, 3, 4, 5], ("*", "-", "*")) == -14
    assert evaluate_numeric([7], ()) == 7


@pytest.mark.parametrize("tasks", [("kv_arithmetic",), ("kv_arithmetic", "kv_substitution")])
def test_composition_data_uses_only_seen_keys(data, tasks):
    cfg = replace(CFG, composition_tasks=tasks)
    examples = make_splits(cfg, data).composition_train
    kv_prompts = [ex["prompt"] for ex in examples if not ex["prompt"][0].isdigit()]
    singles = len(data.seen_keys) * cfg.single_key_examples
    assert len(kv_prompts) == (cfg.num_composition_examples + singles) * len(tasks)
    # The Numeric-Arithmetic twins of a share of the expressions: the seen keys' values, written out.
    twins = [ex for ex in examples if ex["prompt"][0].isdigit()]
    assert len(twins) == round(cfg.numeric_share * (cfg.num_composition_examples + singles)) > 0
    seen_values = {data.numbers.value(data.table[k]) for k in data.seen_keys}
    assert all(set(re.findall(r"\d+", ex["prompt"])) <= seen_values for ex in twins)
    assert all(ex["completion"] == data.numbers.result(evaluate_prompt(ex["prompt"])) for ex in twins)
    assert all(set(_keys_of(p)) <= set(data.seen_keys) for p in kv_prompts)
    assert sum(len(_keys_of(p)) == 1 for p in kv_prompts) == singles * len(tasks)
    assert {p[-1] for p in kv_prompts} == {cfg.substitution_marker, cfg.arithmetic_marker}.intersection(
        {"kv_arithmetic": cfg.arithmetic_marker, "kv_substitution": cfg.substitution_marker}[t] for t in tasks)


def test_eval_sets_are_held_out_and_split_by_keys(data, splits):
    seen, unseen = set(data.seen_keys), set(data.unseen_keys)
    d_c_prompts = {ex["prompt"][:-1] for ex in splits.composition_train}
    ev = splits.eval_sets
    assert set(ev) == {"kv_substitution", "numeric_arithmetic", "kv_arithmetic_seen", "kv_arithmetic_unseen"}
    assert all(len(v) == CFG.num_eval for v in ev.values())
    assert all(set(_keys_of(ex["prompt"])) <= seen for ex in ev["kv_arithmetic_seen"])
    assert not {ex["prompt"][:-1] for ex in ev["kv_arithmetic_seen"]} & d_c_prompts
    assert all(set(_keys_of(ex["prompt"])) <= unseen for ex in ev["kv_arithmetic_unseen"])
    assert not {ex["prompt"][:-1] for ex in ev["kv_substitution"]} & d_c_prompts
    assert all(ex["prompt"].endswith(CFG.substitution_marker) for ex in ev["kv_substitution"])
    assert all(ex["prompt"][0].isdigit() for ex in ev["numeric_arithmetic"])


def test_training_streams_skip_held_out_prompts(data, splits):
    held_out = splits.eval_sets["kv_substitution"]
    stream = example_stream(CFG, data, "kv_substitution", seed=0, held_out=held_out)
    drawn = [next(stream) for _ in range(3000)]
    assert not {ex["prompt"] for ex in drawn} & {ex["prompt"] for ex in held_out}
    numeric = [next(example_stream(CFG, numeric_table(CFG), "numeric_arithmetic", seed=0)) for _ in range(5)]
    assert all(not any(c.isalpha() for c in ex["prompt"]) for ex in numeric)


def test_tokenizer_is_character_level_and_round_trips(tokenizer, splits, tmp_path):
    ids = tokenizer("ab+12=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab+12="
    every_char = {c for exs in splits.eval_sets.values() for ex in exs for c in ex["prompt"] + ex["completion"]}
    assert tokenizer.unk_token_id not in tokenizer("".join(sorted(every_char)))["input_ids"]
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded("xyz-9:")["input_ids"] == tokenizer("xyz-9:")["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_numeric_training_mixes_digits_and_number_tokens_but_keeps_held_out_expressions_out(splits):
    table = numeric_table(CFG)
    held_out = splits.eval_sets["numeric_arithmetic"]
    stream = example_stream(NUMBER_TOKENS, table, "numeric_arithmetic", seed=0, held_out=held_out)
    drawn = list(itertools.islice(stream, 3000))
    as_digits = {ex["prompt"].replace("#", "") for ex in drawn}
    assert not as_digits & {ex["prompt"] for ex in held_out}  # neither writing of a held-out expression
    tokens_per_prompt = [ex["prompt"].count("#") for ex in drawn]
    operands = [len(re.findall(r"\d+", ex["prompt"])) for ex in drawn]
    assert {0, 1, 2} <= set(tokens_per_prompt)  # each operand independently
    assert 0.4 < sum(tokens_per_prompt) / sum(operands) < 0.6
    assert set(operands) == {CFG.train_operands_min, CFG.operands_max}  # one-operand expressions too
    assert all(not any(c.isalpha() for c in ex["prompt"]) for ex in drawn)
    plain = example_stream(CFG, table, "numeric_arithmetic", seed=0)
    assert not any("#" in next(plain)["prompt"] for _ in range(200))
    # Same expression, same answer, whichever way its operands are written.
    ex = next(example_stream(NUMBER_TOKENS, table, "numeric_arithmetic", seed=1))
    assert ex["completion"] == table.numeric_arithmetic(_expression_of(ex["prompt"]))["completion"]


def _expression_of(prompt: str) -> Expression:
    body = prompt[:-1].replace("#", "")
    ops = tuple(c for c in body if c in "+-*")
    keys = tuple(str(int(x)) for x in body.replace("-", "+").replace("*", "+").split("+"))
    return Expression(keys=keys, ops=ops)


def test_number_tokens_are_single_tokens(data):
    tokenizer = build_tokenizer(NUMBER_TOKENS, keys=data.all_keys)
    width = len(str(CFG.value_max))
    number = "#" + "7".zfill(width)
    assert tokenizer.convert_ids_to_tokens(tokenizer(f"{number}+{number}=")["input_ids"]) == [
        "<s>", number, "+", number, "="]
    assert tokenizer.unk_token_id not in tokenizer(f"#{str(CFG.value_max).zfill(width)}")["input_ids"]
    # The digits of an answer stay digits.
    assert tokenizer.convert_ids_to_tokens(tokenizer("+029")["input_ids"])[1:] == ["+", "0", "2", "9"]
    without = build_tokenizer(CFG, keys=data.all_keys)  # off by default
    assert number not in without.get_vocab()


def test_key_tokens_make_each_key_one_token_and_spell_other_words(data, tmp_path):
    keys = data.all_keys
    tokenizer = build_tokenizer(CFG, keys=keys)
    assert CFG.key_tokens
    for key in keys:
        assert tokenizer.convert_ids_to_tokens(tokenizer(key + "+" + key + ":")["input_ids"]) == [
            "<s>", key, "+", key, ":"]
    # A key that prefixes or ends another word must not be cut out of it: the other word is spelled.
    word = keys[0] + "q" if keys[0] + "q" not in keys else keys[0] + "qq"
    assert tokenizer.convert_ids_to_tokens(tokenizer(word)["input_ids"])[1:] == list(word)
    assert tokenizer.convert_ids_to_tokens(tokenizer("q" + keys[0])["input_ids"])[1:] == list("q" + keys[0])
    assert tokenizer.decode(tokenizer(f"{keys[1]}-{keys[2]}=+012")["input_ids"],
                            skip_special_tokens=True) == f"{keys[1]}-{keys[2]}=+012"
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded(keys[3] + "*" + word)["input_ids"] == tokenizer(keys[3] + "*" + word)["input_ids"]
    spelled = build_tokenizer(replace(CFG, key_tokens=False, pad_keys=False), keys=keys)
    assert len(spelled(keys[0])["input_ids"]) == len(keys[0]) + 1


def test_trie_pattern_matches_its_words_and_nothing_else():
    words = ["ab", "abc", "abd", "b", "bca", "xyz", "xy"]
    pattern = re.compile(trie_pattern(words))
    near = {w[:i] + extra for w in words for i in range(len(w) + 1) for extra in ("", "a", "c", "zz")}
    assert {s for s in near if pattern.fullmatch(s)} == set(words)
    # In the tokenizer, a key that prefixes another key is still a token of its own, and the longer key too.
    tokenizer = build_tokenizer(CFG, keys=words)
    assert tokenizer.convert_ids_to_tokens(tokenizer("ab+abc-abd*xy=")["input_ids"])[1:] == [
        "ab", "+", "abc", "-", "abd", "*", "xy", "="]
    assert tokenizer.convert_ids_to_tokens(tokenizer("abca")["input_ids"])[1:] == list("abca")


def test_collate_labels_only_the_completion_and_eos(tokenizer):
    batch = collate([{"prompt": "ab:", "completion": "12"}, {"prompt": "abcd+e:", "completion": "3+4"}], tokenizer)
    eos = tokenizer.eos_token_id
    first_labels = batch["labels"][0].tolist()
    # BOS a b : | 1 2 EOS | padding
    assert first_labels[:4] == [-100] * 4
    assert first_labels[4:7] == tokenizer("12", add_special_tokens=False)["input_ids"] + [eos]
    assert set(first_labels[7:]) == {-100}
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0] * (batch["input_ids"].shape[1] - 7)
    assert batch["labels"][1].tolist()[-1] == eos


def test_soft_label_loss_blends_two_targets_until_they_part():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, 3, -100]])
    alt = torch.tensor([[-100, -100, 6, 4, 5], [-100, 1, 2, 3, -100]])  # row 0 parts at its first target
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert torch.allclose(soft_label_loss(logits, labels, alt, torch.ones(2)), plain)
    assert torch.allclose(soft_label_loss(logits, labels, labels, torch.full((2,), 0.3)), plain)
    nll = -logits[:, :-1].log_softmax(-1)
    half = soft_label_loss(logits, labels, alt, torch.tensor([0.5, 1.0]))
    expected = (0.5 * nll[0, 1, 3] + 0.5 * nll[0, 1, 6] + nll[0, 2, 4] + nll[0, 3, 5]  # 4 and 5: gold only
                + nll[1, 0, 1] + nll[1, 1, 2] + nll[1, 2, 3]) / 6
    assert torch.allclose(half, expected)


def test_digit_mixup_loss_trains_m_b_and_is_the_plain_loss_without_mixing(tokenizer, splits):
    model = make_llama(ModelSpec(1, 16, 2, 32), tokenizer, seed=0)
    examples = splits.eval_sets["numeric_arithmetic"][:8]
    numbers = NumberFormat.for_config(CFG)
    plain = model(**collate(examples, tokenizer)).loss
    unmixed = digit_mixup_loss(model, examples, tokenizer, numbers, share=0.0, rng=random.Random(0))
    assert torch.allclose(plain, unmixed, atol=1e-6)
    mixed = digit_mixup_loss(model, examples, tokenizer, numbers, share=1.0, rng=random.Random(0))
    assert not torch.allclose(plain, mixed)
    mixed.backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="number format"):
        train_causal_lm(model, tokenizer, iter(examples), TrainSpec(steps=1, batch_size=2, lr=1e-3, digit_mixup=0.5))


def test_noisy_digits_moves_only_the_chosen_positions_and_grows_with_its_scale():
    torch.manual_seed(0)
    digits = torch.randn(10, 16)
    inputs = torch.randn(64, 5, 16)
    where = torch.zeros(64, 5, dtype=torch.bool)
    where[:, 1] = where[:, 3] = True
    assert torch.equal(noisy_digits(inputs, digits, where, 0.0), inputs)
    moved = {scale: (noisy_digits(inputs, digits, where, scale) - inputs).norm(dim=-1) for scale in (0.5, 1.0)}
    assert torch.equal(moved[0.5][:, [0, 2, 4]], torch.zeros(64, 3))
    assert (moved[0.5][:, [1, 3]] > 0).all()
    # at scale 1 the noise is about as long as a digit embedding, at most (both parts drawn from U(0, 1))
    assert moved[0.5].mean() < moved[1.0].mean() < 2 * digits.norm(dim=-1).mean()


def test_noisy_digits_passes_the_loss_on_to_the_digit_embeddings():
    torch.manual_seed(0)
    digits = torch.randn(10, 16, requires_grad=True)
    where = torch.ones(4, 3, dtype=torch.bool)
    noisy_digits(torch.zeros(4, 3, 16), digits, where, 1.0).sum().backward()
    assert digits.grad is not None and digits.grad.abs().sum() > 0


def test_digit_noise_changes_m_b_loss_and_needs_the_number_format(tokenizer, splits):
    model = make_llama(ModelSpec(1, 16, 2, 32), tokenizer, seed=0)
    examples = splits.eval_sets["numeric_arithmetic"][:8]
    numbers = NumberFormat.for_config(CFG)
    plain = model(**collate(examples, tokenizer)).loss
    torch.manual_seed(0)
    noisy = digit_mixup_loss(model, examples, tokenizer, numbers, share=0.0, rng=random.Random(0), noise=1.0)
    assert not torch.allclose(plain, noisy)
    with pytest.raises(ValueError, match="number format"):
        train_causal_lm(model, tokenizer, iter(examples), TrainSpec(steps=1, batch_size=2, lr=1e-3, digit_noise=0.5))
    losses = train_causal_lm(model, tokenizer, iter(examples), TrainSpec(steps=2, batch_size=4, lr=1e-3,
                                                                         digit_noise=0.5), numbers=numbers)
    assert len(losses) == 2


def test_untrained_tokens_get_the_mean_embedding(tokenizer):
    model = make_llama(ModelSpec(1, 16, 2, 32), tokenizer, seed=0)
    weight = model.get_input_embeddings().weight
    trained = set(tokenizer.convert_tokens_to_ids(numeric_vocabulary(CFG)))
    before = weight.detach().clone()
    mean_embed_untrained_tokens(model, trained)
    rows = sorted(trained)
    assert torch.equal(weight[rows], before[rows])
    untrained = [i for i in range(len(weight)) if i not in trained]
    assert torch.allclose(weight[untrained], before[rows].mean(0).expand(len(untrained), -1))
    assert set(numeric_vocabulary(CFG)) == set("0123456789+-=")


def test_jsonl_round_trip(splits, tmp_path):
    path = write_jsonl(splits.eval_sets["kv_arithmetic_unseen"], tmp_path / "x" / "e.jsonl")
    assert read_jsonl(path) == splits.eval_sets["kv_arithmetic_unseen"]


class _OracleModel:
    """Stands in for a model with `generate`: answers from a lookup table, wrong on purpose for some."""

    training = False
    device = torch.device("cpu")

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer, self.answers = tokenizer, answers

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        rows = []
        for ids in input_ids.tolist():
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            new = self.tokenizer(self.answers[prompt], add_special_tokens=False)["input_ids"] + [eos_token_id]
            rows.append(ids + (new + [pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_exact_match_counts_only_completions_ending_in_eos(tokenizer):
    examples = [{"prompt": "ab+c=", "completion": "12"}, {"prompt": "abcdef-g=", "completion": "-3"},
                {"prompt": "x=", "completion": "5"}, {"prompt": "y+z=", "completion": "41"}]
    answers = {"ab+c=": "12", "abcdef-g=": "-3", "x=": "55", "y+z=": "4111"}  # last: no room left for EOS
    model = _OracleModel(tokenizer, answers)
    result = evaluate_exact_match(model, tokenizer, examples, batch_size=3)
    assert result.predictions == ["12", "-3", "55", ""]
    assert result.accuracy == 0.5
    assert tokenizer.padding_side == "left"


def test_left_padded_batches_decode_like_single_examples(tokenizer, splits):
    torch.manual_seed(0)
    model = make_llama(ModelSpec(2, 32, 2, 64), tokenizer, seed=0)
    examples = splits.eval_sets["kv_arithmetic_unseen"][:12]  # prompts of different lengths
    batched = evaluate_exact_match(model, tokenizer, examples, max_new_tokens=6, batch_size=12)
    single = evaluate_exact_match(model, tokenizer, examples, max_new_tokens=6, batch_size=1)
    assert batched.predictions == single.predictions


def test_quick_pipeline_writes_task_and_frozen_models(tmp_path):
    cfg = ExperimentConfig.quick()
    few = TrainSpec(steps=3, batch_size=8, lr=1e-3, warmup_steps=1)
    cfg = replace(cfg, m_a_train=few, m_b_train=replace(few, digit_mixup=0.8), vanilla_train=few)
    paths = train_base_models(cfg, tmp_path)
    assert set(load_eval_sets(tmp_path)) == set(make_splits(cfg.task, make_kv_data(cfg.task)).eval_sets)
    assert len(read_jsonl(tmp_path / "data" / "composition_train.jsonl")) > 0
    m_a, m_b = load_frozen(paths.m_a), load_frozen(paths.m_b)
    assert m_a.config.hidden_size == cfg.m_a.hidden_size and m_b.config.hidden_size == cfg.m_b.hidden_size
    assert not any(p.requires_grad for p in m_a.parameters())
    random_init = load_frozen(paths.m_a_random)
    assert not torch.equal(random_init.lm_head.weight, m_a.lm_head.weight)  # m_A was trained, the init was not
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths.tokenizer)
    assert tokenizer.pad_token_id == m_a.config.pad_token_id
    first, second = tokenizer.convert_tokens_to_ids(make_kv_data(cfg.task).all_keys[:2])
    m_b_rows = m_b.get_input_embeddings().weight
    assert torch.equal(m_b_rows[first], m_b_rows[second])  # keys are all "unknown" to m_B


def test_build_task_is_reproducible_and_saves_its_config(tmp_path):
    cfg = ExperimentConfig.quick()
    first = build_task(cfg, tmp_path / "a")
    assert ExperimentConfig.load(tmp_path / "a") == cfg
    second = build_task(cfg, tmp_path / "b")
    assert first.splits.eval_sets == second.splits.eval_sets
    assert (tmp_path / "a" / "data" / "d_kv.json").read_text() == (tmp_path / "b" / "data" / "d_kv.json").read_text()


def test_key_slots_are_each_key_token_and_the_pads_after_it(kv_research):
    from kv_steer import key_slots

    bos, pad, plus, eq, k1, k2, other = 1, 9, 5, 6, 20, 21, 22
    ids = torch.tensor([[bos, k1, pad, plus, k2, pad, eq], [bos, other, pad, plus, k2, pad, pad]])
    assert key_slots(ids, {k1: 0, k2: 1}, pad) == [(0, 1, 0, 0), (0, 2, 0, 1), (0, 4, 1, 0), (0, 5, 1, 1),
                                                   (1, 4, 1, 0), (1, 5, 1, 1), (1, 6, 1, 2)]
