"""Versions of the files that record a composition's options: a saved composition's `calm_config.json` (format
"calm/N") and a training run's `train_config.json` (format "calm-run/N").

A file written without a version is version 1. A reader first upgrades what a file records to the current
version, then checks it as if it had been written today. A newer version than this calm knows is refused,
because its fields may mean something that this calm would get wrong.

A new composition option (`calm.config.OPTIONS`), or a new meaning of one, needs a new version. Files of the
version before it lack the option, so the upgrade step to the new version fills in the value that those files
were made with.

The versions: 1 had no format field. 2 added rope_theta, augment_dropout and augment_norm. 3 split qk_norm, which
in versions 1-2 also normalised what the values read, into qk_norm (queries and keys) and value_norm (values), and
renamed init "paper" to "random"; the norm that keys and values read is `proj_norm` in the weights (`key_norm`
before). 4 added composition_dtype: the composition layers were float32 before. 5 moved the weights from
`calm.safetensors` (names relative to the composition) to `model.safetensors` under the model's own parameter
names (`composition.…`), the file the Trainer and the Hub look for, and added `config.json` (what `AutoConfig`
reads); the options are unchanged.
"""

from __future__ import annotations

from typing import Any

VERSION = 5
COMPOSITION = "calm"  # calm_config.json
RUN_RECORD = "calm-run"  # train_config.json

# Version 1 predates these options. When a version 1 file lacks one, it was made before the option existed, with
# this value, and must be rebuilt with it: today's default would build a different composition.
VERSION_1_OPTIONS = {"rope_theta": None, "augment_dropout": 0.0, "augment_norm": False}


# Version 2 -> 3: what version 1-2 files call an init, by its current name.
VERSION_2_INITS = {"paper": "random"}
# Version 2 -> 3: weight names (as suffixes of a composition's state-dict keys) renamed in version 3.
VERSION_2_WEIGHTS = {".key_norm.weight": ".proj_norm.weight"}
# Version 3 -> 4: the dtype of the composition layers, which files of versions 1-3 predate.
VERSION_3_OPTIONS = {"composition_dtype": "float32"}


def format_tag(kind: str) -> str:
    """The format a new file of `kind` records, e.g. "calm/4"."""
    return f"{kind}/{VERSION}"


def read_version(tag: Any, kind: str, source: str) -> int:
    """The version of a file of `kind` whose format field holds `tag` (None when there is no such field: version
    1). Raise `ValueError`, naming `source`, for a tag of another kind of file or a version this calm cannot read."""
    if tag is None:
        return 1
    name, _, number = tag.partition("/") if isinstance(tag, str) else ("", "", "")
    if name != kind or not number.isdigit() or int(number) < 1:
        raise ValueError(f"{source}: format {tag!r} is not supported: expected {format_tag(kind)!r} (or an older "
                         "version)")
    if int(number) > VERSION:
        raise ValueError(f"{source}: format {tag!r} was written by a newer version of calm, which this one cannot "
                         f"read (it reads up to {format_tag(kind)!r}): upgrade calm-compose")
    return int(number)


def upgrade_options(options: dict[str, Any], version: int) -> dict[str, Any]:
    """A composition's options as a file of format `version` records them, upgraded to the current version."""
    if version < 2:  # 1 -> 2: fill in what version 1 files predate
        options = VERSION_1_OPTIONS | options
    if version < 3:  # 2 -> 3: qk_norm=True also normalised what the values read; "paper" is now "random"
        options = dict(options)
        if "qk_norm" in options:
            options["value_norm"] = options["qk_norm"]
        if isinstance(options.get("init"), str):
            options["init"] = VERSION_2_INITS.get(options["init"], options["init"])
    if version < 4:  # 3 -> 4: the composition layers were always float32
        options = VERSION_3_OPTIONS | options
    return options


def upgrade_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """A composition's weights under their current names. A file of version 1-2 names the norm that keys and
    values read `key_norm`; no file of version 3 has a name that this renames."""
    renamed = {}
    for name, tensor in weights.items():
        for old, new in VERSION_2_WEIGHTS.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        renamed[name] = tensor
    return renamed
