"""The ``--model_args`` of the ``vtc`` lmms-eval model, read into :class:`ModelArgs` with clear errors.

lmms-eval splits ``--model_args`` at top-level commas into ``key=value`` pairs and reads each value
as a bool (``true``/``false``), an int, a float or else a string; what arrives here is that dict
(plus the ``batch_size``, ``device`` and ``max_batch_size`` its command line passes). Reducers are
separated by ``|``: ``reducers=dymu:preset=low|holov:k=16``. A reducer spec with several options
holds commas, which lmms-eval would split: quote the value,
``--model_args "pretrained=shapes-llava,reducers='tome:r=8,prop_attn=false|pool:tokens=64'"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from vtc.spec import parse_reducer

DTYPES = ("float32", "bfloat16", "float16")
SEPARATOR = "|"
EXAMPLE = "pretrained=shapes-llava,reducers=dymu:preset=low|holov:k=16"
COMMA_HINT = ("a reducer option after a comma is read by lmms-eval as a model_arg of its own: quote the "
              "reducers value, e.g. reducers='tome:r=8,prop_attn=false|pool:tokens=64'")
IGNORED = ("max_batch_size",)  # lmms-eval's, for batch_size=auto only, which the vtc model refuses


class ModelArgsError(ValueError):
    """``--model_args`` the vtc model cannot use as given."""


@dataclass(frozen=True)
class ModelArgs:
    """What the vtc model runs: which LLaVA, which reducers, how it batches and where."""

    pretrained: str  # a vtc zoo name (shapes-llava), or an HF LLaVA / LLaVA-NeXT id or folder
    reducers: tuple[str, ...] = ()  # reducer spec strings, applied together with vtc.apply; none: the unreduced model
    batch_size: int = 1  # prompts per generate call
    device: str | None = None  # cpu, cuda or cuda:N; None: this process's accelerate device
    dtype: str = "float32"  # weights' dtype, one of DTYPES
    flops: bool = True  # count vision and prefill FLOPs of every batch (torch's flop counter: one more forward)


def _options() -> str:
    return ", ".join(f.name for f in fields(ModelArgs))


def _unquoted(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_reducers(value: object) -> tuple[str, ...]:
    """The reducer specs of ``reducers=``: ``|``-separated spec strings, each checked by
    :func:`vtc.spec.parse_reducer` (an empty value: no reducer)."""
    if not isinstance(value, str):
        raise ModelArgsError(f"reducers={value!r}: give reducer spec strings separated by '{SEPARATOR}', "
                             f"e.g. reducers=dymu:preset=low|holov:k=16")
    text = _unquoted(value)
    if not text:
        return ()
    specs = tuple(part.strip() for part in text.split(SEPARATOR))
    if not all(specs):
        raise ModelArgsError(f"reducers={value!r} has an empty reducer spec: separate specs by a single '{SEPARATOR}', "
                             f"e.g. reducers=dymu:preset=low|holov:k=16")
    for spec in specs:
        try:
            parse_reducer(spec)
        except (TypeError, ValueError) as error:
            raise ModelArgsError(f"bad reducer spec {spec!r} in reducers={value!r}: {error}") from None
    return specs


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() or int(value) < 1:
        raise ModelArgsError(f"{name}={value!r}: give a positive integer, e.g. {name}=4")
    return int(value)


def _device(value: object) -> str | None:
    if value is None:
        return None
    name = str(value).strip().lower()
    if name == "cpu" or name == "cuda" or name.startswith("cuda:") and name[5:].isdigit():
        return name
    raise ModelArgsError(f"device={value!r}: choose cpu, cuda or cuda:N (or leave it out: this process's accelerate device)")


def parse_model_args(given: Mapping[str, object]) -> ModelArgs:
    """:class:`ModelArgs` from the keyword arguments lmms-eval passes the model (``given``)."""
    unknown = sorted(set(given) - {f.name for f in fields(ModelArgs)} - set(IGNORED))
    if unknown:
        hint = f"; {COMMA_HINT}" if "reducers" in given else ""
        raise ModelArgsError(f"unknown model_args {', '.join(unknown)}: the vtc model takes {_options()}{hint}")
    pretrained = given.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise ModelArgsError(f"model_args need pretrained=NAME: a vtc zoo name (shapes-llava) or an HF LLaVA / "
                             f"LLaVA-NeXT id or folder, e.g. --model_args {EXAMPLE}")
    batch_size = given.get("batch_size", 1)
    if isinstance(batch_size, str) and batch_size.strip().startswith("auto"):
        raise ModelArgsError(f"batch_size={batch_size!r}: the vtc model takes a fixed batch size, e.g. --batch_size 4")
    dtype = given.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ModelArgsError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    flops = given.get("flops", True)
    if not isinstance(flops, bool):
        raise ModelArgsError(f"flops={flops!r}: give true or false")
    return ModelArgs(pretrained=_unquoted(pretrained), reducers=parse_reducers(given.get("reducers", "")),
                     batch_size=_positive_int("batch_size", batch_size), device=_device(given.get("device")),
                     dtype=str(dtype), flops=flops)
