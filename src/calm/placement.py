"""Where each composition layer lives: on the device that its anchor block computes on, however the base models are
placed (one device, several by `device_map`, or accelerate's CPU and disk offload)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
from torch import nn

Device = torch.device | str | int


def execution_device(module: nn.Module) -> torch.device | set[torch.device]:
    """The device `module` computes on. An accelerate hook (`device_map=...`, `dispatch_model`) names it: an
    offloaded module's weights sit on "meta" and are brought to that device for each call. Without one, the device
    of its parameters and buffers; the set of them when they are on several."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)
    devices = {t.device for t in itertools.chain(module.parameters(), module.buffers())}
    return devices.pop() if len(devices) == 1 else devices


def _one_device(value: Device | Iterable[Device], who: str) -> torch.device:
    """`value` as the one device that `who` computes on; raise `ValueError` for a placement that cannot work."""
    values = [value] if isinstance(value, (torch.device, str, int)) else list(value)
    if len(values) != 1:
        raise ValueError(f"{who} has its weights on {len(values)} devices ({', '.join(sorted(map(str, values)))}) and "
                         "no accelerate hook to name the one it computes on: keep each decoder block on one device "
                         "(transformers' device_map does), or dispatch the model with accelerate")
    if values[0] == "disk":
        raise ValueError(f"{who} has execution device 'disk': disk is where accelerate keeps offloaded weights, not "
                         "a device that computes; its hook's execution_device must be the CPU or an accelerator")
    device = torch.device(values[0])
    if device.type == "meta":
        raise ValueError(f"{who} is on the meta device without an accelerate offload hook: its weights were never "
                         "loaded (a model made under init_empty_weights?); load them, or dispatch the model with "
                         "accelerate (device_map=..., offloading to 'cpu' or 'disk' as needed)")
    return device


def _is_meta(device: Device | Iterable[Device]) -> bool:
    return device == "meta" or isinstance(device, torch.device) and device.type == "meta"


def connection_devices(connections: Sequence[Sequence[Sequence[int]]],
                       anchor_blocks: Sequence[Device | Iterable[Device]],
                       augment_blocks: Sequence[Sequence[Device | Iterable[Device]]]) -> list[list[torch.device]]:
    """The device of each connection: that of the anchor block it feeds (block 0 for anchor block -1, whose input
    it adds to), given the execution device(s) of every anchor block and of every augment's blocks. Raise
    `ValueError` for a placement that cannot work: an anchor block, or an augment block up to its deepest tap (the
    later ones never run), on "meta" (never loaded, no offload hook) while others are loaded, on "disk", or on
    several devices with nothing to say which one computes. When every block is on "meta" (skeletons, as the CLI
    composes to check arguments before loading weights), so is every connection."""
    tapped = [blocks[:max(max(a, 0) for a, _ in conns) + 1] for blocks, conns in zip(augment_blocks, connections)]
    if all(_is_meta(device) for device in itertools.chain(anchor_blocks, *tapped)):
        # A skeleton (every base made under init_empty_weights): composing it runs every check and loads nothing.
        return [[torch.device("meta")] * len(conns) for conns in connections]
    anchor = [_one_device(device, f"anchor block {i}") for i, device in enumerate(anchor_blocks)]
    for k, blocks in enumerate(tapped):
        for i, device in enumerate(blocks):
            _one_device(device, f"augment {k}'s block {i}")
    return [[anchor[max(b, 0)] for _, b in conns] for conns in connections]
