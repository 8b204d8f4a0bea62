"""The simulated engine behind `--simulate` (no cluster: the engine alone)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tandem.kvtransfer.handle import CONSUME, PRODUCE, TransferHandle
from tandem.node.config import NodeConfig
from tandem.node.simengine import SimEngine
from tandem.sampling import Sampling
from tandem.timings import Timings

T = Timings((0.2, 0.0, 0.0), (0.01, 0.0, 0.0))  # prefills of 200 ms, steps of 10 ms


def engine(tiny_model: Path) -> SimEngine:
    return SimEngine(NodeConfig(role="decode", model=str(tiny_model), etcd="-"), "127.0.0.1:1", "sim:x", T)


async def collect(gen) -> list:
    return [out async for out in gen]


def test_a_request_cancelled_in_its_prefill_never_runs_on(tiny_model: Path) -> None:
    async def main() -> None:
        e = engine(tiny_model)
        task = asyncio.ensure_future(collect(e.generate("r1", [5, 6, 7], Sampling(max_tokens=100), {"tandem": PRODUCE})))
        await asyncio.sleep(0.05)  # mid-prefill
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # its prefill is over by now
        assert not e._running and not e._prefills and not e._held
        outs = await collect(e.generate("r2", [8, 9], Sampling(max_tokens=3), None))  # the engine serves on
        assert sum(len(o.outputs[0].token_ids) for o in outs) == 3 and outs[-1].finished
        e.shutdown()

    asyncio.run(main())


def test_a_handle_is_minted_once_and_a_decode_continues_the_prefills_tokens(tiny_model: Path) -> None:
    async def main() -> None:
        e = engine(tiny_model)
        prompt = [11, 12, 13, 14, 15]
        whole = [t for o in await collect(e.generate("a", prompt, Sampling(max_tokens=6), None))
                 for t in o.outputs[0].token_ids]
        first = await collect(e.generate("b", prompt, Sampling(max_tokens=1), {"tandem": PRODUCE}))
        handle = TransferHandle.from_params(first[-1].kv_transfer_params)
        assert handle.num_tokens == 5 and handle.block_ids == [0] and not e._held
        t0 = first[-1].outputs[0].token_ids[0]
        rest = [t for o in await collect(e.generate("c", prompt + [t0], Sampling(max_tokens=5),
                                                    handle.to_params(CONSUME))) for t in o.outputs[0].token_ids]
        assert [t0, *rest] == whole
        e.shutdown()

    asyncio.run(main())


def test_a_failed_loop_ends_its_requests_and_the_node_leaves(tiny_model: Path) -> None:
    async def main() -> None:
        e = engine(tiny_model)

        def broken(*_a) -> float:
            raise ZeroDivisionError("a bug")

        e.timings = type("Broken", (), {"prefill_s": broken, "step_s": broken, "transfer_s": broken})()
        t0 = time.monotonic()
        outs = await asyncio.wait_for(collect(e.generate("r", [5, 6], Sampling(max_tokens=4), None)), 5)
        assert outs == [] and time.monotonic() - t0 < 5
        await asyncio.wait_for(e.wait_until_dead(), 1)
        with pytest.raises(RuntimeError, match="loop failed"):
            await collect(e.generate("r2", [5], Sampling(max_tokens=1), None))

    asyncio.run(main())


def test_a_stream_interval_groups_tokens_as_vllm_does(tiny_model: Path) -> None:
    async def main() -> None:
        e = engine(tiny_model)
        prompt = [21, 22, 23]
        one = [o.outputs[0].token_ids for o in await collect(e.generate("a", prompt, Sampling(max_tokens=8), None))]
        four = [o.outputs[0].token_ids for o in await collect(
            e.generate("b", prompt, Sampling(max_tokens=8), None, stream_interval=4))]
        assert [len(x) for x in one] == [1] * 8
        # the first at once, then groups of 4, the last at once with what is left
        assert [len(x) for x in four] == [1, 4, 3] and sum(four, []) == sum(one, [])
        e.shutdown()

    asyncio.run(main())
