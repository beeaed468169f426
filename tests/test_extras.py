"""`pip install calm-compose` alone composes, trains, evaluates, generates, saves and loads: peft and matplotlib
are extras, and a command that needs one names the extra to install. (pyyaml stays a dependency: huggingface_hub,
which transformers needs, requires it.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from train_worker import make_assets

from calm.extras import missing, require

WITHOUT_EXTRAS = "import sys\nfor name in ('peft', 'matplotlib'):\n    sys.modules[name] = None\n"


def run_without_extras(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)


def test_the_core_commands_run_without_the_extras(tmp_path):
    assets = make_assets(tmp_path / "assets", num_examples=8)
    run = tmp_path / "run"
    done = run_without_extras(f"""
        from calm.cli import main
        bases = ["--anchor", {str(assets["anchor"])!r}, "--augment", {str(assets["augment"])!r},
                 "--tokenizer", {str(assets["tokenizer"])!r}]
        assert main(["train", *bases, "--train-data", {str(assets["train"])!r}, "--max-steps", "2",
                     "--batch-size", "4", "--no-progress-bar", "--output-dir", {str(run)!r}]) == 0
        assert main(["eval", "--composition", {str(run)!r}, "--data", {str(assets["eval"])!r},
                     "--max-new-tokens", "4"]) == 0
        assert main(["generate", "--composition", {str(run)!r}, "--prompt", "12+7=", "--max-new-tokens", "4"]) == 0
        import calm
        model = calm.CALMForCausalLM.from_pretrained({str(run)!r})
        assert sys.modules["peft"] is None and sys.modules["matplotlib"] is None
        print("loaded", type(model).__name__)
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded CALMForCausalLM" in done.stdout
    assert "loss.png (plot=True) needs matplotlib, which is not installed: pip install 'calm-compose[plot]'" \
        in done.stderr and not (run / "loss.png").exists() and (run / "metrics.jsonl").is_file()
    predictions = list((run / "eval").glob("*.predictions.jsonl"))
    assert len(predictions) == 1 and len(predictions[0].read_text().splitlines()) == 4


def test_commands_that_need_an_extra_name_it(tmp_path):
    done = run_without_extras("""
        from calm.cli import main
        assert main(["reproduce", "kv-arithmetic", "--quick"]) == 2
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calm reproduce needs peft, matplotlib, which is not installed: pip install 'calm-compose[reproduce]'" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_require_is_silent_when_the_packages_are_there():
    require("json", "peft", needed_by="this test")
    assert missing("json", needed_by="this test") is None
    assert missing("no_such_package", needed_by="this test", extra="plot") == \
        "this test needs no_such_package, which is not installed: pip install 'calm-compose[plot]'"
