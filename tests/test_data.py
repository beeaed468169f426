"""Training data: reading and validating JSONL / datasets, tokenising, truncating and padding."""

from __future__ import annotations

import json

import pytest
import torch
from train_worker import char_tokenizer, write_jsonl

from calm.data import (
    CHAT,
    IGNORE_INDEX,
    PROMPT_COMPLETION,
    TEXT,
    DataError,
    PaddingCollator,
    TruncationWarning,
    encode_prompts,
    load_examples,
    load_prompts,
    pad,
    tokenize,
)

# A chat template of the kind real ones are: each turn framed by special tokens, and a generation prompt that
# opens the assistant's turn.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
CHAT_EXAMPLE = {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2"},
                             {"role": "assistant", "content": "3"}, {"role": "user", "content": "4+4"},
                             {"role": "assistant", "content": "8"}]}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_reads_prompt_completion_jsonl_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+2=", "completion": "3", "id": 7}\n\n   \n'
                    '{"prompt": "a", "completion": "b"}\n')
    data = load_examples(path)
    assert data.format == PROMPT_COMPLETION
    assert data.examples == [{"prompt": "1+2=", "completion": "3"}, {"prompt": "a", "completion": "b"}]


def test_reads_text_jsonl_lists_of_files_and_dicts(tmp_path):
    a = write_jsonl([{"text": "hello"}], tmp_path / "a.jsonl")
    b = write_jsonl([{"text": "world"}, {"text": "again"}], tmp_path / "b.jsonl")
    data = load_examples([a, str(b)])
    assert data.format == TEXT and len(data) == 3
    assert load_examples([{"text": "x"}]).examples == [{"text": "x"}]


def test_reads_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"},
                                     {"prompt": "2+2=", "completion": "4"}])
    assert load_examples(ds).examples[1] == {"prompt": "2+2=", "completion": "4"}
    bad = datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}])
    with pytest.raises(DataError, match=r"dataset row 0: missing key 'completion'"):
        load_examples(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r":2: malformed JSON"),
        ('{"prompt": "a", "completion": "b"}\n[1, 2]\n', r":2: expected a JSON object, got list"),
        ('{"prompt": "a"}\n', r":1: missing key 'completion'"),
        ('{"question": "a", "answer": "b"}\n', r":1: expected keys 'prompt' and 'completion', 'text', or 'messages'"),
        ('{"messages": []}\n', r":1: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}\n', r":1: messages\[0\] must be an object with 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r":1: no 'assistant' message"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n',
         r":1: messages\[1\]\.content is an empty string"),
        ('{"messages": [{"role": "assistant", "content": 3}]}\n', r":1: messages\[0\]\.content must be a string"),
        ('{"text": "a", "messages": []}\n', r":1: has both 'text' and 'messages'"),
        ('{"prompt": "a", "completion": ""}\n', r":1: 'completion' is an empty string"),
        ('{"text": ""}\n', r":1: 'text' is an empty string"),
        ('{"prompt": "a", "completion": 3}\n', r":1: 'completion' must be a string, got int"),
        ('{"prompt": "a", "completion": "b"}\n{"text": "c"}\n',
         r":2: a 'text' record, but .*:1 is 'prompt_completion'"),
        ('{"text": "c", "prompt": "a", "completion": "b"}\n', r":1: has both 'text' and 'prompt'"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + message):
        load_examples(path)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_examples(path)


def test_empty_or_missing_data_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no examples"):
        load_examples([])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(TypeError, match="JSONL path"):
        load_examples(42)


def test_prompt_completion_labels_cover_only_the_completion_and_eos(tok):
    data = tokenize([{"prompt": "1+2=", "completion": "3"}], tok, max_length=64)
    row = data[0]
    prompt = tok("1+2=")["input_ids"]
    assert row["input_ids"] == prompt + tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert row["labels"][len(prompt):] == row["input_ids"][len(prompt):]
    assert row["augment_length"] == len(prompt)
    everything = tokenize([{"prompt": "1+2=", "completion": "3"}], tok, max_length=64, loss_on="all")[0]
    assert everything["labels"] == everything["input_ids"]


def test_text_labels_cover_everything(tok):
    row = tokenize([{"text": "abc"}], tok, max_length=64)[0]
    assert row["labels"] == row["input_ids"] == tok("abc")["input_ids"] + [tok.eos_token_id]
    with pytest.raises(DataError, match="loss_on='completion' needs prompt/completion data"):
        tokenize([{"text": "abc"}], tok, max_length=64, loss_on="completion")
    with pytest.raises(ValueError, match="loss_on='nope'"):
        tokenize([{"text": "abc"}], tok, max_length=64, loss_on="nope")


