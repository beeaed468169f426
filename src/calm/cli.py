"""The `calm` command: compose, train, eval, generate, serve, reproduce, info.

Every subcommand takes `--config FILE.yaml` (keys are the flag names with underscores); flags given on the
command line override the file. Errors print one line and exit non-zero (2: bad arguments, data or files; 1: an
unexpected failure); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import set_seed

from .config import AUGMENT_MODES, COMPOSITION_DTYPES, DEPRECATED_INITS, INITS, OPTIONS, PRESETS
from .data import ExampleSet, load_examples, load_prompts
from .eval import MATCH_MODES
from .extras import require
from .formats import RUN_RECORD, read_version, upgrade_options
from .train import CHECKPOINTS_DIR, TrainConfig, TrainResult, check_run_dir, data_limits, prepare_dataset, train
from .train.checkpoints import TRAINER_STATE_FILE
from .train.options import renamed, simple_type

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UserError(Exception):
    """A problem with the user's input, reported without a traceback."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one `--help` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------- shared options


def add_base_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Flags that name the base models (HF names or local paths) and how to load them."""
    group = parser.add_argument_group("base models")
    group.add_argument("--anchor", required=required, help="anchor model m_B: HF name or local path")
    group.add_argument("--augment", action="append", default=None, required=required,
                       help="augmenting model m_A: HF name or local path (repeat the flag for several)")
    group.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the anchor's)")
    group.add_argument("--augment-tokenizer", action="append", default=None,
                       help="the augment's tokenizer, name or path (repeat it once per --augment): an augment whose "
                            "tokenizer differs from the anchor's reads the anchor's text through its own")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="dtype of the frozen base models (auto: bfloat16 on GPUs that have it, else float32); "
                            "the composition layers' is --composition-dtype")
    group.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a loaded composition runs."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto",
                       help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1, ...")
    group.add_argument("--device-map", default=None,
                       help="instead of --device: the base models' device_map for from_pretrained (e.g. auto, "
                            "which needs accelerate); the composition layers go where the anchor's first "
                            "layer is")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `calm.compose`."""
    group = parser.add_argument_group("composition")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--connections", type=parse_connections, default=None,
                       help="augment_block:anchor_block pairs, 0-based, e.g. '3:7,7:15'; ';' separates augments")
    which.add_argument("--num-connections", type=int, default=None, help="n connections spaced evenly")
    which.add_argument("--every", type=int, default=None, help="tap every k-th augment block (paper: 4)")
    group.add_argument("--num-heads", type=int, default=None, help="cross-attention heads (default: the anchor's)")
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="start the layer options below from a preset (flags given with it still win): paper, "
                            "the paper's plain layer: --rope-theta none --no-qk-norm --no-value-norm "
                            "--augment-norm none --init random --augment-dropout 0")
    group.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=True,
                       help="RMS-normalise what the cross-attention queries and keys read (the anchor's states, "
                            "f_proj's output)")
    group.add_argument("--value-norm", action=argparse.BooleanOptionalAction, default=True,
                       help="RMS-normalise what the cross-attention values read (f_proj's output, through the keys' "
                            "norm)")
    group.add_argument("--rope-theta", type=parse_rope_theta, default=10000.0,
                       help="rotary position base of the cross-attention ('none': no position encoding, as the "
                            "paper's code)")
    group.add_argument("--augment-dropout", type=float, default=0.0,
                       help="dropout on the augments' states before f_proj, in training only (default: 0)")
    group.add_argument("--augment-norm", nargs="?", const=True, default=True, type=parse_augment_norm,
                       metavar="{rms,block,none}",
                       help="how f_proj reads the augments' states: rms (the default) scales each to unit RMS; "
                            "block reads it through the augment's own next-block input norm (pretrained augments "
                            "with massive activations, e.g. Gemma); none leaves it as it is")
    group.add_argument("--no-augment-norm", dest="augment_norm", action="store_false",
                       help="the same as --augment-norm none")
    group.add_argument("--init", default="identity", choices=[*INITS, *DEPRECATED_INITS],
                       help="identity (the default): zero output projections, so the composition starts as exactly "
                            "the anchor; random: PyTorch's default init of every projection (paper: a deprecated "
                            "name of random)")
    group.add_argument("--augment-mode", default="iterative", choices=AUGMENT_MODES,
                       help="augments read every token (iterative, the paper's default), only the prompt, or "
                            "(stepwise) every token with a different-tokenizer augment reading the completion one "
                            "anchor token at a time")
    group.add_argument("--composition-dtype", default="float32", choices=[*COMPOSITION_DTYPES, "auto"],
                       help="dtype of the composition layers' weights (default: float32; auto: the anchor's, e.g. "
                            "bfloat16 for fused attention kernels; float16 layers need a loss scaler to train)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `calm train` flags besides TrainConfig's (the parser's parent): base models, connections, data."""
    add_base_arguments(parser)
    add_connection_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", nargs="+", required=True, help="training JSONL file(s)")
    data.add_argument("--eval-data", nargs="+", default=None, help="evaluation JSONL file(s)")
    for f in fields(TrainConfig):  # calm's --no-resume etc. (HfArgumentParser adds --no-x only for True defaults)
        if f.name in TrainConfig.__annotations__ and simple_type(f) is bool and f.default is False:
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given (and the `--config` file values the CLI turned into defaults)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                          if f.init and hasattr(args, f.name)})


