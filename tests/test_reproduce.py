"""End to end: the installed `calm reproduce kv-arithmetic --quick` runs the whole pipeline on tiny sizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CALM = shutil.which("calm", path=str(Path(sys.executable).parent)) or "calm"


@pytest.mark.slow
def test_quick_reproduction_writes_every_output(tmp_path):
    out = tmp_path / "kv"
    done = subprocess.run([CALM, "reproduce", "kv-arithmetic", "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| CALM |" in done.stdout
    for name in ("results.md", "results.json", "learning_curves.png", "attention.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "results.json").read_text())
    assert set(result["table"]) == {"m_A", "m_B", "CALM", "m_B + LoRA", "m_B fine-tuned"}
    assert set(result["table"]["CALM"]) == {"kv_substitution", "numeric_arithmetic", "kv_arithmetic_seen",
                                            "kv_arithmetic_unseen"}
    calm_params, lora_params = (result["runs"][k]["trainable_params"] for k in ("CALM", "m_B + LoRA"))
    assert abs(lora_params - calm_params) <= 0.1 * calm_params  # the LoRA baseline matches CALM's size
    assert (out / "models" / "m_a" / "config.json").is_file()  # base models are real HF checkpoints
    assert (out / "runs" / "calm" / "calm.safetensors").is_file()
