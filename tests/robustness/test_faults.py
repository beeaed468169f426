"""Faults: SIGKILL at any moment, a full disk, a NaN/inf loss. The latest complete checkpoint always loads,
resuming finishes the run with the weights of an uninterrupted one, and a failed or killed save never
damages the checkpoint before it."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from robust_support import (
    char_tokenizer,
    composed,
    composition_state,
    fork_run,
    fork_start,
    quick,
    sum_examples,
    wait_exit_code,
)
from transformers import TrainerCallback

import calm
import calm.serialization
from calm.serialization import CONFIG_NAME, WEIGHTS_NAME, save_composition
from calm.train import (
    STAGING_PREFIX,
    CheckpointError,
    NonFiniteLossError,
    check_checkpoint,
    latest_checkpoint,
    read_metrics,
    train,
)

STEPS = 8  # checkpoints at 2, 4, 6, 8; two kept
DATA = sum_examples(16)


def options(root: Path, name: str = "run", **overrides: Any):
    return quick(root, name, **{"max_steps": STEPS, "per_device_train_batch_size": 2, "save_steps": 2,
                                "save_total_limit": 2, **overrides})


def run(root: Path, name: str = "run", callbacks=(), model=None, **overrides: Any):
    return train(model or composed(), char_tokenizer(), DATA, config=options(root, name, **overrides),
                 callbacks=callbacks)


# ------------------------------------------------------------------------------------------ kill switch


@dataclass
class KillSwitch:
    """Records the I/O events of a run (weight files, torch.save files, renames, directory deletions, optimizer
    steps) and, when armed, SIGKILLs the process at the `occurrence`-th event of `kind` whose detail contains
    `where`: before it, after it, or halfway through it (half a file written, one file of a directory deleted).
    """

    kind: str = "any"
    where: str = ""
    occurrence: int = 0  # 0: never kill, only record
    mode: str = "before"  # before | after | partial
    root: str = ""
    events: list[tuple[str, str]] = field(default_factory=list)
    _seen: int = 0

    def install(self, patch: pytest.MonkeyPatch) -> None:
        save_file, torch_save, replace, rmtree = calm.serialization.save_file, torch.save, os.replace, shutil.rmtree

        def half_file(write: Any, path: Any) -> None:  # the whole file written, then cut in half
            write()
            os.truncate(path, os.path.getsize(path) // 2)

        def delete_one(path: Any) -> None:
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if files:
                files[0].unlink()

        def patched_save_file(tensors, filename, *args, **kwargs):
            write = lambda: save_file(tensors, filename, *args, **kwargs)
            return self._event("save_file", filename, write, lambda: half_file(write, filename))

        def patched_torch_save(obj, f, *args, **kwargs):
            write = lambda: torch_save(obj, f, *args, **kwargs)
            return self._event("torch.save", f, write, lambda: half_file(write, f))

        def patched_replace(src, dst, *args, **kwargs):
            return self._event("os.replace", f"{src} -> {dst}", lambda: replace(src, dst, *args, **kwargs),
                               lambda: None)

        def patched_rmtree(path, *args, **kwargs):
            return self._event("rmtree", path, lambda: rmtree(path, *args, **kwargs), lambda: delete_one(path))

        patch.setattr(calm.serialization, "save_file", patched_save_file)
        patch.setattr(torch, "save", patched_torch_save)
        patch.setattr(os, "replace", patched_replace)
        patch.setattr(shutil, "rmtree", patched_rmtree)

    def callback(self) -> TrainerCallback:
        switch = self

        class StepEvents(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                switch._event("step", str(state.global_step), lambda: None, lambda: None)

        return StepEvents()

    def _event(self, kind: str, detail: Any, run: Any, half: Any) -> Any:
        detail = str(detail).replace(self.root, "")
        self.events.append((kind, detail))
        hit = False
        if self.occurrence and self.kind in ("any", kind) and self.where in detail:
            self._seen += 1
            hit = self._seen == self.occurrence
        if hit and self.mode == "partial":
            half()
        if hit and self.mode in ("before", "partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        result = run()
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its final weights, its I/O events, and how long it took."""
    root = tmp_path_factory.mktemp("reference")
    switch = KillSwitch(root=str(root))
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        switch.install(patch)
        model = composed()
        run(root, model=model, callbacks=[switch.callback()])
    return {"state": composition_state(model), "events": switch.events, "seconds": time.perf_counter() - start}


def killed_run(root: Path, switch: KillSwitch) -> int:
    """Train in a forked child with `switch` armed; the child's exit code (-9: killed)."""
    switch.root = str(root)

    def child() -> None:
        switch.install(pytest.MonkeyPatch())
        run(root, callbacks=[switch.callback()])

    return fork_run(child)


