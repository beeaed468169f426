"""Shared helpers of the robustness suite (issue 8): tiny models, quick training configs, forked workers.

There is deliberately no `conftest.py` in this directory: pytest imports every conftest outside a package as
the module `conftest`, so one here would replace `tests/conftest.py` in `sys.modules` and break the other test
files' `from conftest import tiny`. The parent conftest (fixtures such as `pair`) applies here as usual.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import randomize, tiny  # noqa: E402
from train_worker import char_tokenizer, make_assets, sum_examples, write_jsonl  # noqa: E402

import calm  # noqa: E402
from calm.train import TrainConfig  # noqa: E402

__all__ = ["TESTS", "char_tokenizer", "composed", "composition_state", "fork_run", "fork_start", "make_assets",
           "quick", "randomize", "sum_examples", "tiny", "wait_exit_code", "write_jsonl"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked children must not inherit a Rust thread pool


def composed(augment_mode: str = "iterative") -> calm.CALMForCausalLM:
    """A 2-layer Llama anchor with a 2-layer Qwen2 augment, the same weights on every call."""
    anchor, augment = tiny("llama", 32, 2, 4, seed=0), tiny("qwen2", 16, 2, 2, seed=1)
    torch.manual_seed(0)
    return calm.compose(anchor, augment, augment_mode=augment_mode)


def quick(tmp_path: Path, name: str = "run", **overrides: Any) -> TrainConfig:
    """A few-step, quiet training configuration writing to tmp_path/name."""
    options = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                   save_steps=0, progress_bar=False, warmup_steps=0.25, learning_rate=1e-3, tensorboard=False,
                   plot=False)
    return TrainConfig(**{**options, **overrides})


def composition_state(model: calm.CALMForCausalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.composition.state_dict().items()}


def fork_start(target: Callable[[], None]) -> int:
    """Run `target` in a forked child process; return its pid (reap it with `wait_exit_code`).

    Forking skips the 5-10 s of importing torch and transformers again, which keeps the SIGKILL tests fast; the
    child is a separate process, so a SIGKILL there is as final as in any run. The suite uses one torch thread,
    which makes forking a process that has used torch safe."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            target()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def wait_exit_code(pid: int) -> int:
    """The child's exit code; negative: the signal that ended it."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def fork_run(target: Callable[[], None]) -> int:
    """Run `target` in a forked child and return its exit code (negative: the signal that ended it)."""
    return wait_exit_code(fork_start(target))
