"""Loading and sharing a composition the way Hugging Face users do: one call loads the bases, tokenizers and
composition, from a local directory or the Hub (an offline Hub cache here); `save_pretrained` honours or refuses
every argument, pushes to the Hub and writes a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import tokenizers
import torch
import transformers as tf
from conftest import VOCAB, randomize, tiny

import calm
from calm.serialization import CONFIG_NAME, WEIGHTS_NAME

X = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w1")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.fixture
def bases_on_disk(tmp_path, monkeypatch):
    """Tiny bases saved in tmp_path/anchor and tmp_path/augment, loaded by relative path as `--anchor anchor`
    types it; the working directory is tmp_path/work."""
    tiny("llama", 32, 4, 4).save_pretrained(tmp_path / "anchor")
    tiny("qwen2", 16, 6, 2, seed=1).save_pretrained(tmp_path / "augment")
    monkeypatch.chdir(tmp_path)
    anchor = tf.AutoModelForCausalLM.from_pretrained("anchor")
    augment = tf.AutoModelForCausalLM.from_pretrained("augment")
    (tmp_path / "work").mkdir()
    return anchor, augment


@pytest.fixture
def no_hub(monkeypatch):
    """Every Hub download refused at once (as offline), and the ids asked for recorded."""
    asked = []
    original = tf.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        asked.append(str(name))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    return asked


def test_bases_are_recorded_by_absolute_path_and_load_from_anywhere(tmp_path, bases_on_disk, monkeypatch):
    model = calm.compose(*bases_on_disk, num_connections=2)
    randomize(model)
    model.save_pretrained("work/calm")
    config = json.loads((tmp_path / "work" / "calm" / CONFIG_NAME).read_text())
    assert config["anchor"]["name_or_path"] == "anchor"  # as typed
    assert config["anchor"]["local_path"] == str(tmp_path / "anchor")
    assert config["augments"][0]["local_path"] == str(tmp_path / "augment")
    monkeypatch.chdir(tmp_path / "work")  # "anchor" means nothing from here
    loaded = calm.CALMForCausalLM.from_pretrained("calm")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_a_missing_base_is_named_with_every_place_looked_and_never_sought_on_the_hub(tmp_path, bases_on_disk,
                                                                                       no_hub):
    calm.compose(*bases_on_disk, num_connections=2).save_pretrained(tmp_path / "calm")
    shutil.move(tmp_path / "augment", tmp_path / "moved")
    with pytest.raises(FileNotFoundError) as error:
        calm.CALMForCausalLM.from_pretrained(tmp_path / "calm")
    message = str(error.value)
    assert message.startswith("augments[0] not found from the saved composition (recorded as 'augment'): "
                              f"local directory {tmp_path / 'augment'}: does not exist")
    assert "Pass it as augments=[...]" in message
    assert no_hub == [str(tmp_path / "anchor")]  # the anchor loaded; nothing asked of the Hub for the augment

    # An override by path (or a model) replaces the record; None keeps it.
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path / "calm", augments=[tmp_path / "moved"])
    assert loaded.augments[0].name_or_path == str(tmp_path / "moved")
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path / "calm", anchor=str(tmp_path / "anchor"),
                                                  augments=[loaded.augments[0]])
    assert loaded.anchor.name_or_path == str(tmp_path / "anchor")


def test_a_hub_base_that_cannot_be_fetched_is_named_with_its_revision(tmp_path, pair, no_hub, monkeypatch):
    model = calm.compose(*pair, num_connections=1)
    model.save_pretrained(tmp_path / "calm")
    config = json.loads((tmp_path / "calm" / CONFIG_NAME).read_text())
    config["anchor"] |= {"hub_id": "someone/anchor", "revision": "a" * 40}
    (tmp_path / "calm" / CONFIG_NAME).write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match=r"^anchor not found from the saved composition \(no name recorded\): "
                                                rf"Hub repo someone/anchor at revision {'a' * 40}: .*Pass it as "
                                                r"anchor= \(a model, a local directory or a Hub id\)"):
        calm.CALMForCausalLM.from_pretrained(tmp_path / "calm")
    assert no_hub == ["someone/anchor"]


def test_an_old_record_is_loaded_by_its_name_and_a_missing_local_one_fails_fast(tmp_path, bases_on_disk, no_hub):
    calm.compose(*bases_on_disk, num_connections=2).save_pretrained(tmp_path / "calm")
    config = json.loads((tmp_path / "calm" / CONFIG_NAME).read_text())
    for record in (config["anchor"], *config["augments"]):  # what calm recorded before it resolved paths
        del record["local_path"]
    config["augments"][0]["name_or_path"] = "./nowhere"
    (tmp_path / "calm" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"augments\[0\] not found .*recorded as './nowhere'\): local "
                                                r"directory ./nowhere: does not exist"):
        calm.CALMForCausalLM.from_pretrained(tmp_path / "calm")
    assert no_hub == ["anchor"]  # the name as recorded, found relative to the working directory


# ------------------------------------------------------------------------------------------------ the Hub


def hub_repo(cache: Path, repo_id: str, commit: str) -> Path:
    """An empty snapshot of `repo_id` at `commit` in a Hub cache laid out as huggingface_hub lays it out, its
    main branch pointing there."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_composition_and_its_bases_load_from_the_hub(tmp_path, offline_hub):
    tiny("llama", 32, 4, 4).save_pretrained(hub_repo(offline_hub, "user/anchor", "1" * 40))
    tiny("qwen2", 16, 6, 2, seed=1).save_pretrained(hub_repo(offline_hub, "user/augment", "2" * 40))
    anchor = tf.AutoModelForCausalLM.from_pretrained("user/anchor")
    augment = tf.AutoModelForCausalLM.from_pretrained("user/augment")
    tokenizer = word_tokenizer()
    model = calm.compose(anchor, augment, num_connections=2, tokenizer=tokenizer)
    randomize(model)
    model.save_pretrained(hub_repo(offline_hub, "user/calm", "3" * 40))
    record = json.loads((offline_hub / "models--user--calm/snapshots" / ("3" * 40) / CONFIG_NAME).read_text())
    assert {k: record["anchor"].get(k) for k in ("hub_id", "revision", "local_path")} == \
        {"hub_id": "user/anchor", "revision": "1" * 40, "local_path": None}

    for load in (calm.CALMForCausalLM.from_pretrained, tf.AutoModelForCausalLM.from_pretrained):
        loaded = load("user/calm")
        assert isinstance(loaded, calm.CALMForCausalLM) and loaded.name_or_path == "user/calm"
        torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
        assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert calm.CALMForCausalLM.from_pretrained("user/calm", revision="3" * 40).config.connections == \
        model.config.connections
    with pytest.raises(FileNotFoundError, match=r"user/calm is not a local directory, and Hub repo user/calm at "
                                                r"revision 4{40} could not be fetched"):
        calm.CALMForCausalLM.from_pretrained("user/calm", revision="4" * 40)