def parse_augment_norm(text: str) -> bool | str:
    values = {"rms": True, "block": "block", "none": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r}: expected one of rms, block, none")
    return values[text.lower()]


def parse_rope_theta(text: str) -> float | None:
    if str(text).lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 1 or 'none', got {text!r}") from None


def parse_connections(text: str) -> list:
    """'3:7,7:15' -> [(3, 7), (7, 15)]; '1:1;3:3' (one group per augment) -> [[(1, 1)], [(3, 3)]]."""
    groups = []
    for group in text.split(";"):
        pairs = []
        for item in filter(str.strip, group.split(",")):
            parts = item.split(":")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise argparse.ArgumentTypeError(
                    f"bad connection {item.strip()!r}: expected augment_block:anchor_block, e.g. 3:7")
            pairs.append((int(parts[0]), int(parts[1])))
        groups.append(pairs)
    return groups[0] if len(groups) == 1 else groups


def base_dtype(name: str | None, device: Any = None):
    """The torch dtype a --dtype name stands for ("auto": bfloat16 when the model runs on a GPU that supports it,
    else float32; `device`: where it will run, None: on the GPU when there is one)."""
    import torch

    if name in (None, "auto"):
        on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is invalid: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str):
    """The torch device a --device name stands for (auto: the GPU when there is one, else the CPU)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is invalid: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: there is no CUDA device here (use --device cpu, or auto)")
    return device


def check_model_path(name: str, flag: str, base: bool = True) -> None:
    """Fail at once, without asking the Hub, when a model (or tokenizer) named by a local path is not there, or
    when a saved composition is given where a `base` model goes. Names that can be Hub ids (`name`, `org/name`)
    are left to `from_pretrained`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .serialization import CONFIG_NAME

    path = Path(name)
    if base and (path / CONFIG_NAME).is_file():
        raise UserError(f"{flag} {name}: this is a composition ({CONFIG_NAME}), not a base model: use "
                        f"--composition {name} (calm eval, generate, serve)")
    if path.exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"{flag} {name}: no such file or directory (and not a Hub model id)") from None


def _load_error(what: str, name: str, flag: str, error: OSError) -> UserError:
    where = "" if Path(name).exists() else " (not a local directory, so it was looked up on the Hub)"
    return UserError(f"{flag} {name}: cannot load the {what}{where}: {_first_line(error)}")


def base_kwargs(args: argparse.Namespace, device: Any = None) -> dict[str, Any]:
    """`from_pretrained` arguments of the base models: remote code, dtype, and `--device-map` where the command
    has it."""
    kwargs = {"trust_remote_code": args.trust_remote_code, "dtype": base_dtype(args.dtype, device)}
    if getattr(args, "device_map", None):
        kwargs["device_map"] = args.device_map
    return kwargs


def load_base(name: str, args: argparse.Namespace, flag: str, device: Any = None):
    """Load one base causal LM by HF name or path, with a clear error when it cannot be found."""
    from transformers import AutoModelForCausalLM

    check_model_path(name, flag)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **base_kwargs(args, device))
    except OSError as e:
        raise _load_error("model", name, flag, e) from e


def load_base_config(name: str, args: argparse.Namespace, flag: str):
    """A base model's config only (no weights): cheap, so that everything can be checked against the model first."""
    from transformers import AutoConfig

    check_model_path(name, flag)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except OSError as e:
        raise _load_error("model config", name, flag, e) from e


def base_configs(args: argparse.Namespace) -> list:
    """The configs of `--anchor` and every `--augment`, in that order (every path checked before any is read)."""
    bases = [(args.anchor, "--anchor"), *((name, "--augment") for name in args.augment)]
    for name, flag in bases:
        check_model_path(name, flag)
    return [load_base_config(name, args, flag) for name, flag in bases]


def augment_tokenizers_from_args(args: argparse.Namespace) -> list | None:
    """The tokenizers `--augment-tokenizer` names (one per `--augment`), or None when it is not given."""
    names = getattr(args, "augment_tokenizer", None)
    if not names:
        return None
    if args.augment and len(names) != len(args.augment):
        raise UserError(f"--augment-tokenizer is given {len(names)} time(s) for {len(args.augment)} --augment: "
                        "give one per augment, in the same order")
    return [load_tokenizer(name, "--augment-tokenizer") for name in names]


