"""``logd cluster``: each node's view of its cluster (the CLUSTER extension)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from logd_trio.client.failover import ask_cluster, parse_hosts
from logd_trio.core.defaults import DEFAULT_ADDRESS
from logd_trio.core.errors import ConnectionLost, Unsupported

from .errors import run
from .options import HostOpt, Security, TLSCAOpt, TLSCertOpt, TLSKeyOpt, TLSOpt, TokenOpt, VerboseOpt, cluster_security


def _text(addr: str, v: dict[str, Any]) -> str:
    leader = v.get("leader") or {}
    etcd = v.get("etcd") or {}
    lines = [f"{addr}: node {v.get('node')}, {v.get('role')}, epoch {v.get('epoch')}",
             f"  leader: {leader.get('node', '-')} {leader.get('addr', '')} (epoch {leader.get('epoch', '-')})"]
    if etcd:
        health = "ok" if etcd.get("ok") else f"UNAVAILABLE ({etcd.get('error')})"
        lines.append(f"  etcd: {health}")
    if v.get("refusal"):
        lines.append(f"  not acknowledging: {v['refusal']}")
    if v.get("halted"):
        lines.append(f"  replication halted: {v['halted']}")
    if "in_sync" in v:
        lines.append(f"  in sync: {', '.join(v['in_sync']) or '-'}")
    members = v.get("members") or {}
    if members:
        lines.append("  members: " + ", ".join(f"{n} {a}" for n, a in sorted(members.items())))
    for node, topics in sorted((v.get("followers") or {}).items()):
        lags = ", ".join(f"{t} lag {p['lag_bytes']} B" for t, p in sorted(topics.items()))
        lines.append(f"  follower {node}: {lags}")
    for name, t in sorted((v.get("topics") or {}).items()):
        lines.append(f"  topic {name}: first {t['first']}, head {t['head']}, high watermark {t['hw']}")
    return "\n".join(lines)


def cluster(
    host: HostOpt = DEFAULT_ADDRESS,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: address -> the node's view.")] = False,
    verbose: VerboseOpt = False,
    tls: TLSOpt = False,
    tls_ca: TLSCAOpt = None,
    tls_cert: TLSCertOpt = None,
    tls_key: TLSKeyOpt = None,
    token: TokenOpt = None,
) -> None:
    """Show each node's view of its cluster: role, leader, epoch, in-sync set, lags, etcd health."""
    secure = cluster_security(Security(tls, tls_ca, tls_cert, tls_key, token))

    async def main() -> None:
        views: dict[str, Any] = {}
        for addr in parse_hosts(host):
            try:
                view = await ask_cluster(addr, 5.0, secure)
            except (OSError, ConnectionLost, TimeoutError) as exc:
                views[addr] = {"error": str(exc) or type(exc).__name__}
                continue
            if view is None:
                raise Unsupported(f"{addr} does not answer CLUSTER (not a logd-trio node?)")
            views[addr] = view
        if as_json:
            typer.echo(json.dumps(views, indent=2, sort_keys=True))
            return
        for addr, v in views.items():
            typer.echo(f"{addr}: unreachable: {v['error']}" if "error" in v else _text(addr, v))
        if all("error" in v for v in views.values()):
            raise ConnectionLost("no node answered")

    run("cluster", main, verbose=verbose)


def register(app: typer.Typer) -> None:
    app.command(name="cluster")(cluster)