def test_the_recorded_hub_revision_is_the_one_loaded_not_the_branch_head(tmp_path, offline_hub):
    tiny("llama", 32, 4, 4).save_pretrained(hub_repo(offline_hub, "user/anchor", "1" * 40))
    tiny("qwen2", 16, 6, 2, seed=1).save_pretrained(hub_repo(offline_hub, "user/augment", "2" * 40))
    anchor = tf.AutoModelForCausalLM.from_pretrained("user/anchor")
    model = calm.compose(anchor, tf.AutoModelForCausalLM.from_pretrained("user/augment"), num_connections=1)
    model.save_pretrained(tmp_path / "calm")
    # The anchor's main branch moves on to other weights: the composition still loads the commit it recorded.
    tiny("llama", 32, 4, 4, seed=7).save_pretrained(hub_repo(offline_hub, "user/anchor", "9" * 40))
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path / "calm")
    assert all(torch.equal(a, b) for a, b in zip(loaded.anchor.parameters(), anchor.parameters()))
    loaded.save_pretrained(tmp_path / "again")  # and saving it again keeps that commit
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["anchor"]["revision"] == "1" * 40


def test_auto_model_passes_its_config_which_must_be_this_compositions(tmp_path, pair):
    model = calm.compose(*pair, num_connections=2)
    model.save_pretrained(tmp_path)
    other = calm.compose(*pair, num_connections=1).config
    with pytest.raises(ValueError, match=r"config.connections=\[\[\[5, 3\]\]\] differs from "
                                         r"\[\[\[2, 1\], \[5, 3\]\]\]"):
        calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=pair[0], augments=[pair[1]], config=other)


# ------------------------------------------------------------------------------------------ save_pretrained


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's calls recorded instead of sent; an upload copies what it would send."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent = list(filter_repo_objects(files, allow_patterns=allow_patterns))
        calls.append(("upload_folder", repo_id, kwargs | {"files": sent,
                                                          "card": (Path(folder_path) / "README.md").read_text()}))
        return "commit-info"

    for name, fake in (("create_repo", create_repo), ("create_branch", create_branch),
                       ("upload_folder", upload_folder)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, fake)
    return calls


def test_save_pretrained_pushes_what_it_wrote(tmp_path, pair, fake_hub):
    model = calm.compose(*pair, num_connections=1, tokenizer=word_tokenizer())
    (tmp_path / "notes.txt").write_text("not part of the composition")
    result = model.save_pretrained(tmp_path, push_to_hub=True, repo_id="user/calm", private=True,
                                   commit_message="first", revision="dev", token="t0k")
    assert result == "commit-info"
    (create, repo, create_kwargs), (branch, _, branch_kwargs), (upload, _, upload_kwargs) = fake_hub
    assert (create, repo, create_kwargs) == ("create_repo", "user/calm", {"private": True, "exist_ok": True})
    assert branch == "create_branch" and branch_kwargs == {"branch": "dev", "exist_ok": True}
    assert upload_kwargs["commit_message"] == "first" and upload_kwargs["revision"] == "dev"
    assert {"calm_config.json", "config.json", "model.safetensors", "README.md"} <= set(upload_kwargs["files"])
    assert any(f.startswith("tokenizer/") for f in upload_kwargs["files"])
    assert "notes.txt" not in upload_kwargs["files"]
    assert "# user/calm" in (tmp_path / "README.md").read_text()


