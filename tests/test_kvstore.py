"""The KV store's keys and tiers (kvstore/): chained keys, caps and eviction order, write-behind,
promotion, and a disk tier that turns every kind of damage into a counted miss, never wrong data."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tandem.kvstore import tiers
from tandem.kvstore.keys import chunk_keys, namespace
from tandem.kvstore.tiers import DiskTier

LAYOUT = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_size": 64, "dtype": "float32"}


def test_keys_name_the_whole_prefix_and_bind_model_and_layout() -> None:
    ns = namespace("tiny", LAYOUT, 32)
    a = chunk_keys(ns, list(range(100)), 32)
    assert len(a) == 3  # the 4 tokens past the last whole chunk have no key
    b = chunk_keys(ns, list(range(64)) + [7] * 36, 32)
    assert b[:2] == a[:2] and b[2] != a[2]  # same first 64 tokens, then not
    c = chunk_keys(ns, [999] + list(range(1, 100)), 32)
    assert all(x != y for x, y in zip(a, c))  # one token differs at the start: every key differs
    # Something else behind the same tokens (an adapter, an image): other keys.
    assert chunk_keys(ns, list(range(100)), 32, extra=b"lora:7")[0] != a[0]
    assert chunk_keys(ns, list(range(100)), 32, extra=b"") == a
    assert chunk_keys(namespace("other", LAYOUT, 32), list(range(100)), 32)[0] != a[0]
    assert chunk_keys(namespace("tiny", {**LAYOUT, "dtype": "bfloat16"}, 32), list(range(100)), 32)[0] != a[0]
    assert chunk_keys(namespace("tiny", LAYOUT, 16), list(range(100)), 16)[1] != a[0]
    with pytest.raises(ValueError):
        namespace("tiny", LAYOUT, 0)


def test_disk_tier_survives_a_restart_and_keeps_its_cap_and_order(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, cap_bytes=3 * tiers.chunk_file_bytes(100), durable=False)
    for k in (b"c" * 32, b"a" * 32, b"b" * 32):  # written in this order (not the keys' order)
        disk.put(k, k[:1] * 100)
        os.utime(disk._path(k), (0, len(disk)))  # distinct mtimes: the restart keeps the order
    again = DiskTier(tmp_path, cap_bytes=disk.cap, durable=False)
    assert len(again) == 3 and again.get(b"a" * 32) == b"a" * 100  # a is used: c is now the oldest
    again.put(b"d" * 32, b"d" * 100)  # over the cap: the least recently used (c) goes
    assert b"c" * 32 not in again and not again._path(b"c" * 32).exists()
    assert again.get(b"b" * 32) == b"b" * 100 and again.get(b"d" * 32) == b"d" * 100
    with pytest.raises(ValueError):
        again.put(b"short", b"x")


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-key", "empty"])
def test_damaged_disk_chunks_are_counted_misses_and_removed(tmp_path: Path, damage: str) -> None:
    disk = DiskTier(tmp_path, cap_bytes=1 << 20, durable=False)
    key, other = b"k" * 32, b"o" * 32
    disk.put(key, os.urandom(4096))
    path = disk._path(key)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-1]
    elif damage == "other-key":  # a file renamed onto the wrong key
        disk.put(other, os.urandom(4096))
        raw = bytearray(disk._path(other).read_bytes())
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    corrupt0 = tiers.COUNTS.get("corrupt_chunks")
    assert disk.get(key) is None
    assert tiers.COUNTS.get("corrupt_chunks") == corrupt0 + 1 and not path.exists() and key not in disk


def test_a_torn_write_left_by_a_crash_is_removed_at_start(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, cap_bytes=1 << 20, durable=False)
    disk.put(b"k" * 32, b"data")
    torn = disk._path(b"t" * 32).parent / f"{tiers.TMP_PREFIX}{(b't' * 32).hex()}.1.1"
    torn.parent.mkdir(exist_ok=True)
    torn.write_bytes(b"TKVC half a chunk")
    writing = torn.with_name(torn.name + "-live")  # another process's write in progress: left alone
    writing.write_bytes(b"TKVC")
    os.utime(torn, (0, 0))  # the crash was long ago
    again = DiskTier(tmp_path, cap_bytes=1 << 20, durable=False)
    assert not torn.exists() and writing.exists() and len(again) == 1 and again.get(b"t" * 32) is None
    # Files that are not where chunks go are not chunks (a directory, uppercase hex, a wrong folder).
    (tmp_path / "zz" / ("AB" * 32)).parent.mkdir()
    (tmp_path / "zz" / ("AB" * 32)).write_bytes(b"x")
    (tmp_path / "ab" / ("ab" * 32)).mkdir(parents=True)
    assert len(DiskTier(tmp_path, cap_bytes=1 << 20, durable=False)) == 1


def _stall_writes(disk: DiskTier) -> threading.Event:
    """Make every write to ``disk`` wait until the returned event is set."""
    gate = threading.Event()
    real_put = disk.put

    def stalled(key: bytes, data: bytes) -> None:
        gate.wait(10)
        real_put(key, data)

    disk.put = stalled  # type: ignore[method-assign]
    return gate


def test_disk_writes_are_dropped_and_counted_when_the_disk_falls_behind_and_promotions_pass_them(tmp_path: Path) -> None:
    from tandem.kvstore.nodestore import NodeStore

    disk = DiskTier(tmp_path / "disk", 1 << 20, durable=False)
    gate = _stall_writes(disk)
    store = NodeStore(_arena(tmp_path, slots=8), disk, queue_chunks=2)
    try:
        dropped = tiers.COUNTS.get("dropped_saves")
        keys = [bytes([i]) * 32 for i in range(6)]
        for k in keys:
            store.reserve_for_save(k)
        store.saved(keys[:1], ok=True)  # its write starts, and waits at the gate
        deadline = time.monotonic() + 10
        while store._tasks.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        store.saved(keys[1:], ok=True)  # each queued for the disk: two fit, three are dropped
        assert tiers.COUNTS.get("dropped_saves") == dropped + 3
        assert store.count_ready(keys, 0) == 6  # RAM has them all: the caller never waited
        # The two queued keep their slots pinned, and so does the one being written (from the slot itself).
        assert store.index.drop_unpinned() == 3
        # A promotion has its own lane: it neither waits behind the stalled writes nor is dropped by
        # their full queue.
        up = b"u" * 32
        DiskTier.put(disk, up, b"\x07" * 4096)  # (the class's own put: this one is not stalled)
        assert store.promote([up], 0) == 1
        assert store.wait_promoted([up], 10) and store.count_ready([up], 0) == 1
        with store.arena.view(store.index.pin(up)) as data:
            assert bytes(data) == b"\x07" * 4096
        store.unpin([up])
    finally:
        gate.set()
        store.flush()
        store.close()
    assert sum(k in disk for k in keys) == 3


def test_concurrent_saves_and_loads_of_one_chunk_never_read_a_torn_file_nor_count_one(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 1 << 24, durable=False)
    key = b"k" * 32
    versions = [bytes([v]) * 65536 for v in range(4)]
    disk.put(key, versions[0])
    stop = threading.Event()
    bad: list[bytes] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            disk.put(key, versions[i % 4])
            i += 1

    def reader() -> None:
        while not stop.is_set():
            data = disk.get(key)
            if data is not None and data not in versions:
                bad.append(data[:8])

    threads = [threading.Thread(target=writer), threading.Thread(target=writer), threading.Thread(target=reader),
               threading.Thread(target=reader)]
    corrupt0 = tiers.COUNTS.get("corrupt_chunks")
    for t in threads:
        t.start()
    threading.Event().wait(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert bad == [] and tiers.COUNTS.get("corrupt_chunks") == corrupt0


def test_kvstore_stats_verify_and_clear_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tandem.cli import main

    disk = DiskTier(tmp_path, 1 << 20, durable=False)
    for i in range(3):
        disk.put(bytes([i]) * 32, os.urandom(1000))
    bad = disk._path(bytes([1]) * 32)
    bad.write_bytes(bad.read_bytes()[:-10])
    assert main(["kvstore", "stats", "--dir", str(tmp_path)]) == 0
    assert "3 chunks" in capsys.readouterr().out
    assert main(["kvstore", "stats", "--dir", str(tmp_path), "--verify"]) == 0
    assert "1 failed their check and were removed" in capsys.readouterr().out
    assert main(["kvstore", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed 2 chunks" in capsys.readouterr().out
    assert DiskTier(tmp_path, 1 << 20).held == 0
    with pytest.raises(SystemExit, match="no such directory"):
        main(["kvstore", "stats", "--dir", str(tmp_path / "nope")])


# The node's store as the connector's scheduler half uses it (arena + index + disk thread) -------------

def _arena(tmp_path: Path, slots: int = 4, slot_bytes: int = 4096):
    from tandem.kvstore.arena import Arena

    return Arena(tmp_path / "arena", slots, slot_bytes, create=True)


def test_arena_is_shared_through_its_file_and_refuses_a_mismatch(tmp_path: Path) -> None:
    from tandem.kvstore.arena import Arena

    a = _arena(tmp_path)
    b = Arena(tmp_path / "arena", 4, 4096, create=False)  # the other half opens it
    a.write(2, b"\x07" * 4096)
    assert b.read(2) == b"\x07" * 4096
    b.unlink()
    assert not (tmp_path / "arena").exists() and a.read(2)[:1] == b"\x07"  # mapped memory outlives the name
    with pytest.raises(RuntimeError, match="missing"):
        Arena(tmp_path / "arena", 4, 4096, create=False)
    _arena(tmp_path)
    with pytest.raises(RuntimeError, match="exists already"):
        _arena(tmp_path)
    with pytest.raises(RuntimeError, match="disagree"):
        Arena(tmp_path / "arena", 8, 4096, create=False)
    with pytest.raises(ValueError):
        a.write(9, b"\x00" * 4096)


def test_slot_index_evicts_least_recently_used_and_never_a_pinned_slot() -> None:
    from tandem.kvstore.arena import SlotIndex

    idx = SlotIndex(2, policy="lru")
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    sa = idx.reserve(a)
    assert sa is not None and not idx.ready(a) and idx.has(a)
    assert idx.reserve(b) is not None and idx.reserve(c) is None  # both being filled: pinned
    idx.fill_done(a, ok=True)
    idx.fill_done(b, ok=False)  # a failed fill frees its slot
    assert idx.ready(a) and not idx.has(b)
    assert idx.reserve(c) is not None  # the freed slot
    idx.fill_done(c, ok=True)
    slot_c = idx.slot(c)
    idx.pin(a)  # a load reads a
    assert idx.reserve(b) == slot_c and not idx.has(c)  # a is pinned: c, the other, goes
    assert idx.evictions == 1
    idx.fill_done(b, ok=True)
    idx.unpin(a)
    idx.used([a])  # a used last: b is the least recently used
    slot_b = idx.slot(b)
    assert idx.reserve(c) == slot_b and idx.ready(a) and not idx.has(b)
    idx.pin(a)  # a pinned, c being filled: nothing to evict
    assert idx.reserve(b) is None and idx.num_ready() == 1


# Three new chunks pushed through four slots holding p0-p1-p2 and q1 (a prompt that shares p0): tail-first
# keeps p0 and q1 (the prompt that used them last) longest; LRU drops p0 last of them and leaves q1, which
# needs it, orphaned; FIFO drops by age alone.
@pytest.mark.parametrize("policy,evicted", [("tail-first", ["p2", "p1", "q1"]), ("lru", ["p1", "p2", "p0"]),
                                            ("fifo", ["p0", "p1", "p2"])])
def test_each_eviction_policy_evicts_in_its_order(policy: str, evicted: list[str]) -> None:
    from tandem.kvstore.arena import SlotIndex

    idx = SlotIndex(4, policy=policy)
    keys = {n: n.encode() * 16 for n in ("p0", "p1", "p2", "q1", "x", "y", "z")}

    def store(*names: str) -> None:  # as a save does: reserve, fill, then one use of the run
        for n in names:
            assert idx.reserve(keys[n]) is not None
            idx.fill_done(keys[n], ok=True)
        idx.used([keys[n] for n in names])

    store("p0", "p1", "p2")  # one prompt's three chunks
    store("q1")  # a prompt sharing p0: it stored its second chunk only...
    idx.used([keys["p0"], keys["q1"]])  # ...and used p0 with it
    gone = []
    for n in ("x", "y", "z"):
        before = {k for k in keys if idx.has(keys[k])}
        store(n)
        gone += sorted(before - {k for k in keys if idx.has(keys[k])})
    assert gone == evicted


def test_an_unknown_eviction_policy_is_refused() -> None:
    from tandem.kvstore.arena import SlotIndex

    with pytest.raises(ValueError, match="tail-first"):
        SlotIndex(2, policy="mru")


def test_node_store_promotes_from_disk_saves_through_to_disk_and_drops_under_pressure(tmp_path: Path) -> None:
    from tandem.kvstore.nodestore import NodeStore

    disk = DiskTier(tmp_path / "disk", 1 << 20)
    store = NodeStore(_arena(tmp_path, slots=2), disk)
    try:
        k = chunk_keys(namespace("m", LAYOUT, 32), list(range(128)), 32)  # four chained chunks
        # A save: reserved, filled by "the worker", then ready and written through to disk.
        slot = store.reserve_for_save(k[0])
        assert slot is not None and store.count_ready(k, 0) == 0
        store.arena.write(slot, b"\x01" * 4096)
        store.saved([k[0]], ok=True)
        assert store.count_ready(k, 0) == 1 and store.reserve_for_save(k[0]) is None  # held: not again
        store.flush()
        assert k[0] in disk and disk.get(k[0]) == b"\x01" * 4096
        # Chunks on disk only (another run's) come up into RAM, verified; the chain stops at a gap.
        disk.put(k[1], b"\x02" * 4096)
        disk.put(k[3], b"\x04" * 4096)
        assert store.promote(k, 1) == 1  # k[2] is missing: k[3] cannot follow it
        store.flush()
        assert store.count_ready(k, 0) == 2 and store.arena.read(store.index.slot(k[1])) == b"\x02" * 4096
        # Both slots pinned by loads: a save has nowhere to go, and is dropped and counted.
        assert store.pin_for_load(k[:2]) is not None
        dropped = tiers.COUNTS.get("dropped_saves")
        assert store.reserve_for_save(k[2]) is None and tiers.COUNTS.get("dropped_saves") == dropped + 1
        assert store.pin_for_load(k[:3]) is None  # not all ready: nothing pinned
        store.unpin(k[:2])
        # A corrupt file on the way up is a miss, removed, and its slot freed.
        path = disk._path(k[3])
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
        disk.put(k[2], b"\x03" * 4096)
        corrupt = tiers.COUNTS.get("corrupt_chunks")
        assert store.promote(k, 2) == 2
        store.flush()
        assert tiers.COUNTS.get("corrupt_chunks") == corrupt + 1 and k[3] not in disk
        # Two slots for k[2] and k[3] evicted k[0] and k[1] (least recently used first); k[3]'s is free again.
        assert store.count_ready(k, 2) == 1 and len(store.index) == 1 and store.index.evictions == 2
        assert store.held_bytes() == {"ram": 4096, "disk": disk.held}
        # Everything that entered or left a tier, in order, for the node's KV events (kvstore/held.py).
        from tandem.kvstore.held import HeldChunks

        events = store.take_events()
        assert ("+", k[0].hex(), "ram") in events and ("+", k[0].hex(), "disk") in events
        assert ("-", k[0].hex(), "ram") in events and ("-", k[3].hex(), "disk") in events
        held = HeldChunks()
        held.apply(events)
        assert [held.state(x) for x in k] == ["disk", "disk", "ram", ""] and store.take_events() == []
    finally:
        store.close()


def test_a_disk_tier_directory_serves_one_node_at_a_time(tmp_path: Path) -> None:
    from tandem.kvstore.arena import lock_dir

    fd = lock_dir(tmp_path / "d")
    with pytest.raises(RuntimeError, match="in use by another node"):
        lock_dir(tmp_path / "d")
    os.close(fd)  # the first node exits: its lock goes with it
    os.close(lock_dir(tmp_path / "d"))


def test_a_ram_tier_with_no_room_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    from tandem.kvstore.arena import Arena

    with pytest.raises(RuntimeError, match="no room for a .* GiB RAM tier"):
        Arena(tmp_path / "huge", 1 << 20, 1 << 30, create=True)  # a pebibyte
    assert not (tmp_path / "huge").exists()


def test_a_save_counts_the_prompts_whole_run_as_used_so_tail_first_keeps_its_head(tmp_path: Path) -> None:
    from tandem.kvstore.arena import Arena
    from tandem.kvstore.nodestore import NodeStore

    store = NodeStore(Arena(tmp_path / "arena", 3, 8, create=True), None, eviction="tail-first")
    a, b, c, x = (n.encode() * 32 for n in "abcx")
    assert store.reserve_for_save(a) is not None
    store.saved([a], True, run=[a])
    assert store.count_ready([a, b, c], 0) == 1  # a later prompt finds a, computes b and c...
    reserved = [k for k in (b, c) if store.reserve_for_save(k) is not None]
    store.saved(reserved, True, run=[a, b, c])  # ...and saves them: its whole run was used, head last
    assert store.reserve_for_save(x) is not None  # full: the tail goes first
    assert store.index.ready(a) and store.index.ready(b) and not store.index.has(c)


def test_disk_chunks_move_in_whole_pages_and_version_1_files_are_still_read(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, cap_bytes=1 << 22, durable=True)
    key, data = b"p" * 32, os.urandom(5000)
    disk.put(key, memoryview(data))  # (a slot's view, as the store writes it)
    raw = disk._path(key).read_bytes()
    assert len(raw) == tiers.chunk_file_bytes(5000) == 3 * tiers.PAGE and raw[tiers.PAGE:tiers.PAGE + 5000] == data
    assert disk.get(key) == data and disk.held == len(raw)
    # A chunk an older Tandem wrote (the header, then the payload) reads back after an upgrade.
    old_key, old = b"v" * 32, os.urandom(700)
    header = tiers._HEADER.pack(tiers.MAGIC, 1, 0, old_key, len(old), __import__("hashlib").sha256(old).digest())
    disk._path(old_key).parent.mkdir(exist_ok=True)
    disk._path(old_key).write_bytes(header + old)
    again = DiskTier(tmp_path, cap_bytes=1 << 22)
    assert again.get(old_key) == old and again.get(key) == data
    disk._path(old_key).write_bytes(header + old[:-1])  # and a truncated one is still a miss
    assert again.get(old_key) is None and old_key not in again


@pytest.mark.parametrize("refuses", ["the flag", "the write"])
def test_a_filesystem_that_refuses_o_direct_gets_buffered_writes(tmp_path: Path, refuses: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl as real_fcntl

    if not tiers._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    disk = DiskTier(tmp_path, cap_bytes=1 << 22, durable=False)
    disk.put(b"s" * 32, b"x" * 4096)
    assert disk.direct and disk.get(b"s" * 32) == b"x" * 4096
    refused = OSError(errno.EINVAL, "Invalid argument")
    set_flags, pwrite = real_fcntl.fcntl, os.pwrite

    def fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if refuses == "the flag" and cmd == real_fcntl.F_SETFL and arg & tiers._O_DIRECT:
            raise refused
        return set_flags(fd, cmd, arg)

    def write(fd: int, data: memoryview, at: int) -> int:
        if refuses == "the write" and set_flags(fd, real_fcntl.F_GETFL) & tiers._O_DIRECT:
            raise refused
        return pwrite(fd, data, at)

    monkeypatch.setattr(tiers.fcntl, "fcntl", fcntl)
    monkeypatch.setattr(tiers.os, "pwrite", write)
    disk.put(b"t" * 32, b"y" * 10)  # refused: said once, written through the page cache all the same
    assert not disk.direct
    disk.put(b"u" * 32, b"z" * 5000)
    assert [disk.get(k * 32) for k in (b"s", b"t", b"u")] == [b"x" * 4096, b"y" * 10, b"z" * 5000]
