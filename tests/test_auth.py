"""API keys: each names a tenant, the file is read again when it changes, no key in any message."""

import logging
import os
import time
from pathlib import Path

import pytest

from tandem.coordinator import auth
from tandem.coordinator.auth import ApiKeys, check_keys, parse_keys
from tandem.errors import Unauthenticated

A, B, C = "a" * 20 + "1", "b" * 20 + "2", "c" * 20 + "3"


def test_keys_off_take_the_claimed_tenant_and_on_take_the_keys(tmp_path: Path) -> None:
    assert ApiKeys(env="").tenant(None, "claimed") == "claimed"
    f = tmp_path / "keys"
    f.write_text(f"# comment\n\nacme={A}\nbeta = {B}\n")
    keys = ApiKeys(str(f), env=f"ops={C}")
    assert keys.tenant(f"Bearer {A}", "claimed") == "acme"
    assert keys.tenant(f"bearer  {B} ", "") == "beta"
    assert keys.tenant(f"Bearer {C}", "beta") == "ops"
    for bad in (None, "", A, f"Basic {A}", "Bearer", "Bearer   ", f"Bearer {A}x", f"Bearer {A[:-1]}"):
        with pytest.raises(Unauthenticated) as ei:
            keys.tenant(bad, "acme")
        assert A not in str(ei.value)


def test_bad_entries_are_named_by_line_never_by_key(tmp_path: Path) -> None:
    for text, words in [("acme\n", "entry 1: expected TENANT=KEY"), (f"\nacme={A}\nbeta=short\n", "entry 3"),
                        (f"acme={A}\nbeta={A}\n", "the same key is given twice"), (f"={A}", "entry 1")]:
        with pytest.raises(ValueError, match=words) as ei:
            parse_keys(text, "keys")
        assert A not in str(ei.value) and "short" not in str(ei.value)
    f = tmp_path / "keys"
    f.write_text("acme=short\n")
    with pytest.raises(ValueError, match=f"{f}, entry 1: a key needs at least"):
        check_keys(str(f))
    # written the wrong way round, the key stands where the tenant should: never repeated
    for line in (f"{A}=acme", f"{A}=", f"{'x' * 70}={A}"):
        with pytest.raises(ValueError, match="entry 1") as ei:
            parse_keys(line, "keys")
        assert A not in str(ei.value) and "x" * 70 not in str(ei.value)


def test_a_removed_file_revokes_its_keys_and_a_blank_variable_still_turns_keys_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    f = tmp_path / "keys"
    f.write_text(f"acme={A}\n")
    keys = ApiKeys(str(f), env="")
    assert keys.tenant(f"Bearer {A}", "") == "acme"
    f.unlink()
    with pytest.raises(Unauthenticated):
        keys.tenant(f"Bearer {A}", "")
    with pytest.raises(Unauthenticated):
        ApiKeys(env=" , ").tenant(f"Bearer {A}", "")
    with pytest.raises(Unauthenticated):  # a header byte that is not UTF-8 (aiohttp's surrogate)
        ApiKeys(env=f"ops={A}").tenant("Bearer \udcff", "")


def test_a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    f = tmp_path / "keys"
    f.write_text(f"acme={A}\n")
    keys = ApiKeys(str(f), env="")
    assert keys.tenant(f"Bearer {A}", "") == "acme"
    f.write_text(f"beta={B}\n")
    os.utime(f, (time.time() + 5, time.time() + 5))  # a new stamp even within the file system's resolution
    assert keys.tenant(f"Bearer {B}", "") == "beta"
    with pytest.raises(Unauthenticated):
        keys.tenant(f"Bearer {A}", "")
    with caplog.at_level(logging.INFO, logger="tandem.coordinator.auth"):
        f.write_text(f"beta={B}\nbroken\n")
        os.utime(f, (time.time() + 10, time.time() + 10))
        assert keys.tenant(f"Bearer {B}", "") == "beta"  # the previous keys stay
        assert keys.tenant(f"Bearer {B}", "") == "beta"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "entry 2" in errors[0].getMessage()  # once per problem
    assert not any(B in r.getMessage() for r in caplog.records)


def test_keys_on_with_none_given_refuse_everything(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# nobody yet\n")
    with pytest.raises(Unauthenticated):
        ApiKeys(str(f), env="").tenant(f"Bearer {A}", "")
