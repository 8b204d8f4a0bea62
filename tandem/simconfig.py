"""What the simulator (``tandem.sim.simulate``) is asked to play: the cluster, its nodes' times,
the coordinator's policy and the engines' memory (``SimConfig``, checked when made), and the
names of what it leaves out, which plans and validations print with their results."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.nodespeed import Speed
from tandem.simcache import BLOCK_TOKENS
from tandem.timings import Timings

ORDERS = ("fifo", "slack")
NOT_MODELLED = ("KV store chunks shared between nodes", "transfer contention")
COLOCATE_OFF = "colocation (every request decoded in the decode pool: the coordinator's --colocate off)"
NO_PREFIX_CACHE = "prefix caching (every prompt computed whole)"
LOCAL_OFF = "conditional disaggregation (every request prefilled in the prefill pool)"


@dataclass
class SimConfig:
    num_prefill: int
    num_decode: int
    prefill: Timings  # the prefill nodes' times
    decode: Timings  # the decode nodes' times (their step and transfer fits)
    kv_bytes_per_token: int = 0
    max_batch: int = 256
    kv_capacity_tokens: int = 0  # each decode node's KV cache; 0: unbounded
    order: str = "slack"
    slo_ttft_s: float = 0.0  # for the slack order, and admission
    slo_tpot_s: float = 0.0  # for admission
    admission: bool = False  # refuse at arrival what is predicted to miss an objective
    local: bool = False  # conditional disaggregation: prefill on a decode node when admission would
    step_tokens: int = 256  # a decode node's prompt tokens per step (its --max-num-batched-tokens)
    # Colocation (the coordinator's --colocate): a prefill node serves a request whole, prefill
    # and decode on its own engine, when the disaggregated choice is predicted to miss the SLO and
    # that is not. Its engine then runs the pool's prefills in steps beside those streams, of up
    # to ``prefill_step_tokens`` (vLLM's default budget there).
    colocate: bool = False
    prefill_step_tokens: int = 2048
    prefix_cache: bool = False  # the engines' prefix caches (entries with input_ids)
    prefill_cache_tokens: int = 0  # each prefill engine's KV cache, which its prefix cache is; 0: unbounded
    block_tokens: int = BLOCK_TOKENS  # the engines' block (their prefix caches hold whole ones)
    store_ram_tokens: int = 0  # each node's KV store RAM tier (with prefix_cache); 0: no KV store
    store_disk: bool = False  # a disk tier below it (unbounded)
    chunk_tokens: int = 256  # the KV store's chunk (a node's --kvstore-chunk-tokens default)
    # How far each node's times stray from its fit, unseen by the predictions (tandem/nodespeed.py):
    # a prefill node's prefills, a decode node's steps (with a local prefill's chunks in them).
    # Speed(): every node runs exactly at its fit. ``speed_seed``: the draws'.
    prefill_speed: Speed = Speed()
    decode_speed: Speed = Speed()
    speed_seed: int = 0
    # The coordinator's calibration (coordinator/calibration.py): each decode node's TPOT and local
    # TTFT predictions, and the prefill pool's TTFT ones, as its finished requests say they turn out.
    calibrate: bool = True

    @property
    def speeds_vary(self) -> bool:
        """Whether any node strays from its fit (then a figure is a mean over draws)."""
        return self.prefill_speed.varies or self.decode_speed.varies

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_prefill < (0 if self.local else 1):
            raise ValueError("a cluster needs a decode node, and a prefill node unless its decode nodes prefill "
                             "(local)")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.order == "slack" and self.slo_ttft_s <= 0:
            raise ValueError("the slack order needs the TTFT objective (slo_ttft_s)")
        if self.admission and (self.slo_ttft_s <= 0 or self.slo_tpot_s <= 0):
            raise ValueError("admission needs both objectives (slo_ttft_s, slo_tpot_s)")
        if self.step_tokens < 1 or self.prefill_step_tokens < 1:
            raise ValueError(f"step_tokens and prefill_step_tokens must be at least 1, got {self.step_tokens}, "
                             f"{self.prefill_step_tokens}")
        if self.colocate and (self.num_prefill < 1 or self.slo_ttft_s <= 0 or self.slo_tpot_s <= 0):
            raise ValueError("colocation needs a prefill node and both objectives (slo_ttft_s, slo_tpot_s): "
                             "it serves a request whole where the disaggregated choice is predicted to miss them")
        if self.prefill_cache_tokens < 0 or self.kv_capacity_tokens < 0:
            raise ValueError("KV cache sizes are token counts >= 0 (0: unbounded)")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1, got {self.block_tokens}")
        if self.store_ram_tokens < 0 or self.chunk_tokens < 1 or (self.store_disk and not self.store_ram_tokens):
            raise ValueError("a KV store needs store_ram_tokens >= 0, chunk_tokens >= 1, and a RAM tier over a disk one")