def test_truncation_is_counted_and_examples_without_targets_are_dropped(tok):
    examples = [{"prompt": "1+2=", "completion": "3"},  # 7 tokens with BOS and EOS
                {"prompt": "12345678=", "completion": "9"},  # prompt alone fills max_length
                {"prompt": "1=", "completion": "123456789"}]
    with pytest.warns(TruncationWarning, match=r"2 of 3 examples were longer than max_length=8 .*1 had no"):
        data = tokenize(examples, tok, max_length=8)
    assert len(data) == 2 and data.num_truncated == 2 and data.num_dropped == 1
    assert all(len(r["input_ids"]) <= 8 for r in data.rows)
    assert [r["index"] for r in data.rows] == [0, 1]  # contiguous: the augment cache keys on them
    with pytest.raises(DataError, match="no example has a token"), pytest.warns(TruncationWarning):
        tokenize([{"prompt": "12345678=", "completion": "9"}], tok, max_length=4)


def test_collator_pads_right_per_batch(tok):
    data = tokenize([{"text": "a"}, {"text": "abcd"}], tok, max_length=64)
    batch = PaddingCollator(tok.pad_token_id)([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 6)  # BOS + 4 chars + EOS: the longest in the batch
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["input_ids"][0, 3:].tolist() == [tok.pad_token_id] * 3
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 3
    assert batch["example_index"].tolist() == [0, 1]


def test_left_padded_prompts_for_generation(tok):
    enc = encode_prompts(tok, ["1=", "123="])
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1] * 5]
    assert enc["input_ids"][0, 2:].tolist() == tok("1=")["input_ids"]
    assert pad([[1], [2, 3]], 0, "left").tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="padding side"):
        pad([[1]], 0, "middle")


def test_datasets_round_trip_through_json(tmp_path, tok):
    rows = [{"prompt": "ünïcode=", "completion": "ok"}]
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_examples(path).examples == rows
    assert torch.is_tensor(PaddingCollator(0)(tokenize(path, tok, 32).rows)["input_ids"])


@pytest.fixture
def chat_tok():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def labelled_spans(tokenizer, row) -> list[str]:
    """The text of each run of tokens that carry a label."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans, current = [*spans, tokenizer.decode(current)], []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_chat_records_carry_the_loss_on_the_assistant_turns_through_the_chat_template(tmp_path, chat_tok):
    path = write_jsonl([CHAT_EXAMPLE], tmp_path / "chat.jsonl")
    assert load_examples(path).format == CHAT and load_examples(path).examples == [CHAT_EXAMPLE]
    row = tokenize(path, chat_tok, max_length=128)[0]
    rendered = chat_tok.apply_chat_template(CHAT_EXAMPLE["messages"], tokenize=False)
    assert row["input_ids"] == chat_tok(rendered, add_special_tokens=False)["input_ids"]  # no BOS/EOS added
    assert labelled_spans(chat_tok, row) == ["3</s>", "8</s>"]  # each turn with its end-of-turn token
    first_prompt = chat_tok.apply_chat_template(CHAT_EXAMPLE["messages"][:2], tokenize=False,
                                                add_generation_prompt=True)
    assert row["augment_length"] == len(chat_tok(first_prompt, add_special_tokens=False)["input_ids"])
    everything = tokenize(path, chat_tok, max_length=128, loss_on="all")[0]
    assert everything["labels"] == everything["input_ids"]


def test_chat_data_needs_a_template_that_renders_turns_one_after_another(chat_tok):
    with pytest.raises(DataError, match=r"chat \('messages'\) data needs a tokenizer with a chat template"):
        tokenize([CHAT_EXAMPLE], char_tokenizer(), max_length=128)
    chat_tok.chat_template = ("{% for m in messages %}{% if loop.last %}<s>{{ m['content'] }}:last"
                              "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(DataError, match=r"examples row 0: the chat template does not render this chat's turns one "
                                        r"after another \(messages\[2\]\)"):
        tokenize([CHAT_EXAMPLE], chat_tok, max_length=128)
    chat_tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="examples row 0: the chat template cannot render this chat: roles must"):
        tokenize([CHAT_EXAMPLE], chat_tok, max_length=128)


def test_prompts_files_are_jsonl_records_or_lines(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("1+2=\n\n  \n3+4=\n")
    assert load_prompts(lines) == ["1+2=", "3+4="]
    records = write_jsonl([{"prompt": "a\nb"}, {"prompt": "c", "id": 2}], tmp_path / "p.jsonl")
    assert load_prompts(records) == ["a\nb", "c"]
    write_jsonl([{"prompt": "a"}, {"text": "b"}], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected an object with a non-empty string 'prompt'"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="no such prompts file"):
        load_prompts(tmp_path / "missing.txt")
