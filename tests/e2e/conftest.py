"""Fixtures shared by the end-to-end modules; each module defines its own ``cluster``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.proto import tandem_pb2_grpc as pb_grpc

from .helpers import reference_outputs


@pytest.fixture(scope="module")
def stub(cluster):
    """A Coordinator stub on the module's cluster."""
    ch = cluster.channel(cluster.grpc_address)
    yield pb_grpc.CoordinatorStub(ch)
    ch.close()


@pytest.fixture(scope="session")
def plain_outputs(request: pytest.FixtureRequest, tiny_model: Path) -> dict[str, list[list[int]]]:
    """A plain vLLM engine's outputs for every collected module's ``REFERENCE_CASES``, computed once a
    session in one engine: {module name: its cases' token ids, in its order}. A case's
    ``extend_with`` counts within its own module's list."""
    # The modules of the tests collected to run that use them (not merely defined beside them).
    modules = {item.module.__name__: item.module for item in request.session.items
               if getattr(item, "module", None) is not None
               and "plain_outputs" in getattr(item, "fixturenames", ())}
    groups = {name: mod for name, mod in sorted(modules.items()) if hasattr(mod, "REFERENCE_CASES")}
    cases: list[dict] = []
    spans: dict[str, tuple[int, int]] = {}
    for name, mod in groups.items():
        start = len(cases)
        for case in mod.REFERENCE_CASES:
            if "extend_with" in case:
                case = {**case, "extend_with": [start + j for j in case["extend_with"]]}
            cases.append(case)
        spans[name] = (start, len(cases))
    if not cases:
        return {}
    max_len = max(mod.MAX_MODEL_LEN for mod in groups.values())
    outs = reference_outputs(tiny_model, cases, max_len)
    return {name: outs[a:b] for name, (a, b) in spans.items()}


@pytest.fixture
def references(request: pytest.FixtureRequest, plain_outputs) -> list[list[int]]:
    """The plain engine's outputs for the requesting module's ``REFERENCE_CASES``."""
    name = request.module.__name__
    if name not in plain_outputs:
        pytest.fail(f"{name} asks for references but defines no REFERENCE_CASES", pytrace=False)
    return plain_outputs[name]