def base_tokenizers(args: argparse.Namespace, tokenizer: Any = None) -> tuple[Any, list | None]:
    """(the anchor's tokenizer, the augments' or None) for composing: `tokenizer` when given, else `--tokenizer`,
    else the anchor's own when `--augment-tokenizer` needs it (None otherwise)."""
    augment_tokenizers = augment_tokenizers_from_args(args)
    if tokenizer is None and args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    if tokenizer is None and augment_tokenizers is not None:
        tokenizer = load_tokenizer(args.anchor, "--anchor")
    return tokenizer, augment_tokenizers


def composition_init(args: argparse.Namespace) -> str:
    """`--init` under its current name (a deprecated one warns once)."""
    if args.init in DEPRECATED_INITS:
        print(f"calm: warning: --init {args.init} is deprecated: it is now called --init "
              f"{DEPRECATED_INITS[args.init]}", file=sys.stderr)
        return DEPRECATED_INITS[args.init]
    return args.init


def _compose(args: argparse.Namespace, anchor: Any, augments: list, tokenizers: tuple[Any, list | None]):
    import calm

    tokenizer, augment_tokenizers = tokenizers
    try:
        return calm.compose(anchor, augments, connections=args.connections, num_connections=args.num_connections,
                            every=args.every, num_heads=args.num_heads, qk_norm=args.qk_norm,
                            value_norm=args.value_norm, init=args.init, augment_mode=args.augment_mode,
                            rope_theta=args.rope_theta, augment_dropout=args.augment_dropout,
                            augment_norm=args.augment_norm, composition_dtype=args.composition_dtype,
                            tokenizer=tokenizer,
                            augment_tokenizers=augment_tokenizers)
    except calm.model.TokenizerMismatchError as e:
        raise UserError(f"{e} (on the command line: --augment-tokenizer, once per --augment)") from None


def skeleton(config: Any, args: argparse.Namespace):
    """The model a config describes, with no weights (accelerate's `init_empty_weights`: every parameter and
    buffer on the meta device): its blocks and norms exist, so composing it runs every check `calm.compose`
    makes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)


def check_composition(args: argparse.Namespace, configs: Sequence[Any], tokenizers: tuple[Any, list | None]) -> None:
    """Compose weightless skeletons of the bases: a bad connection, head count, option or tokenizer pairing fails
    here, in a second, before any weights load."""
    from accelerate import init_empty_weights

    anchor, *augments = (skeleton(config, args) for config in configs)
    with init_empty_weights(include_buffers=True):  # the composition layers too
        _compose(args, anchor, augments, tokenizers)


def prepare_composition(args: argparse.Namespace, tokenizer: Any = None,
                        configs: Sequence[Any] | None = None) -> tuple[Any, list | None]:
    """Everything of a composition the flags describe that is cheap to check, checked (`check_composition`):
    returns its tokenizers for `compose_from_args`. `tokenizer`: the anchor's, when already loaded (it is saved
    with the composition); `configs`: the bases' configs, when already read."""
    args.init = composition_init(args)
    tokenizers = base_tokenizers(args, tokenizer)
    check_composition(args, configs or base_configs(args), tokenizers)
    return tokenizers


def compose_from_args(args: argparse.Namespace, tokenizers: tuple[Any, list | None]):
    """Load the base models the flags name and compose them as the flags say, after `prepare_composition`."""
    anchor = load_base(args.anchor, args, "--anchor")
    augments = [load_base(name, args, "--augment") for name in args.augment]
    return _compose(args, anchor, augments, tokenizers)


def load_composition(args: argparse.Namespace, device: Any = None):
    """A saved composition, on the bases given by flags or those its config records; its saved tokenizers, or
    those the flags name (which must be the ones it was trained with). Its config, and the configs of the bases
    the flags name, are checked before any weights load."""
    import calm

    from .serialization import check_base, load_config

    local = Path(args.composition).is_dir()
    if not local:
        check_model_path(args.composition, "--composition", base=False)
    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer") if args.tokenizer else None
    augment_tokenizers = augment_tokenizers_from_args(args)
    if local and (args.anchor or args.augment):
        config = load_config(args.composition)
        given = [("anchor", config.anchor, args.anchor, "--anchor")] if args.anchor else []
        if args.augment:
            if len(args.augment) != len(config.augments):
                raise UserError(f"--augment is given {len(args.augment)} time(s) but the composition has "
                                f"{len(config.augments)} augment(s)")
            given += [(f"augments[{k}]", record, name, "--augment")
                      for k, (record, name) in enumerate(zip(config.augments, args.augment))]
        for who, record, name, flag in given:
            check_base(record, skeleton(load_base_config(name, args, flag), args), who)
    kwargs = base_kwargs(args, device)
    anchor = load_base(args.anchor, args, "--anchor", device) if args.anchor else None
    augments = [load_base(name, args, "--augment", device) for name in args.augment] if args.augment else None
    return calm.CALMForCausalLM.from_pretrained(args.composition, anchor=anchor, augments=augments,
                                                tokenizer=tokenizer, augment_tokenizers=augment_tokenizers,
                                                **kwargs)


