"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

A training worker's batches (row groups read from the shards, the shuffle
buffer, cropping, SpecAugment, stacking) are built by one thread while the
training thread steps: ``prefetched(batches, depth)`` yields exactly the items
of ``batches``, in order (the same batches for a seed as the synchronous path:
only one thread ever advances the source), at most ``depth`` of them waiting.

- With ``pin_device`` a CUDA device, every tensor of an item is copied into
  page-locked host memory in the background thread (``CropBatch`` fields), so
  the training step's ``.to(device, non_blocking=True)`` is really asynchronous.
- An exception raised by the source goes to the consumer, the same object with
  its original type and message, at the position where it was raised.
- When the consumer stops early (it breaks out, raises, or drops the iterator)
  the thread is told to stop, the source is closed in it, and it is joined:
  no thread is left behind.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_END = object()
_POLL_S = 0.05
THREAD_NAME = "mfcon-prefetch"


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def pin(item: Any, device: torch.device | None) -> Any:
    """``item`` with its tensors in pinned host memory (a dataclass's tensor fields, or a tensor itself)."""
    if device is None or device.type != "cuda":
        return item
    if isinstance(item, torch.Tensor):
        return item.pin_memory()
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        changes = {f.name: getattr(item, f.name).pin_memory() for f in dataclasses.fields(item)
                   if isinstance(getattr(item, f.name), torch.Tensor)}
        return dataclasses.replace(item, **changes)
    return item


def _produce(source: Iterator[Any], out: queue.Queue, stop: threading.Event, device: torch.device | None) -> None:
    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # pin on the worker's device's context
    try:
        for item in source:
            if not put(pin(item, device)):
                return
        put(_END)
    except BaseException as error:  # noqa: BLE001  the consumer re-raises it
        put(_Raised(error))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()  # a generator's finally blocks run here, in the thread that ran it


def prefetched(items: Iterable[T], depth: int = 2, pin_device: torch.device | None = None) -> Iterator[T]:
    """The items of ``items``, produced by a background thread at most ``depth`` items ahead.

    ``depth <= 0`` returns ``iter(items)`` itself (synchronous, nothing pinned)."""
    if depth <= 0:
        return iter(items)
    return _consume(iter(items), depth, pin_device)


def _consume(source: Iterator[T], depth: int, device: torch.device | None) -> Iterator[T]:
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(source, out, stop, device), name=THREAD_NAME, daemon=True)
    del source  # the thread owns it: only it advances and closes it
    thread.start()
    try:
        while True:
            try:
                value = out.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and out.empty():
                    raise RuntimeError("the prefetch thread ended without a result") from None
                continue
            if value is _END:
                return
            if isinstance(value, _Raised):
                raise value.error
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:  # drain, so a put that is waiting returns and the thread sees ``stop``
                while True:
                    out.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=_POLL_S)