def check_recovery(root: Path, reference: dict, expected_latest: str | None = "any") -> None:
    """The latest complete checkpoint loads and passes every resume check; resuming finishes the run with the
    reference weights, and metrics.jsonl tells one history."""
    checkpoints = root / "run" / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if expected_latest != "any":
        assert (latest.name if latest else None) == expected_latest
    if latest is not None:
        probe = composed()
        check_checkpoint(latest, probe)
        calm.CALMForCausalLM.from_pretrained(latest, anchor=probe.anchor, augments=list(probe.augments))
    model = composed()
    result = run(root, model=model, resume=True)
    assert result.global_step == STEPS
    assert result.resumed_from == (str(latest) if latest else None)
    for name, value in reference["state"].items():
        torch.testing.assert_close(composition_state(model)[name], value, rtol=0, atol=1e-6)
    steps = [r["step"] for r in read_metrics(root / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert (root / "run" / WEIGHTS_NAME).is_file() and (root / "run" / CONFIG_NAME).is_file()


@pytest.mark.parametrize("seed", range(5))
def test_sigkill_at_a_random_event_then_resume(tmp_path, reference, seed):
    rng = random.Random(seed)
    occurrence = rng.randint(1, len(reference["events"]))
    switch = KillSwitch(occurrence=occurrence, mode=rng.choice(["before", "after", "partial"]))
    assert killed_run(tmp_path, switch) == -signal.SIGKILL, f"event {occurrence}: {reference['events']}"
    check_recovery(tmp_path, reference)


# (kind, where, occurrence, mode, latest checkpoint left by the kill)
DURING_SAVES = [
    ("save_file", "checkpoint-4", 1, "partial", "checkpoint-2"),  # half of model.safetensors written
    ("torch.save", "checkpoint-4/optimizer.pt", 1, "partial", "checkpoint-2"),
    ("torch.save", "checkpoint-4/rng_state.pth", 1, "after", "checkpoint-2"),  # before trainer_state.json
    ("os.replace", "checkpoint-4 -> ", 1, "before", "checkpoint-2"),  # just before publishing
    ("os.replace", "checkpoint-4 -> ", 1, "after", "checkpoint-4"),  # just after publishing
    ("rmtree", "checkpoints/checkpoint-2", 1, "partial", "checkpoint-6"),  # halfway through deleting the oldest
    ("save_file", "run/.model.safetensors", 1, "partial", "checkpoint-8"),  # the final model
]


@pytest.mark.parametrize(("kind", "where", "occurrence", "mode", "latest"), DURING_SAVES,
                         ids=[f"{k}-{m}-{w.split('/')[-1].strip(' ->')}" for k, w, _, m, _ in DURING_SAVES])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, reference, kind, where, occurrence,
                                                                  mode, latest):
    assert any(k == kind and where in d for k, d in reference["events"]), "no such event in a run"
    switch = KillSwitch(kind=kind, where=where, occurrence=occurrence, mode=mode)
    assert killed_run(tmp_path, switch) == -signal.SIGKILL
    check_recovery(tmp_path, reference, expected_latest=latest)


@pytest.mark.parametrize("seed", range(2))
def test_sigkill_at_a_random_time_then_resume(tmp_path, reference, seed):
    """A real asynchronous kill from outside, at a random moment of the run (it may also land before the
    first checkpoint, or after the end)."""
    delay = random.Random(100 + seed).uniform(0.1, 1.0) * reference["seconds"]
    pid = fork_start(lambda: run(tmp_path))
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    assert wait_exit_code(pid) in (-signal.SIGKILL, 0)
    check_recovery(tmp_path, reference)


def test_a_half_written_metrics_line_does_not_stop_a_resume(tmp_path, reference):
    assert killed_run(tmp_path, KillSwitch(kind="step", occurrence=5)) == -signal.SIGKILL
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 1.2')  # killed in the middle of a log line
    check_recovery(tmp_path, reference, expected_latest="checkpoint-4")


# ------------------------------------------------------------------------------------------ disk full


def no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def torch_write_failed(*args: Any, **kwargs: Any) -> None:
    # What torch.save itself raises when the disk fills up under it.
    raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed")


@pytest.mark.parametrize(("target", "where", "fail", "message"), [
    ("calm.serialization.save_file", "checkpoint-4", no_space, "No space left on device"),
    ("torch.save", "checkpoint-4/optimizer.pt", no_space, "No space left on device"),
    ("torch.save", "checkpoint-4/scheduler.pt", torch_write_failed, "file write failed"),
    ("pathlib.Path.write_text", "checkpoint-4/data_state.json", no_space, "No space left on device"),
])
def test_disk_full_during_a_save_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path, reference, monkeypatch,
                                                                                 target, where, fail, message):
    module, name = target.rsplit(".", 1)
    owner = {"calm.serialization": calm.serialization, "torch": torch, "pathlib.Path": Path}[module]
    original = getattr(owner, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if any(where in str(a) for a in args):
            fail()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(CheckpointError, match=rf"could not save checkpoint-4 in .*: .*{message}.* Nothing was "
                                              r"published and the previous checkpoint, checkpoint-2, is intact"):
        run(tmp_path)
    monkeypatch.undo()  # the disk has space again
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # no staging directory left
    check_recovery(tmp_path, reference, expected_latest="checkpoint-2")


@pytest.mark.parametrize("failing_file", [WEIGHTS_NAME, CONFIG_NAME])
def test_disk_full_while_saving_a_composition_keeps_the_old_files(tmp_path, monkeypatch, failing_file):
    old, new = composed(), composed()
    with torch.no_grad():
        for p in new.composition.parameters():
            p.add_(1.0)
    save_composition(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if failing_file == WEIGHTS_NAME:
        monkeypatch.setattr(calm.serialization, "save_file", no_space)
    else:
        original = Path.write_text
        monkeypatch.setattr(Path, "write_text",
                            lambda self, *a, **k: no_space() if CONFIG_NAME in self.name else original(self, *a, **k))
    with pytest.raises(OSError, match="No space left on device"):
        save_composition(new, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either


# ----------------------------------------------------------------------------------------- NaN / inf


class PoisonAt(TrainerCallback):
    """Makes step `step`'s loss NaN (through the anchor's logits), or its gradient inf, for that step only."""

    def __init__(self, model: calm.CALMForCausalLM, step: int, what: str = "loss") -> None:
        self.step, self.what, self.active = step, what, False
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        model.anchor.lm_head.register_forward_hook(self._logits)
        self._param = next(p for p in model.composition.parameters())
        self._param.register_hook(self._grad)

    def _logits(self, module, args, output):
        return output * float("nan") if self.active and self.what == "loss" else None

    def _grad(self, grad):
        return grad * float("inf") if self.active and self.what == "gradient" else None

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False
        self.states[state.global_step] = composition_state(kwargs["model"])


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nan_stops_training_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, reference, what):
    model = composed()
    poison = PoisonAt(model, step=3, what=what)
    with pytest.raises(NonFiniteLossError, match=rf"the {what} is NaN or inf at step 3: training stopped before "
                                                 r"that update \(the latest checkpoint, .*checkpoint-2, is kept\)"):
        run(tmp_path, model=model, callbacks=[poison])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]
    assert not (tmp_path / "run" / WEIGHTS_NAME).exists(), "no final model from a stopped run"
    assert all(torch.isfinite(v).all() for v in composition_state(model).values())
    for name, value in poison.states[2].items():  # the poisoned step changed nothing
        assert torch.equal(composition_state(model)[name], value)
    check_recovery(tmp_path, reference, expected_latest="checkpoint-2")


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nan_skip_mode_skips_only_that_step(tmp_path, what):
    model = composed()
    poison = PoisonAt(model, step=3, what=what)
    result = run(tmp_path, model=model, callbacks=[poison], on_nan="skip")
    assert result.global_step == STEPS and result.skipped_steps == 1
    assert all(torch.equal(poison.states[3][k], v) for k, v in poison.states[2].items()), "step 3 was applied"
    assert any(not torch.equal(poison.states[4][k], v) for k, v in poison.states[3].items()), "step 4 was not"
    assert all(torch.isfinite(v).all() for v in composition_state(model).values())
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"checkpoint-{STEPS}"


def test_an_exploding_update_stops_before_it_is_saved(tmp_path):
    """AdamW's step 2 moves each weight by its learning rate / (1 - 0.9**2): with 1.5e38 (warming up to 3e38)
    that overflows float32 though loss and gradients are finite. No checkpoint may hold those weights."""
    with pytest.raises(NonFiniteLossError, match=r"the weights became NaN or inf in the update at step 2: training "
                                                 r"stopped before saving it \(the latest checkpoint, .*checkpoint-1, "):
        run(tmp_path, learning_rate=3e38, warmup_steps=2, max_grad_norm=0.0, save_steps=1)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.name == "checkpoint-1"
    probe = composed()
    saved = calm.CALMForCausalLM.from_pretrained(checkpoint, anchor=probe.anchor, augments=list(probe.augments))
    assert all(torch.isfinite(v).all() for v in composition_state(saved).values())