def composition_tokenizer(model: Any, args: argparse.Namespace):
    """The anchor's tokenizer for a loaded composition: the one saved with it, else `--tokenizer`, else the
    anchor's own."""
    if model.tokenizer is not None:
        return model.tokenizer
    if args.tokenizer:
        return load_tokenizer(args.tokenizer, "--tokenizer")
    anchor = model.config.anchor["name_or_path"]
    try:
        return load_tokenizer(anchor, "the anchor")
    except UserError as e:
        raise UserError(f"the composition has no tokenizer saved with it, and {e}: pass --tokenizer") from None


def load_tokenizer(name: str, flag: str):
    """A tokenizer by HF name or path (`flag`: where the name came from, for messages)."""
    from transformers import AutoTokenizer

    check_model_path(name, flag, base=False)
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise _load_error("tokenizer", name, flag, e) from e


# ----------------------------------------------------------------------------- subcommands


def cmd_info(args: argparse.Namespace) -> None:
    import platform

    import accelerate
    import safetensors
    import tokenizers
    import torch
    import transformers

    import calm

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = [("calm", calm.__version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("transformers", transformers.__version__), ("accelerate", accelerate.__version__),
            ("peft", _version_or_missing("peft")), ("safetensors", safetensors.__version__),
            ("tokenizers", tokenizers.__version__), ("device", device), ("cpu threads", str(torch.get_num_threads()))]
    for name, value in rows:
        print(f"{name:<14}{value}")


def _version_or_missing(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_compose(args: argparse.Namespace) -> None:
    model = compose_from_args(args, prepare_composition(args))
    config = model.config
    print(f"anchor   {config.anchor['name_or_path']}: {config.anchor['num_layers']} layers x {config.anchor['width']}")
    for k, (record, conns) in enumerate(zip(config.augments, config.connections)):
        print(f"augment[{k}] {record['name_or_path']}: {record['num_layers']} layers x {record['width']}")
        for a, b in conns:
            print(f"  augment block {a:>3} -> anchor block {b:>3}")
    print(f"cross-attention heads: {config.num_heads}, init: {config.init}, augment mode: {config.augment_mode}")
    model.print_trainable_parameters()
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved the (untrained) composition to {args.save}")


def target_device(args: argparse.Namespace):
    """Where `--device` puts the model, or None when `--device-map` places the bases instead."""
    if getattr(args, "device_map", None):
        if args.device != "auto":
            raise UserError(f"--device {args.device} and --device-map {args.device_map}: give one of them")
        return None
    return resolve_device(args.device)


def load_placed_composition(args: argparse.Namespace) -> tuple[Any, Any]:
    """The composition the flags name on its device (`--device` / `--device-map`), and its anchor's tokenizer."""
    device = target_device(args)
    model = load_composition(args, device)
    if device is not None:
        model.to(device)
    return model, composition_tokenizer(model, args)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`generate` arguments of the sampling flags (greedy when --temperature is 0)."""
    if args.temperature > 0:
        return {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    return {"do_sample": False}


def cmd_generate(args: argparse.Namespace) -> None:
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty: give some text to complete")
    prompts = load_prompts(args.prompts_file) if args.prompts_file is not None else None  # before any model loads
    if args.output is not None and prompts is None:
        raise UserError("--output is for --prompts-file: a single --prompt is streamed to the terminal")
    model, tokenizer = load_placed_composition(args)
    if prompts is not None:
        generate_file(model, tokenizer, prompts, args)
        return
    for prompt in [args.prompt] if args.prompt is not None else _interactive_prompts():
        stream_completion(model, tokenizer, prompt, args)


def generate_file(model: Any, tokenizer: Any, prompts: list[str], args: argparse.Namespace) -> None:
    """Complete every prompt, `--batch-size` at a time, and write one JSON line per prompt (to `--output` or
    stdout): the prompt, the generated text, and whether the model ended it (EOS) within --max-new-tokens."""
    from .eval import generate_completions

    completions = generate_completions(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                       progress=args.output is not None, augment_mode=args.augment_mode,
                                       **sampling_kwargs(args))
    lines = [json.dumps({"prompt": p, "generated": c.text, "ended": c.ended}, ensure_ascii=False) + "\n"
             for p, c in zip(prompts, completions)]
    if args.output is None:
        sys.stdout.write("".join(lines))
        return
    args.output.write_text("".join(lines), encoding="utf-8")
    print(f"calm: wrote {len(lines)} completions to {args.output}", file=sys.stderr)


def stream_completion(model: Any, tokenizer: Any, prompt: str, args: argparse.Namespace) -> None:
    """Print the completion of one prompt as it is generated."""
    import threading

    from transformers import TextIteratorStreamer

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, augment_mode=args.augment_mode,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                  else tokenizer.eos_token_id, **sampling_kwargs(args))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**kwargs)
        except BaseException as e:  # handed to the main thread, which would otherwise wait forever
            failure.append(e)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    for text in streamer:
        print(text, end="", flush=True)
    worker.join()
    print()
    if failure:
        raise failure[0]


def _interactive_prompts():
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if line.strip():
            yield line


def eval_output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where `calm eval` writes its metrics and per-example predictions: `--output-dir`, by default `eval/`
    inside the composition's directory; the files are named after the data file."""
    local = Path(args.composition).is_dir()
    if not local:
        check_model_path(args.composition, "--composition", base=False)
    directory = args.output_dir
    if directory is None:
        if not local:
            raise UserError(f"--output-dir is needed: --composition {args.composition} is not a local directory, "
                            "so there is no default place for the metrics and predictions")
        directory = Path(args.composition) / "eval"
    directory.mkdir(parents=True, exist_ok=True)  # now: an unwritable place fails before any model loads
    stem = Path(args.data).name.removesuffix(".jsonl")
    return directory / f"{stem}.metrics.json", directory / f"{stem}.predictions.jsonl"


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval import evaluate_with_predictions

    examples = load_examples(args.data)  # bad data fails here, before any model is loaded
    metrics_path, predictions_path = eval_output_paths(args)
    model, tokenizer = load_placed_composition(args)
    metrics, predictions = evaluate_with_predictions(model, tokenizer, examples, max_new_tokens=args.max_new_tokens,
                                                     batch_size=args.batch_size, augment_mode=args.augment_mode,
                                                     match=args.exact_match_mode)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    predictions_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions),
                                encoding="utf-8")
    print(json.dumps(metrics, indent=2))
    print(f"calm: wrote {metrics_path} and {predictions_path}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> TrainResult:
    """`run_train`, then a summary: where the composition is, its final metrics, and the time it took."""
    start = time.monotonic()
    result = run_train(args)
    if is_main_process():
        print(train_summary(result, time.monotonic() - start, args.eval_data))
    return result


def run_train(args: argparse.Namespace) -> TrainResult:
    """Check everything that is cheap to check first (options, the run directory, data, tokenizers, the bases'
    configs and the composition they make), then load the base models and train the composition."""
    config = train_config_from_args(args)
    run_dir = Path(config.output_dir)
    resume_from = check_run_dir(run_dir, run_dir / CHECKPOINTS_DIR, config)
    train_examples = load_examples(args.train_data)
    eval_examples: ExampleSet | None = load_examples(args.eval_data) if args.eval_data else None
    tokenizer_name = args.tokenizer or args.anchor
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer" if args.tokenizer else "--anchor")
    configs = base_configs(args)
    tokenizers = prepare_composition(args, tokenizer, configs)
    # The models' configs (no weights yet) say how long examples may be and which token ids exist.
    max_length, vocab_size = data_limits(config, configs)
    train_set = prepare_dataset(train_examples, tokenizer, config, max_length, vocab_size)
    eval_set = (prepare_dataset(eval_examples, tokenizer, config, max_length, vocab_size)
                if eval_examples is not None else None)
    if is_main_process():
        print(f"calm: training into {run_dir}" + (f", resuming {describe_checkpoint(resume_from)}"
                                                  if resume_from is not None else ""), file=sys.stderr)
    set_seed(config.seed)  # the composition's initial weights follow the seed too
    model = compose_from_args(args, tokenizers)
    run_info = {
        "model": {"anchor": args.anchor, "augments": list(args.augment), "tokenizer": tokenizer_name,
                  **({"augment_tokenizer": list(args.augment_tokenizer)} if args.augment_tokenizer else {}),
                  "dtype": args.dtype, "connections": model.config.connections,
                  **{key: getattr(model.config, key) for key in OPTIONS}},
        "data": {"train": [str(p) for p in args.train_data], "eval": [str(p) for p in args.eval_data or []]},
    }
    return train(model, tokenizer, train_set, eval_set, config, run_info=run_info)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def describe_checkpoint(checkpoint: Path) -> str:
    """'checkpoint-N (step N of M, epoch E)', from the checkpoint's trainer state."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_FILE))
    of = f" of {state.max_steps}" if state.max_steps else ""
    return f"{checkpoint} (step {state.global_step}{of}, epoch {state.epoch or 0:.2f})"


def train_summary(result: TrainResult, seconds: float, eval_data: Sequence[str] | None = None) -> str:
    """What `calm train` prints when it ends: where the composition is, its final metrics, and the time taken."""
    lines = [f"calm: trained {result.global_step} steps in {_duration(seconds)} "
             f"(training itself {_duration(result.runtime_seconds)})",
             f"  composition: {result.output_dir}",
             f"  train_loss: {result.train_loss:.4f}"]
    lines += [f"  {name}: {value:.4f}" for name, value in result.eval_metrics.items()
              if name in ("eval_loss", "eval_exact_match")]
    if result.resumed_from:
        lines.append(f"  resumed from: {result.resumed_from}")
    if result.skipped_steps:
        lines.append(f"  skipped steps (NaN/inf): {result.skipped_steps}")
    data = eval_data[0] if eval_data else "EVAL.jsonl"
    lines.append(f"  evaluate it: calm eval --composition {result.output_dir} --data {data}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def train_main(argv: Sequence[str] | None = None) -> TrainResult:
    """`python -m calm.train ...` (also under `torchrun -m calm.train ...`): the flags of `calm train`; errors
    raise (with their traceback), and the main process prints the result as one JSON line."""
    args = apply_config_file(build_parser(), ["train", *(sys.argv[1:] if argv is None else argv)])
    result = run_train(args)
    if is_main_process():
        print(json.dumps({"output_dir": str(result.output_dir), "global_step": result.global_step,
                          "train_loss": result.train_loss, **result.eval_metrics}))
    return result


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from . import serve
    except ModuleNotFoundError as e:
        raise UserError(f"calm serve needs the serve extra ({e.name} is missing): "
                        "pip install 'calm-compose[serve]'") from None
    try:
        serve.check_port(args.host, args.port)  # before the model loads, which can take minutes
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    chat_template = None
    if args.chat_template is not None:
        try:
            chat_template = Path(args.chat_template).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --chat-template {args.chat_template}: {e}") from None
    model, tokenizer = load_placed_composition(args)
    engine = serve.Engine(model, tokenizer, max_batch_size=args.max_batch_size,
                          batch_window=args.batch_window_ms / 1000, chat_template=chat_template,
                          augment_mode=args.augment_mode)
    name = args.model_name or Path(args.composition).resolve().name
    serve.run(serve.create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level,
              shutdown_timeout=args.shutdown_timeout)


TRANSLATION_ONLY = ("language", "anchor", "augment", "eval_split", "eval_size", "train_size", "steps", "trained_only",
                    "rows", "spec", "device")


def cmd_reproduce(args: argparse.Namespace) -> None:
    # A scratch directory by default, so that a run never overwrites the committed results/ by accident.
    args.output_dir = args.output_dir or Path("runs") / args.experiment.replace("-", "_")
    try:
        require("peft", "matplotlib", needed_by="calm reproduce")
    except ImportError as e:
        raise UserError(str(e)) from None
    if args.experiment == "translation":
        if args.ablations:
            raise UserError("--ablations is for kv-arithmetic: the translation reproduction always runs every row")
        args.device = str(resolve_device(args.device or "cpu"))
        from .experiments.translation import run_from_args
    else:
        from .experiments.kv_reproduce import run_from_args

        if given := [f"--{name.replace('_', '-')}" for name in TRANSLATION_ONLY if getattr(args, name)]:
            raise UserError(f"{', '.join(given)}: translation-only option(s), not for kv-arithmetic")
    run_from_args(args)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="calm", description="Compose frozen Hugging Face causal LMs (CALM).")
    parser.add_argument("--debug", action="store_true", dest="show_traceback", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable, help: str, parents: Sequence[argparse.ArgumentParser] = (),
                usage: str | None = None) -> argparse.ArgumentParser:
        # "resolve": calm's --debug (tracebacks) takes the flag from TrainingArguments.debug (a config-file key)
        sub = commands.add_parser(name, help=help, description=help, parents=list(parents), usage=usage,
                                  conflict_handler="resolve")
        sub.add_argument("--config", type=Path, default=None, help="YAML or JSON file of options (flags override "
                         "it), e.g. a run's train_config.json")
        sub.add_argument("--debug", action="store_true", dest="show_traceback", help="show tracebacks")
        sub.set_defaults(handler=handler)
        return sub

    command("info", cmd_info, "print versions and the device")

    sub = command("compose", cmd_compose, "compose models and print the connections and parameter counts")
    add_base_arguments(sub)
    add_connection_arguments(sub)
    sub.add_argument("--save", default=None, help="also save the untrained composition here")

    for name, handler, help in [("generate", cmd_generate, "generate text with a trained composition"),
                                ("eval", cmd_eval, "exact match and loss of a composition on JSONL data, and "
                                                   "its predictions")]:
        sub = command(name, handler, help)
        sub.add_argument("--composition", required=True, help="directory written by save_pretrained / calm train")
        add_base_arguments(sub, required=False)
        add_device_arguments(sub)
        sub.add_argument("--augment-mode", default=None, choices=AUGMENT_MODES)
        sub.add_argument("--max-new-tokens", type=_positive_int, default=64)
        if name == "generate":
            which = sub.add_mutually_exclusive_group()
            which.add_argument("--prompt", default=None, help="prompt text (default: read prompts interactively)")
            which.add_argument("--prompts-file", type=Path, default=None,
                               help="complete every prompt of a file, in batches: JSONL records with a 'prompt' "
                                    "(a .jsonl file), else one prompt per line")
            sub.add_argument("--batch-size", type=_positive_int, default=8, help="prompts generated together")
            sub.add_argument("--output", type=Path, default=None,
                             help="write --prompts-file's completions here, one JSON line per prompt (default: "
                                  "stdout)")
            sub.add_argument("--temperature", type=_bounded(float, 0.0), default=0.0, help="0 means greedy")
            sub.add_argument("--top-k", type=_bounded(int, 0), default=50, help="0: no top-k filtering")
            sub.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True), default=1.0)
        else:
            sub.add_argument("--data", required=True, type=Path,
                             help="JSONL of {prompt, completion}, {text} or {messages} records")
            sub.add_argument("--batch-size", type=_positive_int, default=32)
            sub.add_argument("--output-dir", type=Path, default=None,
                             help="where DATA.metrics.json and DATA.predictions.jsonl (one line per example) go "
                                  "(default: eval/ in the composition's directory)")
            sub.add_argument("--exact-match-mode", default="stripped", choices=MATCH_MODES,
                             help="what counts as exact (calm.eval.is_exact_match): stripped (the default): equal "
                                  "once whitespace at the ends is stripped; exact: the completion, character for "
                                  "character, then EOS")

    sub = command("serve", cmd_serve, "serve a composition over an OpenAI-compatible HTTP API")
    sub.add_argument("--composition", required=True, help="directory written by save_pretrained / calm train")
    add_base_arguments(sub, required=False)
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sub.add_argument("--port", type=_bounded(int, 1, 65535), default=8000)
    sub.add_argument("--model-name", default=None, help="the model id clients send (default: the directory's name)")
    add_device_arguments(sub)
    sub.add_argument("--augment-mode", default=None, choices=AUGMENT_MODES)
    sub.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    sub.add_argument("--max-batch-size", type=_positive_int, default=32, help="most sequences decoded together")
    sub.add_argument("--batch-window-ms", type=_bounded(float, 0.0), default=10.0,
                     help="a new batch keeps taking requests while each arrives within this many ms of the one "
                          "before (for at most 5 such windows)")
    sub.add_argument("--shutdown-timeout", type=_bounded(float, 0.0), default=5.0,
                     help="seconds in-flight requests get to finish after Ctrl-C / SIGTERM")
    sub.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    sub = command("train", cmd_train, "train a composition on JSONL data", parents=[TrainConfig.parser()],
                  usage="%(prog)s --anchor MODEL --augment MODEL --train-data FILE [FILE ...] --output-dir DIR "
                        "[option ...]\n(options: calm's, and every transformers.TrainingArguments field as a flag)")
    add_train_arguments(sub)

    sub = command("reproduce", cmd_reproduce, "reproduce a result of the paper")
    sub.add_argument("experiment", choices=["kv-arithmetic", "translation"],
                     help="which result: kv-arithmetic (the paper's Table 1, models built here) or translation "
                          "(its Tables 2 and 5 shape, on real pretrained models; needs the `real` extra)")
    sub.add_argument("--quick", action="store_true", help="tiny sizes: the whole pipeline in a few minutes")
    sub.add_argument("--ablations", action="store_true",
                     help="also train CALM on the issue's D_C (with KV-Substitution), from scratch and from the "
                          "trained CALM, and the vanilla/random m_A and prompt-mode rows")
    sub.add_argument("--seed", type=int, default=0, help="random seed of the whole run")
    sub.add_argument("--threads", type=_bounded(int, 0), default=0,
                     help="torch CPU threads (0: one per core; 1 lets two seeds run side by side)")
    sub.add_argument("--summarize", nargs="+", type=Path, metavar="RUN_DIR", default=None,
                     help="train nothing: combine finished runs (e.g. one per seed) into mean ± std in --output-dir")
    sub.add_argument("--output-dir", type=Path, default=None,
                     help="where results.md, results.json and the plots go (default: the scratch directory "
                          "runs/<experiment>, e.g. runs/kv_arithmetic; give results/<experiment> to update the "
                          "committed results)")
    group = sub.add_argument_group("translation only (defaults: calm.experiments.translation.TranslationSpec)")
    group.add_argument("--language", default=None, choices=["uk", "ja"], help="source language (default uk)")
    group.add_argument("--anchor", default=None, help="m_B: a packaged name, .gguf file, Hub name or local path")
    group.add_argument("--augment", default=None, help="m_A, as --anchor")
    group.add_argument("--eval-split", default=None, choices=["validation", "test"],
                       help="validation while choosing a recipe, test (the default) to report")
    group.add_argument("--eval-size", type=_positive_int, default=None, help="verses evaluated")
    group.add_argument("--train-size", type=_positive_int, default=None, help="D_C verses")
    group.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps of every trained row")
    group.add_argument("--trained-only", action="store_true",
                       help="skip the untrained rows (greedy decoding makes them the same for every seed)")
    group.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                       help='run only these rows, by name (e.g. "CALM" "m_A, few-shot")')
    group.add_argument("--spec", nargs="+", default=None, metavar="FIELD=JSON",
                       help="change any TranslationSpec field, e.g. lr=0.003 'connections=[[3,22],[15,29]]'")
    group.add_argument("--device", default=None,
                       help="where the models run: cpu (the default), cuda, cuda:1, ... (training stays float32)")
    return parser


def _bounded(kind: type, low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a `kind` number in [low, high] ((low, high] with `low_open`)."""
    allowed = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} in {allowed}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} in {allowed}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv; a subcommand's `--config FILE` supplies defaults (even for required flags) that flags override,
    and a `--preset` (a flag or a config-file key) defaults under those (`calm.config.PRESETS`)."""
    path = _config_path(argv)
    command = next((a for a in argv if a in _subparsers(parser).choices), None)
    values: dict[str, Any] = {}
    if path is not None and command is not None:
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"cannot read --config {path}: {e}") from e
        if not isinstance(values, dict):
            raise UserError(f"--config {path} must hold a mapping of option: value")
        if command == "train" and isinstance(values.get("train"), dict):
            values = _from_run_record(values, path)
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        if command == "train":
            values = renamed(values)  # calm's earlier option names (num_epochs, batch_size, ...)
        subparser = _subparsers(parser).choices[command]
        actions = {action.dest: action for action in subparser._actions}
        unknown = sorted(k for k in values if k not in actions or k in ("config", "help"))
        if unknown:
            raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        for name, value in values.items():
            values[name] = _config_value(path, actions[name], value)
            actions[name].required = False
        subparser.set_defaults(**values)
    args = parser.parse_args(argv)
    if getattr(args, "preset", None) is not None:  # parse again with the preset's values as defaults
        subparser = _subparsers(parser).choices[args.command]
        subparser.set_defaults(**PRESETS[args.preset])
        subparser.set_defaults(**values)  # the config file's values win over the preset
        args = parser.parse_args(argv)
    return args


def _from_run_record(record: dict, path: str) -> dict:
    """The options of a run's own `train_config.json` (TrainConfig values under `train`, the models under
    `model`, the data files under `data`) as flat `calm train` options. A recorded composition is upgraded to
    the current format version first (`calm.formats`)."""
    version = read_version(record.get("format"), RUN_RECORD, f"--config {path}")
    values = dict(record["train"])
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    if "connections" in model:
        model = upgrade_options(model, version)
    for key in ("anchor", "augments", "tokenizer", "augment_tokenizer", "dtype", "connections", *OPTIONS):
        if key in model:
            values.setdefault("augment" if key == "augments" else key, model[key])
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    for key, flag in (("train", "train_data"), ("eval", "eval_data")):
        if data.get(key):
            values.setdefault(flag, data[key])
    return values


def _config_value(path: str, action: argparse.Action, value: Any) -> Any:
    """A config-file value checked as its flag would be (argparse converts only string defaults, and never
    checks defaults against `choices`): scalars go through the flag's type, then its choices."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if value is None:
        return value
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        return list(value) if isinstance(value, (list, tuple)) else [value]  # `augment: path` means [path]
    if action.type is not None and not isinstance(value, (str, list, dict, bool)):
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UserError(f"--config {path}: {flag}={value!r} is invalid: {e}") from None
    if action.choices is not None and not isinstance(value, (list, dict)) and value not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        raise UserError(f"--config {path}: {flag}={value!r} is invalid: expected one of {allowed}")
    return value


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = apply_config_file(parser, argv)
        args.handler(args)
    except KeyboardInterrupt:
        print("calm: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, NotImplementedError, OSError,
            FloatingPointError) as e:
        if debug:
            raise
        print(f"calm: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug or an unexpected failure: still one line, the traceback is one flag away
        if debug:
            raise
        print(f"calm: error: {type(e).__name__}: {_first_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
