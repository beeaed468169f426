"""Bad data: every bad record is a clear error naming the file and line (or a documented, counted skip), found
before any model is loaded, so that no run ever dies in the middle because of a line that could be checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers as tf
from robust_support import char_tokenizer, composed, make_assets, quick, sum_examples, tiny, write_jsonl

import calm
from calm.cli import train_main
from calm.data import DataError, TruncationWarning, load_examples, tokenize
from calm.train import train

GOOD = '{"prompt": "1+1=", "completion": "2"}\n'

# (name, file content, pattern after "<file>:") -- cases tests/test_data.py does not already cover.
BAD_FILES = [
    ("malformed_json_line_3", GOOD * 2 + '{"prompt": "1+1=" "completion": "2"}\n', r":3: malformed JSON"),
    ("trailing_comma", GOOD + '{"prompt": "a", "completion": "b",}\n', r":2: malformed JSON"),
    ("truncated_last_line", GOOD + '{"prompt": "1+1=", "compl', r":2: malformed JSON"),
    ("bare_string", GOOD + '"just text"\n', r":2: expected a JSON object, got str"),
    ("null_record", "null\n", r":1: expected a JSON object, got NoneType"),
    ("missing_prompt", '{"completion": "2"}\n', r":1: missing key 'prompt'"),
    ("no_known_keys", GOOD + "{}\n", r":2: expected keys 'prompt' and 'completion', 'text', or 'messages'; got \[\]"),
    ("empty_prompt", '{"prompt": "", "completion": "2"}\n', r":1: 'prompt' is an empty string"),
    ("null_completion", '{"prompt": "a", "completion": null}\n', r":1: 'completion' must be a string, got NoneType"),
    ("nan_prompt", '{"prompt": NaN, "completion": "2"}\n', r":1: 'prompt' must be a string, got float"),
    ("list_text", '{"text": ["a", "b"]}\n', r":1: 'text' must be a string, got list"),
    ("unpaired_surrogate", GOOD + '{"prompt": "a\\ud800", "completion": "b"}\n', r":2: 'prompt' is not valid Unicode"),
    ("latin1_bytes_line_2", GOOD.encode() + b'{"text": "na\xefve"}\n', r":2: not valid UTF-8"),
    ("utf16_file", GOOD.encode("utf-16"), r":1: not valid UTF-8"),
    ("binary_garbage", bytes(range(255, -1, -1)), r":1: not valid UTF-8"),
    ("empty_file", "", r": no examples \(the dataset is empty\)"),
    ("only_blank_lines", "\n   \n\t\n", r": no examples"),
    ("mixed_formats", GOOD + '{"text": "x"}\n', r":2: a 'text' record, but .*:1 is 'prompt_completion'"),
]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("data-assets"), num_examples=8)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything loads model weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr("calm.cli.load_base", refuse)
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", refuse)


def train_flags(assets: dict, tmp_path: Path, *extra: str) -> list[str]:
    return ["--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]), "--tokenizer",
            str(assets["tokenizer"]), "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--no-progress-bar",
            *extra]


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_named_with_its_line(tmp_path, content, message):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + message):
        load_examples(path)


@pytest.mark.parametrize("which", ["train", "eval"])
@pytest.mark.parametrize(("content", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_calm_train_fails_on_bad_data_before_loading_any_model(assets, tmp_path, no_model_loading, which,
                                                               content, message):
    bad = write(tmp_path / "bad.jsonl", content)
    data = ["--train-data", str(bad if which == "train" else assets["train"])]
    if which == "eval":
        data += ["--eval-data", str(bad)]
    with pytest.raises(DataError, match=r"bad\.jsonl" + message):
        train_main(train_flags(assets, tmp_path, *data))
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"


@pytest.mark.parametrize(("name", "make", "error", "message"), [
    ("missing_file", lambda d: d / "nope.jsonl", FileNotFoundError, r"nope\.jsonl: no such data file"),
    ("directory", lambda d: d, DataError, r": not a file \(expected a JSONL file"),
    ("second_file_bad", None, DataError, r"two\.jsonl:1: missing key 'completion'"),
])
def test_calm_train_refuses_unreadable_data_paths_before_loading_models(assets, tmp_path, no_model_loading,
                                                                        name, make, error, message):
    if make is None:
        paths = [str(assets["train"]), str(write(tmp_path / "two.jsonl", '{"prompt": "x"}\n'))]
    else:
        paths = [str(make(tmp_path))]
    with pytest.raises(error, match=message):
        train_main(train_flags(assets, tmp_path, "--train-data", *paths))


def test_a_leading_byte_order_mark_is_not_data(tmp_path):
    path = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + GOOD.encode() * 2)
    assert load_examples(path).examples == [{"prompt": "1+1=", "completion": "2"}] * 2


# --------------------------------------------------------------------------------- length and context


def long_examples() -> list[dict[str, str]]:
    return [*sum_examples(3), {"prompt": "1+" * 200 + "1=", "completion": "201"}]  # 407 tokens with BOS/EOS


def test_strict_length_refuses_an_overlong_example_naming_it(tmp_path):
    path = write_jsonl(long_examples(), tmp_path / "long.jsonl")
    with pytest.raises(DataError, match=r"long\.jsonl:4: 407 tokens, longer than max_length=64 \(1 of 4 examples"):
        tokenize(path, char_tokenizer(), max_length=64, strict_length=True)
    with pytest.warns(TruncationWarning, match=r"1 of 4 examples were longer than max_length=64"):
        assert tokenize(path, char_tokenizer(), max_length=64).num_truncated == 1


def test_calm_train_strict_length_fails_before_loading_models(assets, tmp_path, no_model_loading):
    path = write_jsonl(long_examples(), tmp_path / "long.jsonl")
    with pytest.raises(DataError, match=r"long\.jsonl:4: 407 tokens, longer than max_length=100"):
        train_main(train_flags(assets, tmp_path, "--train-data", str(path), "--max-length", "100",
                               "--strict-length"))


def test_calm_train_limits_examples_to_the_models_context_before_loading_them(assets, tmp_path, no_model_loading):
    """The tiny bases have max_position_embeddings=256: with the default max_length=512 an example of 407
    tokens is cut to 256 (counted), or refused under --strict-length -- checked from the models' configs."""
    path = write_jsonl(long_examples(), tmp_path / "long.jsonl")
    with pytest.raises(DataError, match=r"long\.jsonl:4: 407 tokens, longer than max_length=256"):
        train_main(train_flags(assets, tmp_path, "--train-data", str(path), "--strict-length"))
    with pytest.warns(TruncationWarning, match=r"1 of 4 examples were longer than max_length=256"), \
            pytest.raises(AssertionError, match="a model was loaded"):  # the data passed: models load next
        train_main(train_flags(assets, tmp_path, "--train-data", str(path)))


