"""TLS and mutual TLS on a real gRPC server and on the coordinator's HTTP port (aiohttp): who gets in,
and a certificate rotated in place is served from the next handshake on."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem import tls as tls_mod
from tandem.grpcserve import start_grpc
from tandem.tls import TlsConfig, make_certs


def served_serial(port: int, client: TlsConfig, alpn: str = "h2") -> int:
    """The serial number of the certificate the server on ``port`` shows now."""
    ctx = client.client_ssl_context()
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture()
def certs(tmp_path: Path) -> dict[str, Path]:
    return make_certs(tmp_path / "certs", ["127.0.0.1"])


def test_grpc_mutual_tls_lets_in_only_the_cas_clients_and_reloads_its_certificate(
        certs: dict[str, Path], tmp_path: Path) -> None:
    # a coordinator's front door: clients come with the client CA's certificates
    server_tls = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]),
                           client_ca=str(certs["client_ca"])).check("coordinator")
    client_tls = TlsConfig(str(certs["client"]), str(certs["client_key"]), str(certs["ca"]))
    other = make_certs(tmp_path / "other", ["127.0.0.1"])  # another CA's client

    async def go() -> None:
        server = await start_grpc("127.0.0.1", 0, "tandem.v1.Test", lambda s: None, tls=server_tls)
        address = f"127.0.0.1:{server.port}"

        async def check(channel: grpc.aio.Channel) -> str:
            async with channel:
                try:
                    r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

        try:
            assert await check(client_tls.aio_channel(address)) == "SERVING"
            assert await check(grpc.aio.insecure_channel(address)) == "UNAVAILABLE"
            ca = certs["ca"].read_bytes()
            assert await check(grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca))) == "UNAVAILABLE"
            wrong = grpc.ssl_channel_credentials(ca, other["client_key"].read_bytes(), other["client"].read_bytes())
            assert await check(grpc.aio.secure_channel(address, wrong)) == "UNAVAILABLE"
            # a rotation: new certificates from the same CA, written over the served files
            before = served_serial(server.port, client_tls)
            make_certs(certs["ca"].parent, ["127.0.0.1"])
            assert served_serial(server.port, client_tls) != before
            assert await check(client_tls.aio_channel(address)) == "SERVING"  # the client files rotated too
        finally:
            await server.stop(0)
        # a node: only the cluster CA's certificates (the daemons') get in, never a client's
        node_tls = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"])).check("node")
        node = await start_grpc("127.0.0.1", 0, "tandem.v1.Test", lambda s: None, tls=node_tls)
        address = f"127.0.0.1:{node.port}"
        try:
            assert await check(client_tls.aio_channel(address)) == "UNAVAILABLE"
            assert await check(node_tls.aio_channel(address)) == "SERVING"
        finally:
            await node.stop(0)

    asyncio.run(go())


def test_a_daemon_is_verified_by_name_where_its_address_is_not_in_its_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "named", ["tandem-node"], loopback=False)  # as pods with changing addresses
    server_tls = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]))
    client = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]))

    async def go() -> None:
        server = await start_grpc("127.0.0.1", 0, "tandem.v1.Test", lambda s: None, tls=server_tls)
        address = f"127.0.0.1:{server.port}"

        async def code(tls: TlsConfig) -> str:
            async with tls.aio_channel(address) as ch:
                try:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

        try:
            assert await code(client) == "UNAVAILABLE"  # 127.0.0.1 is not in the certificate
            assert await code(TlsConfig(client.cert, client.key, client.ca, server_name="tandem-node")) == "OK"
            assert await code(TlsConfig(client.cert, client.key, client.ca, server_name="other")) == "UNAVAILABLE"
        finally:
            await server.stop(0)

    asyncio.run(go())


def test_https_with_client_auth_and_reload(certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    monkeypatch.setattr(tls_mod, "RELOAD_CHECK_S", 0.05)
    server_tls = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]),
                           client_ca=str(certs["client_ca"]))
    client_tls = TlsConfig(str(certs["client"]), str(certs["client_key"]), str(certs["ca"]))

    async def go() -> None:
        app = web.Application()
        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app.add_routes([web.get("/ok", ok)])
        runner = web.AppRunner(app)
        await runner.setup()
        ctx = server_tls.server_ssl_context()
        reload = asyncio.get_running_loop().create_task(server_tls.keep_reloading(ctx))
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = runner.addresses[0][1]
        loop = asyncio.get_running_loop()
        try:
            def get(context: ssl.SSLContext) -> str:
                import urllib.request

                try:
                    with urllib.request.urlopen(f"https://127.0.0.1:{port}/ok", context=context, timeout=5) as r:
                        return str(r.status)
                except OSError as exc:
                    return type(exc).__name__

            assert await loop.run_in_executor(None, get, client_tls.client_ssl_context()) == "200"
            no_cert = ssl.create_default_context(cafile=str(certs["ca"]))
            assert await loop.run_in_executor(None, get, no_cert) != "200"
            before = await loop.run_in_executor(None, served_serial, port, client_tls, "http/1.1")
            # a bad change (a certificate whose key is not beside it) leaves the live one serving
            good_cert = certs["server"].read_bytes()
            certs["server"].write_bytes(certs["client"].read_bytes())
            await asyncio.sleep(0.3)
            assert await loop.run_in_executor(None, served_serial, port, client_tls, "http/1.1") == before
            assert await loop.run_in_executor(None, get, client_tls.client_ssl_context()) == "200"
            certs["server"].write_bytes(good_cert)
            make_certs(certs["ca"].parent, ["127.0.0.1"])
            deadline = time.monotonic() + 5
            while await loop.run_in_executor(None, served_serial, port, client_tls, "http/1.1") == before:
                assert time.monotonic() < deadline, "the HTTP port still shows the old certificate"
                await asyncio.sleep(0.05)
        finally:
            reload.cancel()
            await runner.cleanup()

    asyncio.run(go())


def test_config_errors_name_the_flag(certs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        TlsConfig(cert=str(certs["server"])).check()
    with pytest.raises(ValueError, match="a node with TLS needs --tls-ca"):
        TlsConfig(str(certs["server"]), str(certs["server_key"])).check("node")
    with pytest.raises(ValueError, match="--tls-client-auth required needs --tls-client-ca"):
        TlsConfig(str(certs["server"]), str(certs["server_key"])).check("coordinator")
    assert TlsConfig(ca=str(certs["ca"])).check("client").dials_tls  # a client may verify the server only
    # a CA certificate whose key was put away: an error, never a new CA behind the daemons' backs
    ca_before = certs["ca"].read_bytes()
    certs["ca_key"].rename(tmp_path / "ca.key.safe")
    with pytest.raises(ValueError, match="its key .* is not"):
        make_certs(certs["ca"].parent, ["127.0.0.1"])
    assert certs["ca"].read_bytes() == ca_before
    with pytest.raises(ValueError, match="--tls-ca: '/nope' is not a file"):
        TlsConfig(str(certs["server"]), str(certs["server_key"]), "/nope").check()
    mismatched = TlsConfig(str(certs["server"]), str(certs["client_key"]), str(certs["ca"]))
    with pytest.raises(ValueError, match="is not the key of"):
        mismatched.check("node")
    assert (os.stat(certs["server_key"]).st_mode & 0o777) == 0o600
    shutil.rmtree(tmp_path / "certs")


def test_the_coordinator_dials_its_nodes_with_a_rotated_certificate(certs: dict[str, Path]) -> None:
    from tandem.coordinator.router import Router
    from tandem.membership import NodeRecord

    node_tls = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"])).check("node")
    daemon_tls = TlsConfig(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]))

    async def go() -> None:
        async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            pem = context.auth_context()["x509_pem_cert"][0]  # the certificate the caller showed
            return str(x509.load_pem_x509_certificate(pem).serial_number).encode()

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Who", {"Ask": grpc.unary_unary_rpc_method_handler(who)}),))
        port = server.add_secure_port("127.0.0.1:0", node_tls.server_credentials())
        await server.start()
        router = Router("m", watch_loads=False, tls=daemon_tls, retire_channels_after_s=0.5)
        router.on_membership("p0", NodeRecord("p0", "prefill", f"127.0.0.1:{port}", "x", "m", 512, engine_id="e1"))
        node = router.nodes()[0]

        async def ask(ch: grpc.aio.Channel) -> bytes:
            return await ch.unary_unary("/test.Who/Ask")(b"", timeout=5)

        fresh = asyncio.create_task(router.keep_certificate_fresh(every_s=0.1))
        try:
            old = node.channel
            before = await ask(old)
            make_certs(certs["ca"].parent, ["127.0.0.1"])  # rotated in place, same CA
            deadline = time.monotonic() + 5
            while node.channel is old:
                assert time.monotonic() < deadline, "the router kept dialling with the old certificate"
                await asyncio.sleep(0.05)
            assert await ask(node.channel) != before  # new calls show the new certificate
            assert await ask(old) == before  # the old channel serves on for calls under way ...
            await asyncio.sleep(0.8)
            with pytest.raises(grpc.aio.UsageError, match="closed"):  # ... and closes once no call can be left on it
                await ask(old)
        finally:
            fresh.cancel()
            await router.close()
            await server.stop(0)

    asyncio.run(go())
