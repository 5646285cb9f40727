"""bench/heartbeats: N simulated agents, each enrolled with its own key and certificate, heartbeat a real
`mobility-server serve` on loopback over mutual TLS (one kept-alive connection per agent).

Phase 1 (closed loop): every agent sends as fast as the server answers -> the sustained rate.
Phase 2 (open loop): heartbeats paced at --rate per second across the agents -> p50/p99 latency at that load.
The client runs in this process on the same 2 cores as the server, so the figures are a lower bound.

    .venv/bin/python bench/heartbeats.py [--agents 200] [--seconds 10] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent import __version__  # noqa: E402
from agent.lifecycle.identity import key_pem, new_key_and_csr  # noqa: E402
from agent.shared import wire  # noqa: E402
from scripts.localserver import init_local_server, start_local_server  # noqa: E402


async def enrol(
    session: aiohttp.ClientSession, base: str, passphrase: str, i: int, state: Path
) -> tuple[str, Path, Path]:
    key, csr = new_key_and_csr(None)
    async with session.post(base + wire.NONCE_PATH) as r:
        nonce = (await r.json())["nonce"]
    req = wire.EnrolRequest(
        csr=csr.decode(),
        nonce=nonce,
        proof=wire.enrol_proof(passphrase, nonce, csr),
        hostname=f"bench-{i}",
        os_tag="DEBIAN12",
        role="MS",
        platform="VmWare",
        facts=wire.MachineFacts(machine_id=f"{i:032x}"),
        agent_version=__version__,
    )
    async with session.post(base + wire.ENROL_PATH, json=req.to_json()) as r:
        answer = await r.json()
        assert r.status == 200, answer
    cert, keyf = state / f"{i}.pem", state / f"{i}.key"
    cert.write_text(answer["certificate"])
    keyf.write_bytes(key_pem(key))
    return answer["host_id"], cert, keyf


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def run(base: str, ca: Path, passphrase: str, agents: int, seconds: float, rate: float) -> None:
    state = Path(tempfile.mkdtemp(prefix="bench-hb-"))
    plain = ssl.create_default_context(cafile=str(ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=plain, limit=32)) as s:
        t0 = time.perf_counter()
        identities = await asyncio.gather(*(enrol(s, base, passphrase, i, state) for i in range(agents)))
        print(f"enrolled {agents} agents in {time.perf_counter() - t0:.1f} s")

    sessions = []
    for host_id, cert, key in identities:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        sessions.append((host_id, aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))))
    body = {"agent_version": __version__, "health": {"status": "healthy", "time": time.time(), "checks": []}}

    async def beat(host_id: str, session: aiohttp.ClientSession) -> float:
        start = time.perf_counter()
        async with session.post(base + wire.HEARTBEAT_PATH, json={"host_id": host_id, **body}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"heartbeat answered {r.status}")
        return time.perf_counter() - start

    try:
        for host_id, session in sessions:  # warm up: TLS handshakes on every connection
            await beat(host_id, session)

        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def closed_loop(host_id: str, session: aiohttp.ClientSession) -> None:
            while time.perf_counter() < deadline:
                latencies.append(await beat(host_id, session))

        start = time.perf_counter()
        await asyncio.gather(*(closed_loop(h, s) for h, s in sessions))
        elapsed = time.perf_counter() - start
        print(
            f"closed loop, {agents} agents, {elapsed:.1f} s: {len(latencies) / elapsed:.0f} heartbeats/s, "
            f"p50 {statistics.median(latencies) * 1e3:.1f} ms, p99 {percentile(latencies, 99) * 1e3:.1f} ms"
        )

        paced: list[float] = []
        interval = agents / rate  # each agent's own period at the target total rate
        deadline = time.perf_counter() + seconds

        async def open_loop(k: int, host_id: str, session: aiohttp.ClientSession) -> None:
            next_at = time.perf_counter() + k * interval / agents
            while next_at < deadline:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                paced.append(await beat(host_id, session))
                next_at += interval

        start = time.perf_counter()
        await asyncio.gather(*(open_loop(k, h, s) for k, (h, s) in enumerate(sessions)))
        elapsed = time.perf_counter() - start
        print(
            f"open loop at {rate:.0f}/s target, {agents} agents: achieved {len(paced) / elapsed:.0f} heartbeats/s, "
            f"p50 {statistics.median(paced) * 1e3:.1f} ms, p99 {percentile(paced, 99) * 1e3:.1f} ms"
        )
    finally:
        for _, session in sessions:
            await session.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="bench-server-")) / "data"
    init_local_server(data)
    server, address, _ = start_local_server(data)
    try:
        passphrase = (data / "passphrase").read_text().strip()
        asyncio.run(run(f"https://{address}", data / "ca" / "ca.pem", passphrase, args.agents, args.seconds, args.rate))
    finally:
        server.terminate()
        server.wait(timeout=15)
    rows = json.loads(
        subprocess.run(
            [sys.executable, "-m", "server", "machines", "--json", "--data", str(data)],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout
    )
    online = sum(1 for r in rows if r["state"] == "online")
    print(f"server's view after the run: {len(rows)} machines, {online} online")


if __name__ == "__main__":
    main()