def test_training_never_feeds_an_absolute_position_model_beyond_its_context(tmp_path):
    """GPT-2 has learned positions: without the context limit, the 407-token example would fail mid-run."""
    anchor, augment = tiny("gpt2", 32, 2, 4, seed=0), tiny("llama", 16, 2, 2, seed=1)
    model = calm.compose(anchor, augment)
    with pytest.warns(TruncationWarning, match="max_length=256"):
        result = train(model, char_tokenizer(), long_examples(),
                       config=quick(tmp_path, max_steps=2, per_device_train_batch_size=2))
    assert result.global_step == 2
    with pytest.raises(DataError, match=r"examples row 3: 407 tokens, longer than max_length=256"):
        train(calm.compose(anchor, augment), char_tokenizer(), long_examples(),
              config=quick(tmp_path, "strict", max_steps=2, strict_length=True))


def test_pretokenised_data_longer_than_the_context_is_refused(tmp_path):
    with pytest.warns(TruncationWarning):
        data = tokenize(long_examples(), char_tokenizer(), max_length=300, loss_on="all")
    with pytest.raises(DataError, match=r"a tokenised example has 300 tokens, more than max_length=256"):
        train(composed(), char_tokenizer(), data, config=quick(tmp_path))


# ------------------------------------------------------------------------------------------ vocabulary


def small_vocab_model(vocab_size: int) -> tf.PreTrainedModel:
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    return tf.LlamaForCausalLM(config)


def test_token_ids_outside_the_models_vocabulary_name_the_line(tmp_path):
    """The character tokenizer has 46 ids; a model with 40 has no room for 'u'..'z' (ids 40-45)."""
    path = write_jsonl([{"text": "abc"}, {"text": "abz"}], tmp_path / "text.jsonl")
    model = small_vocab_model(40)
    model.requires_grad_(True)
    with pytest.raises(DataError, match=r"text\.jsonl:2: token id 45 is outside the model's vocabulary "
                                        r"\(vocab_size=40\): the tokenizer does not fit the model"):
        train(model, char_tokenizer(), path, config=quick(tmp_path))
    assert not (tmp_path / "run").exists()


def test_a_padding_id_outside_the_vocabulary_is_refused(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<newpad>"})  # id 46
    model = small_vocab_model(46)
    with pytest.raises(DataError, match=r"padding token id 46 is outside the model's vocabulary \(vocab_size=46\)"):
        train(model, tokenizer, [{"text": "abc"}], config=quick(tmp_path))


def test_calm_train_checks_the_vocabulary_before_loading_models(tmp_path, no_model_loading):
    assets = make_assets(tmp_path / "assets", num_examples=2)
    for base in ("anchor", "augment"):  # models that share a tokenizer, which has more tokens than they know
        config = json.loads((assets[base] / "config.json").read_text())
        (assets[base] / "config.json").write_text(json.dumps({**config, "vocab_size": 15}))  # no '=' (id 19)
    with pytest.raises(DataError, match=r"train\.jsonl:1: token id \d+ is outside the model's vocabulary "
                                        r"\(vocab_size=15\)"):
        train_main(train_flags(assets, tmp_path, "--train-data", str(assets["train"])))


def test_evaluation_checks_vocabulary_and_context_too():
    from calm.eval import mean_loss

    with pytest.raises(DataError, match=r"examples row 0: token id 45 is outside the model's vocabulary"):
        mean_loss(small_vocab_model(40), char_tokenizer(), [{"text": "z"}])
    with pytest.warns(TruncationWarning, match="max_length=256"):  # GPT-2's 256 positions, not the default 2048
        assert mean_loss(tiny("gpt2"), char_tokenizer(), long_examples()) > 0
