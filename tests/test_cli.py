"""The CLI's conventions: --version, every daemon flag read from its TANDEM_* variable and saying
so in --help with its default, and a bad value in the environment a clear error."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tandem import __version__
from tandem.cli import build_parser
from tandem.cli_help import ENV_COMMANDS, NO_ENV, env_name


def _sub(ap: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _flags(cmd: str) -> list[argparse.Action]:
    return [a for a in _sub(build_parser(), cmd)._actions
            if a.option_strings and a.option_strings[-1].startswith("--") and a.dest != "help"]


@pytest.mark.parametrize("cmd", ENV_COMMANDS)
def test_every_daemon_flag_reads_its_variable_and_its_help_says_so(cmd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    actions = [a for a in _flags(cmd) if not getattr(a, NO_ENV, False)]
    assert len(actions) > 15
    for a in _flags(cmd):  # a flag that reads none never claims one
        if getattr(a, NO_ENV, False):
            assert "TANDEM_" not in (a.help or ""), a.option_strings
    wanted = {}
    for a in actions:
        opt = next(o for o in a.option_strings if o.startswith("--"))
        assert env_name(opt) in (a.help or ""), f"{cmd} {opt}: --help does not name {env_name(opt)}"
        if a.choices:
            value = next(str(c) for c in a.choices if str(c) != str(a.default))
        elif a.type is not None and a.type.__name__ == "int":
            value = "7"
        elif a.type is not None and a.type.__name__ == "float":
            value = "7.5"
        else:
            value = f"from-env-{a.dest}"
        monkeypatch.setenv(env_name(opt), value)
        wanted[a.dest] = value
    args = build_parser().parse_args([cmd])
    missed = {d: (v, getattr(args, d)) for d, v in wanted.items() if str(getattr(args, d)) != v}
    assert not missed, f"tandem {cmd}: flags that do not read their variable: {missed}"


def test_version_and_a_bad_number_in_the_environment() -> None:
    run = [sys.executable, "-m", "tandem.cli"]
    out = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"tandem {__version__}"
    env = {**__import__("os").environ, "TANDEM_GRPC_PORT": "fifty", "TANDEM_KV_CACHE_GIB": "lots"}
    helped = subprocess.run([*run, "prefill", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert helped.returncode == 0 and "Traceback" not in helped.stderr and "TANDEM_KV_CACHE_GIB" in helped.stdout
    bad = subprocess.run([*run, "prefill", "--model", "/m", "--etcd", "http://x:1"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "'fifty' is not an integer (from the flag, or TANDEM_GRPC_PORT in the environment)" in bad.stderr


def test_vllm_engine_flags_pass_through_tandems_win_and_owned_ones_are_refused() -> None:
    from tandem.node.engine_args import parse_engine_args

    args, extra = build_parser().parse_known_args(
        ["prefill", "--max-model-len", "256", "--gpu-memory-utilization", "0.5", "--enforce-eager",
         "--download-dir", "/d"])
    assert args.max_model_len == 256  # Tandem's own flag, taken before vLLM sees it
    given = parse_engine_args(extra)
    assert given == {"gpu_memory_utilization": 0.5, "enforce_eager": True, "download_dir": "/d"}
    # vLLM's own syntax, and a flag whose value equals vLLM's default (given all the same)
    assert parse_engine_args(["--no-enforce-eager", "-O3", "--gpu_memory_utilization", "0.6"]) == \
        {"enforce_eager": False, "optimization_level": "3", "gpu_memory_utilization": 0.6}
    for flags, words in [(["--kv-transfer-config", '{"kv_connector": "X"}'], "--kv-transfer-config.* is Tandem's"),
                         (["--kv-cache-memory-bytes", "1000"], "use --kv-cache-gib"),
                         (["--max_model_len", "64"], "use --max-model-len"),  # another spelling of Tandem's
                         (["--max-num-seq", "3"], "unrecognized arguments: --max-num-seq"),  # no abbreviations
                         (["--frobnicate", "3"], "unrecognized arguments: --frobnicate 3")]:
        with pytest.raises(ValueError, match=words):
            parse_engine_args(flags)
    assert parse_engine_args([]) == {}


def test_an_unknown_node_flag_is_a_clear_error_before_any_engine_starts() -> None:
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "decode", "--model", "/nope", "--etcd", "http://x:1",
                          "--frobnicate", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unrecognized arguments: --frobnicate 3" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "coordinator", "--frobnicate"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: --frobnicate" in out.stderr


def test_a_choice_from_the_environment_is_checked_like_one_on_the_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_KVSTORE_SAVE", "yes")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prefill"])
    monkeypatch.setenv("TANDEM_KVSTORE_SAVE", "off")
    assert build_parser().parse_args(["prefill"]).kvstore_save == "off"
