"""Where a composition and its base models live: local directories and the Hugging Face Hub.

A saved composition records, for each base model, the absolute path of the local directory it was loaded from,
or its Hub id and the commit it was at; loading tries those places in turn and says which base could not be
found and everywhere it looked. A composition itself can be loaded from a Hub repo and pushed to one.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, PreTrainedModel

_COMMIT = re.compile(r"[0-9a-f]{40}")
# The keyword arguments of `from_pretrained` that say where and how to fetch files: they apply to the
# composition's own repo and to the base models' alike (`revision` and `subfolder` only to the composition's).
DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "proxies")


def is_hub_id(name: str) -> bool:
    """Whether `name` could be a Hub repo id ("user/repo" or "repo"); "./x", "/x", "~/x" and "a/b/c" cannot."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith(("~", "."))


def cached_commit(repo_id: str, model: PreTrainedModel | None = None) -> str | None:
    """The commit of `repo_id` in the local Hub cache that `model`'s weights were loaded from (transformers does
    not record the revision it loaded). With one snapshot cached, that one; with several, the one whose smallest
    tensors equal the model's; None when no snapshot or more than one matches."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir() if _COMMIT.fullmatch(p.name)) if snapshots.is_dir() else []
    if len(commits) > 1 and model is not None:
        commits = [c for c in commits if _same_weights(snapshots / c, model)]
    return commits[0] if len(commits) == 1 else None


def _same_weights(snapshot: Path, model: PreTrainedModel, tensors: int = 4) -> bool:
    """Whether the `tensors` smallest non-constant tensors of `snapshot`'s safetensors files equal `model`'s (cheap
    to read; a constant one, such as a fresh norm's ones, tells revisions apart less often)."""
    from safetensors import safe_open

    state = model.state_dict()
    sizes = []
    for file in sorted(snapshot.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            sizes += [(math.prod(f.get_slice(name).get_shape()), name, file) for name in names if name in state]
    compared = 0
    for _, name, file in sorted(sizes):
        mine = state[name].detach().cpu()
        if mine.numel() == 0 or bool(mine.min() == mine.max()):
            continue
        with safe_open(file, framework="pt") as f:
            if not torch.equal(f.get_tensor(name).to(mine.dtype), mine):
                return False
        compared += 1
        if compared == tensors:
            break
    return compared > 0


def locate(model: PreTrainedModel, recorded: dict[str, Any]) -> dict[str, Any]:
    """Where `model` can be found again: `local_path` (an absolute path) when it was loaded from a local
    directory, `hub_id` and `revision` (a commit, when known) when it came from the Hub. `recorded` is what the
    composition recorded before (a revision recorded for the same Hub id is kept: that is the one loaded)."""
    name = str(getattr(model, "name_or_path", "") or "")
    if not name:
        return {}
    path = Path(name).expanduser()
    if path.is_dir():
        return {"local_path": str(path.resolve())}
    if not is_hub_id(name):
        return {}
    revision = recorded.get("revision") if recorded.get("hub_id") == name else None
    revision = revision or cached_commit(name, model)
    return {"hub_id": name, **({"revision": revision} if revision else {})}


def _places(record: dict[str, Any], given: str | os.PathLike | None) -> list[tuple[str, str, str | None]]:
    """(description, name or path, revision) of each place to look for a base model, in order."""
    if given is not None:
        return [(_kind(str(given)), str(given), None)]
    places = []
    if record.get("local_path"):
        places.append(("local directory", record["local_path"], None))
    if record.get("hub_id"):
        places.append(("Hub repo", record["hub_id"], record.get("revision")))
    if not places and record.get("name_or_path"):  # recorded by a calm that kept only the name as typed
        places.append((_kind(record["name_or_path"]), record["name_or_path"], None))
    return places


def _kind(name: str) -> str:
    return "local directory" if Path(name).expanduser().is_dir() or not is_hub_id(name) else "Hub repo"


def load_base(record: dict[str, Any], who: str, given: str | os.PathLike | None,
              base_kwargs: dict[str, Any]) -> PreTrainedModel:
    """Load base model `who` ("anchor", "augments[0]") from the places `record` names (or from `given`, a name
    or path that overrides them) with `AutoModelForCausalLM.from_pretrained(..., **base_kwargs)`. A local
    directory that does not exist is never looked for on the Hub. Raise `FileNotFoundError` naming the base,
    what was recorded and every place tried, with why each failed."""
    places = _places(record, given)
    tried = []
    for kind, name, revision in places:
        if kind == "local directory" and not Path(name).expanduser().is_dir():
            tried.append(f"{kind} {name}: does not exist")
            continue
        kwargs = base_kwargs | ({"revision": revision} if revision else {})
        try:
            return AutoModelForCausalLM.from_pretrained(str(Path(name).expanduser()) if kind == "local directory"
                                                        else name, **kwargs)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            at = f" at revision {revision}" if revision else ""
            tried.append(f"{kind} {name}{at}: {reason}")
    recorded = f"recorded as {record['name_or_path']!r}" if record.get("name_or_path") else "no name recorded"
    source = "the given name" if given is not None else f"the saved composition ({recorded})"
    looked = "; ".join(tried) if tried else "the composition records no place to look"
    override = "anchor=" if who == "anchor" else "augments=[...]"
    raise FileNotFoundError(f"{who} not found from {source}: {looked}. Pass it as {override} (a model, a local "
                            "directory or a Hub id)")


def composition_directory(path: str | os.PathLike, revision: str | None, subfolder: str,
                          download_kwargs: dict[str, Any]) -> Path:
    """The local directory holding a saved composition: `path` itself (when it exists, or cannot be a Hub id),
    or the snapshot of Hub repo `path` at `revision` (fetched with `huggingface_hub.snapshot_download`, or taken
    from its cache)."""
    local = Path(path).expanduser()
    name = str(path)
    if local.is_dir() or not is_hub_id(name):  # a missing local directory is never looked for on the Hub
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for a Hub repo, but {path} is a local path")
        return local / subfolder
    if download_kwargs.get("proxies") is not None:  # huggingface_hub >= 1 takes proxies from the environment only
        raise ValueError("proxies= cannot be used to fetch a composition from the Hub: set HTTPS_PROXY instead")
    fetch = {k: v for k, v in download_kwargs.items() if k != "proxies" and v is not None}
    try:
        snapshot = snapshot_download(name, revision=revision, **fetch)
    except OSError as e:
        at = f" at revision {revision}" if revision else ""
        raise FileNotFoundError(f"{name} is not a local directory, and Hub repo {name}{at} could not be fetched: "
                                f"{e}") from e
    return Path(snapshot) / subfolder


def push_directory(directory: Path, files: Iterable[str], repo_id: str, *, private: bool | None,
                   token: str | bool | None, commit_message: str | None, commit_description: str | None,
                   create_pr: bool, revision: str | None) -> Any:
    """Upload `files` (names or folders in `directory`) to Hub repo `repo_id`, creating the repo (and the branch
    `revision`) when missing. Returns the commit info; a pull request with `create_pr`."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    patterns = [p for name in files for p in ((f"{name}/*",) if (directory / name).is_dir() else (name,))]
    return api.upload_folder(repo_id=repo_id, folder_path=directory, allow_patterns=patterns,
                             commit_message=commit_message or "Upload CALM composition",
                             commit_description=commit_description, create_pr=create_pr, revision=revision)