def test_push_to_hub_uploads_a_temporary_save_with_its_tags(pair, fake_hub):
    model = calm.compose(*pair, num_connections=1)
    assert model.push_to_hub("user/calm", tags=["translation"], create_pr=True) == "commit-info"
    upload = fake_hub[-1]
    assert upload[0] == "upload_folder" and upload[2]["create_pr"] is True
    assert "README.md" in upload[2]["files"]
    card = huggingface_hub.ModelCard(upload[2]["card"])
    assert card.data.tags == ["calm", "composition", "translation"] and "# user/calm" in card.text


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"variant": "fp16"}, TypeError, r"unexpected keyword argument\(s\) variant"),
    ({"safe_serialization": False}, ValueError, r"safe_serialization=False: compositions are saved only as "
                                                r"safetensors"),
    ({"repo_id": "user/calm"}, ValueError, r"repo_id only apply when pushing to the Hub: pass push_to_hub=True"),
    ({"max_shard_size": "1KB"}, ValueError, r"max_shard_size='1KB' is smaller than the composition weights"),
])
def test_save_pretrained_refuses_what_it_cannot_honour(tmp_path, pair, kwargs, error, message):
    model = calm.compose(*pair, num_connections=2)
    with pytest.raises(error, match=message):
        model.save_pretrained(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()


def test_save_pretrained_honours_a_shard_size_that_fits_and_only_the_main_process_writes(tmp_path, pair):
    model = calm.compose(*pair, num_connections=2)
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    model.save_pretrained(tmp_path / "main", max_shard_size="5GB", safe_serialization=True)
    assert (tmp_path / "main" / WEIGHTS_NAME).is_file()


# ------------------------------------------------------------------------------------------- the model card


def test_the_model_card_names_bases_connections_size_options_and_data(tmp_path, bases_on_disk):
    model = calm.compose(*bases_on_disk, connections=[[2, 1], [5, 3]], num_heads=2)
    model.config.training_data = {"train": {"source": "train.jsonl", "format": "prompt_completion",
                                            "examples": 1200, "tokens": 34567}}
    model.save_pretrained(tmp_path / "calm")
    card = huggingface_hub.ModelCard.load(tmp_path / "calm" / "README.md")
    assert card.data.library_name == "calm" and "calm" in card.data.tags
    trainable = sum(p.numel() for p in model.composition.parameters())
    assert "| anchor | anchor (a local model) |  | llama | 4 | 32 |" in card.text
    assert str(tmp_path) not in card.text  # no local directory is published
    assert "- augments[0]: 2 → 1, 5 → 3" in card.text
    assert f"Trainable parameters: {trainable:,d}" in card.text
    assert "num_heads=2" in card.text and "qk_norm=True" in card.text
    assert "- training data: train.jsonl (prompt_completion, 1,200 examples, 34,567 tokens)" in card.text
    assert json.loads((tmp_path / "calm" / CONFIG_NAME).read_text())["training_data"]["train"]["examples"] == 1200
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path / "calm")
    assert loaded.config.training_data == model.config.training_data  # kept for the next save


def test_a_readme_that_calm_did_not_write_is_left_alone(tmp_path, pair):
    (tmp_path / "README.md").write_text("# my project\n")
    calm.compose(*pair, num_connections=1).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my project\n"


def test_a_trained_compositions_card_names_its_data_files_not_their_directories(tmp_path):
    from train_worker import char_tokenizer, sum_examples, write_jsonl

    from calm.train import TrainConfig, train

    model = calm.compose(tiny("llama", 32, 2, 4), tiny("qwen2", 16, 2, 2, seed=1))
    (tmp_path / "data").mkdir()
    data = write_jsonl(sum_examples(8), tmp_path / "data" / "train.jsonl")
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                         progress_bar=False, plot=False)
    train(model, char_tokenizer(), data, config=config)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "- training data: train.jsonl (prompt_completion, 8 examples, " in card
    assert str(tmp_path / "data") not in card


def test_a_base_loaded_at_another_revision_is_recorded_at_that_commit(tmp_path, offline_hub):
    tiny("llama", 32, 4, 4).save_pretrained(hub_repo(offline_hub, "user/anchor", "1" * 40))
    tiny("llama", 32, 4, 4, seed=7).save_pretrained(hub_repo(offline_hub, "user/anchor", "9" * 40))  # main now
    tiny("qwen2", 16, 6, 2, seed=1).save_pretrained(hub_repo(offline_hub, "user/augment", "2" * 40))
    anchor = tf.AutoModelForCausalLM.from_pretrained("user/anchor", revision="1" * 40)
    model = calm.compose(anchor, tf.AutoModelForCausalLM.from_pretrained("user/augment"), num_connections=1)
    model.save_pretrained(tmp_path / "calm")
    assert json.loads((tmp_path / "calm" / CONFIG_NAME).read_text())["anchor"]["revision"] == "1" * 40
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path / "calm")
    assert all(torch.equal(a, b) for a, b in zip(loaded.anchor.parameters(), anchor.parameters()))
