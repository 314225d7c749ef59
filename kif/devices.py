"""Precision and device names as the command line gives them, checked before anything loads.

`--dtype` takes `DTYPES`' names; `--device` a torch device string (`cpu`, `cuda`, `cuda:N`,
`mps`) that must exist on this machine: `check_device` refuses an absent one in one line, so a
command fails before it loads a model or writes a file, not halfway through.
"""

from typing import Any

from kif.errors import KifError

DTYPES = ("fp32", "bf16", "fp16")
"""CLI names of the precisions a model can be loaded in (`torch_dtype`)."""


def torch_dtype(name: str | None) -> Any:
    """The torch dtype of a `DTYPES` name (None: float32, `kif.models.load`'s default)."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name is None:
        return torch.float32
    if name not in table:
        raise KifError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return table[name]


def dtype_name(dtype: Any) -> str:
    """The `DTYPES` name of a torch dtype (the manifest records it); its torch name otherwise."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def check_device(spec: str) -> str:
    """`spec` if it names a device this machine has, else a one-line `KifError`."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise KifError(f"unknown device {spec!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return spec
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise KifError(f"device {spec!r}: this machine has no CUDA device")
        if dev.index is not None and dev.index >= n:
            raise KifError(f"device {spec!r}: this machine has {n} CUDA "
                           f"device{'s' if n > 1 else ''} (cuda:0..cuda:{n - 1})")
        return spec
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise KifError(f"device {spec!r}: MPS is not available on this machine")
        return spec
    raise KifError(f"device {spec!r}: kif runs on cpu, cuda or mps")


__all__ = ["DTYPES", "check_device", "dtype_name", "torch_dtype"]
