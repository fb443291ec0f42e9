"""Mistakes a user can fix, and how the entry points report them: one message, exit status 2.

A bad row, setting, path or model name is not a bug in hwr, so it gets no traceback
(`HYDRA_FULL_ERROR=1` still shows one). Inside a multirun the error is raised as usual,
so Hydra records the failed job and the sweep goes on.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


class UserError(ValueError):
    """Something the user can fix; the message names what and how."""


def require_count(setting: str, value: object, least: int) -> None:
    """A count setting (batch size, beams, tokens, ...) must be a whole number >= least."""
    if not isinstance(value, int) or value < least:
        raise UserError(f"{setting}={value}: must be a whole number >= {least}")


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`: Hydra's instantiate wraps errors raised in constructors."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def hydra_task(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Wrap a Hydra task function: Lightning's own log handler off, user errors in one line."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> T:
        # Lightning prints through a handler of its own; Hydra's root handlers already do.
        logging.getLogger("lightning").handlers.clear()
        try:
            return task(cfg)
        except Exception as e:
            error = find_user_error(e)
            multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            if error is None or multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s", error)
            sys.exit(2)

    return run
