"""The scripts' command line: each setting checked against the real configs before anything
loads, and the task imported only once Hydra has composed its config.

Hydra stops at the first unknown setting with its own wording (exit 1) and advises adding
`+`, which only moves the error into the constructor; a user is better served by every bad
setting of the command at once, each with the nearest valid names.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from hwr.machine import share_cores

CONF = Path(__file__).resolve().parents[1] / "conf"


def _groups(loader, parent: str = "") -> Iterator[str]:
    """Every config group under `parent`, nested ones too (data/augment, hydra/launcher)."""
    for name in loader.list_groups(parent):
        group = f"{parent}/{name}" if parent else name
        yield group
        yield from _groups(loader, group)


def _keys(node: object, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config, nodes and leaves."""
    if isinstance(node, DictConfig):
        for key in node:
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _keys(node._get_node(key), path)


def _nearest(word: str, choices: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=2, cutoff=0.75)
    return f" Did you mean {' or '.join(near)}?" if near else ""


def bad_settings(config_name: str, overrides: Sequence[str], conf: Path = CONF) -> list[str]:
    """What is wrong with `overrides` (key=value, group=option): each unknown key or group
    option, with the nearest valid names."""
    try:
        parsed: list[Override] = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        return [str(e).strip().splitlines()[0]]
    problems, choices = [], {}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = set(_groups(loader))
        values = []
        for o in parsed:
            if o.key_or_group not in groups:
                values.append(o)
                continue
            offered = loader.get_group_options(o.key_or_group)
            options = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            # A list selects several options of the group at once (corpus@data.corpora=[a,b]).
            options = [x for v in options for x in (v if isinstance(v, list) else [v])]
            unknown = [
                str(x) for x in options if str(x) not in offered and o.type != OverrideType.DEL
            ]
            for option in unknown:
                problems.append(
                    f"{o.key_or_group}={option}: no such option.{_nearest(option, offered)} "
                    f"{o.key_or_group} is one of: {', '.join(offered)}"
                )
            if not unknown:  # a bad one is left at its default to check the other settings
                choices[o.input_line] = (
                    [f"{o.get_key_element()}={x}" for x in options]
                    if o.is_sweep_override()
                    else [o.input_line]
                )
        # Every option of a swept group once (the others at their first), so a key that
        # only one of them has is known.
        firsts = [opts[0] for opts in choices.values()]
        tries = [firsts] + [
            [*firsts[:i], x, *firsts[i + 1 :]]
            for i, opts in enumerate(choices.values())
            for x in opts[1:]
        ]
        known: set[str] = set()
        for picked in tries:
            try:
                cfg = compose(config_name, overrides=picked, return_hydra_config=True)
            except (HydraException, ValueError) as e:
                return [*problems, str(e).strip().splitlines()[0]]
            known.update(_keys(cfg))
    for o in values:
        if o.type in (OverrideType.ADD, OverrideType.FORCE_ADD) or o.key_or_group in known:
            continue
        problems.append(f"{o.key_or_group}: no such setting.{_nearest(o.key_or_group, known)}")
    return problems


def check_settings(config_name: str, overrides: Sequence[str], conf: Path = CONF) -> None:
    """Stop with one message naming every bad setting, exit status 2 (as every UserError)."""
    problems = bad_settings(config_name, overrides, conf)
    if problems:
        script = Path(sys.argv[0]).name  # train.py, ..., or "hwr predict"
        command = f"python {script}" if script.endswith(".py") else script
        print(
            f"{script}: {len(problems)} bad setting{'s' if len(problems) > 1 else ''}:\n  "
            + "\n  ".join(problems)
            + f"\nEvery setting: {command} --cfg job (--help for the common ones).",
            file=sys.stderr,
        )
        sys.exit(2)


def hydra_entry(config_name: str, task: str) -> Callable[[], object]:
    """The entry point of a script: settings checked, then Hydra runs `task`
    ("module:function"), imported only then, so that --help and mistakes come fast."""

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)
    def run(cfg: DictConfig) -> object:
        from hwr.errors import hydra_task

        module, function = task.split(":")
        return hydra_task(getattr(importlib.import_module(module), function))(cfg)

    def main() -> object:
        args = get_args_parser().parse_args(sys.argv[1:])
        if args.help:  # Hydra's own --help lists every config group first: a second or two
            print(OmegaConf.load(CONF / f"{config_name}.yaml").hydra.help.template, end="")
            return None
        if not (args.hydra_help or args.shell_completion):
            check_settings(args.config_name or config_name, args.overrides)
            share_cores()  # before torch loads (Hydra's callbacks may load it)
        return run()

    return main
