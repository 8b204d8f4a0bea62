"""What `tandem --help` says of each flag (its default and TANDEM_* variable), and a bad value in
one of those variables as an argparse error that names it."""

from __future__ import annotations

import argparse


ENV_COMMANDS = ("coordinator", "prefill", "decode", "profile")  # their flags read TANDEM_* (but NO_ENV's)
NO_ENV = "tandem_no_env"  # an action with this attribute set reads no environment variable


def env_name(option: str) -> str:
    return "TANDEM_" + option.removeprefix("--").upper().replace("-", "_")


def _checked(kind: type, env: str) -> object:
    """``kind`` as an argparse type whose error names the variable a bad default came from."""
    def convert(raw: str) -> object:
        try:
            return kind(raw)
        except (TypeError, ValueError):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{raw!r} is not {what} (from the flag, or {env} in the "
                                             "environment)") from None

    convert.__name__ = kind.__name__
    return convert


def _one_of(choices: list[str], env: str) -> object:
    def convert(raw: str) -> str:
        if raw not in choices:
            raise argparse.ArgumentTypeError(f"{raw!r} is not one of {', '.join(choices)} (from the flag, or {env} "
                                             "in the environment)")
        return raw

    convert.__name__ = "choice"
    return convert


def annotate_help(parser: argparse.ArgumentParser, env_all: bool = False) -> None:
    """Every flag's help says its default and, where one is read, its environment variable; a
    number read from the environment that is not one is an argparse error naming the variable."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                annotate_help(sub, env_all=name in ENV_COMMANDS)
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.help == argparse.SUPPRESS or longs[0] in ("--help", "--version"):
            continue
        env = env_name(longs[0]) if (env_all and not getattr(action, NO_ENV, False)) or longs[0].startswith("--tls-") \
            else ""
        if env and action.type in (int, float):
            action.type = _checked(action.type, env)
        elif env and action.choices and action.type is None:  # argparse never checks a default's choice
            action.type = _one_of([str(c) for c in action.choices], env)
        help_text = action.help or ""
        notes = []
        if action.default not in (None, False, "", argparse.SUPPRESS) and "default" not in help_text.lower():
            notes.append("default: %(default)s")
        if env and env not in help_text:
            notes.append(env)
        if notes:
            action.help = f"{help_text} ({'; '.join(notes)})".strip()
