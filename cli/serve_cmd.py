"""``logd serve``: flags -> ServerConfig -> one call."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from logd_trio.server.app import run
from logd_trio.server.config import ConfigError, Notes, load_config
from logd_trio.server.logs import LOG_FORMATS, setup_logging

from . import errors

MODE_HELP = ("octal with a leading 0 (0640, 0o640) or a decimal integer as Go logd spells modes "
             "(420 = 0644); the log says which reading was used.")

def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on, HOST:PORT. Default: 127.0.0.1:1774.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Data directory. Default: ./logs.")] = None,
    batch_size: Annotated[str | None, typer.Option(
        help="Maximum request size in bytes (BATCH line + body). Default: 65536.")] = None,
    partition_size: Annotated[str | None, typer.Option(
        help="Partition file size before rotation, e.g. 256MiB. Default: 2000MiB.")] = None,
    partitions: Annotated[int | None, typer.Option(help="Partition files kept per topic. Default: 8.")] = None,
    fsync: Annotated[str | None, typer.Option(
        help="Durability: always (OK means fsynced; group commit), interval, never. Default: always.")] = None,
    flush_interval: Annotated[str | None, typer.Option(
        help="fsync period for --fsync interval, Go duration such as 1s or 200ms. Default: 1s.")] = None,
    flush_batches: Annotated[int | None, typer.Option(
        help="Also fsync after this many batches (0: off). Default: 0.")] = None,
    topics: Annotated[int | None, typer.Option(
        help="Maximum number of topics, 'default' included (Go logd's default: 8). Default: 1024.")] = None,
    topics_whitelist: Annotated[list[str] | None, typer.Option(
        help="Topics allowed (none given: any); repeat the flag or separate names with commas.")] = None,
    max_messages: Annotated[int | None, typer.Option(help="Maximum messages per READ/TAIL. Default: 50000.")] = None,
    timeout: Annotated[str | None, typer.Option(
        help="Time allowed to receive the rest of a request (plus 1s per 64KiB of it) or for each step of "
             "sending a reply. Default: 15s.")] = None,
    idle_timeout: Annotated[str | None, typer.Option(
        help="Close connections idle this long; 0 disables. Default: 30s.")] = None,
    shutdown_timeout: Annotated[str | None, typer.Option(
        help="Grace period for in-flight requests on SIGINT/SIGTERM. Default: 15s.")] = None,
    max_connections: Annotated[int | None, typer.Option(
        help="Connections beyond this get 'ERR too many connections' (lowered at start if the open-file "
             "limit cannot afford it). Default: 1024.")] = None,
    max_connections_per_ip: Annotated[int | None, typer.Option(
        help="Connections from one client address beyond this get 'ERR too many connections'; 0: no cap "
             "(behind a proxy every client has the proxy's address); loopback clients are exempt. "
             "Default: 256.")] = None,
    max_wait: Annotated[str | None, typer.Option(help="Cap on a long-poll READ's wait. Default: 30s.")] = None,
    pipeline_depth: Annotated[int | None, typer.Option(
        help="Requests in flight per connection before the server stops reading it. Default: 128.")] = None,
    file_mode: Annotated[str | None, typer.Option(
        help=f"Mode of new data files: {MODE_HELP} Default: 0600.")] = None,
    dir_mode: Annotated[str | None, typer.Option(help=f"Mode of new directories: {MODE_HELP} Default: 0700.")]
        = None,
    min_free_space: Annotated[str | None, typer.Option(
        help="Refuse writes ('ERR storage error: disk nearly full') when less is free, e.g. 1GiB; 0: off. "
             "Default: 16MiB.")] = None,
    max_waiters: Annotated[int | None, typer.Option(
        help="Long-poll READs waiting at once, server-wide; beyond it they answer at once. Default: 1024.")] = None,
    scrub_rate: Annotated[str | None, typer.Option(
        help="Bytes/s the background check of old partitions reads (CRC + framing); 0: off. Default: 32MiB.")]
        = None,
    retention_time: Annotated[str | None, typer.Option(
        help="Also drop a topic's partitions whose newest batch is older than this (e.g. 7d, 12h), by the "
             "rules of --partitions (never the head partition, never unacknowledged batches); 0: off. "
             "Default: off.")] = None,
    http_host: Annotated[str | None, typer.Option(
        help="HOST:PORT for /metrics (Prometheus), /healthz and /readyz; \"\": off. Default: off.")] = None,
    node_id: Annotated[str | None, typer.Option(
        help="This node's name in a replicated cluster (required with --replicate-from).")] = None,
    replicate_from: Annotated[str | None, typer.Option(
        help="HOST:PORT of the leader: run as a follower that copies every topic and refuses BATCH "
             "('ERR not leader HOST:PORT'). Default: off (a leader).")] = None,
    acks: Annotated[str | None, typer.Option(
        help="leader: OK once the batch is durable on the leader; all: once durable on --min-insync nodes "
             "(the leader included). Default: leader.")] = None,
    min_insync: Annotated[int | None, typer.Option(
        help="With --acks all: nodes an OK needs; fewer in sync: 'ERR not enough replicas'. Default: 1.")] = None,
    replica_lag: Annotated[str | None, typer.Option(
        help="A follower not caught up for this long leaves the in-sync set. Default: 10s.")] = None,
    fetch_max_bytes: Annotated[int | None, typer.Option(
        help="Frame bytes of one replication FETCH reply (a follower asks for, a leader serves at most this; "
             "at least one batch). Default: 1048576.")] = None,
    tls_cert: Annotated[str | None, typer.Option(
        metavar="FILE", help="Certificate chain (PEM): clients must connect with TLS. Default: off (plaintext).")]
        = None,
    tls_key: Annotated[str | None, typer.Option(
        metavar="FILE", help="Private key of --tls-cert (PEM; omit when it is in that file).")] = None,
    tls_client_ca: Annotated[str | None, typer.Option(
        metavar="FILE", help="CA (PEM) that client certificates must be signed by: mutual TLS, a certificate "
        "required.")] = None,
    auth_file: Annotated[str | None, typer.Option(
        metavar="FILE", help="TOML file of principals (token hash or certificate subject) and their rights per "
        "topic (docs/security.md). Default: off, every client may do everything.")] = None,
    replicate_ca: Annotated[str | None, typer.Option(
        metavar="FILE", help="With --replicate-from: CA (PEM) of the leader's certificate; the link uses TLS "
        "(presenting --tls-cert when set).")] = None,
    etcd: Annotated[str | None, typer.Option(
        help="etcd endpoints, comma-separated (http://HOST:PORT,...): automatic failover; needs --node-id and "
             "--cluster. Default: off.")] = None,
    cluster: Annotated[str | None, typer.Option(help="The cluster's name in etcd (with --etcd).")] = None,
    lease_ttl: Annotated[str | None, typer.Option(
        help="With --etcd: the node's session lease, whole seconds; a dead leader is replaced about this long "
             "after it stopped. Default: 2s.")] = None,
    advertise: Annotated[str | None, typer.Option(
        help="With --etcd: HOST:PORT clients and peers use to reach this node. Default: the bound address.")]
        = None,
    etcd_ca: Annotated[str | None, typer.Option(
        metavar="FILE", help="With https:// --etcd endpoints: CA (PEM) of etcd's certificates. Default: the "
        "system's trust store.")] = None,
    etcd_cert: Annotated[str | None, typer.Option(
        metavar="FILE", help="With https:// --etcd endpoints: client certificate (PEM) presented to etcd "
        "(etcd's --client-cert-auth).")] = None,
    etcd_key: Annotated[str | None, typer.Option(
        metavar="FILE", help="Private key of --etcd-cert (PEM; omit when it is in that file).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Processes serving the port: this one appends; N-1 more answer READ/TAIL from the files and relay "
             "the rest to it (not with TLS, --auth-file or replication). Default: 1.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML file of settings (keys as the flags, or under [serve]).")] = None,
    log_format: Annotated[str, typer.Option(
        help=f"Log lines as {' or '.join(LOG_FORMATS)} (one JSON object per line, for log shippers).")] = "text",
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging: per-connection events too.")]
        = False,
) -> None:
    """Run the server. Precedence: flags > LOGD_* environment > --config file > defaults."""
    flags: dict[str, Any] = {
        "host": host, "workdir": workdir, "batch_size": batch_size, "partition_size": partition_size,
        "partitions": partitions, "fsync": fsync, "flush_interval": flush_interval,
        "flush_batches": flush_batches, "topics": topics, "topics_whitelist": topics_whitelist or None,
        "max_messages": max_messages, "timeout": timeout, "idle_timeout": idle_timeout,
        "shutdown_timeout": shutdown_timeout, "max_connections": max_connections,
        "max_connections_per_ip": max_connections_per_ip, "max_wait": max_wait,
        "pipeline_depth": pipeline_depth, "file_mode": file_mode, "dir_mode": dir_mode,
        "min_free_space": min_free_space, "max_waiters": max_waiters, "scrub_rate": scrub_rate,
        "retention_time": retention_time,
        "http_host": http_host, "node_id": node_id, "replicate_from": replicate_from,
        "acks": acks, "min_insync": min_insync, "replica_lag": replica_lag,
        "fetch_max_bytes": fetch_max_bytes,
        "tls_cert": tls_cert, "tls_key": tls_key, "tls_client_ca": tls_client_ca, "auth_file": auth_file,
        "replicate_ca": replicate_ca,
        "etcd": etcd, "cluster": cluster, "lease_ttl": lease_ttl, "advertise": advertise,
        "etcd_ca": etcd_ca, "etcd_cert": etcd_cert, "etcd_key": etcd_key, "workers": workers,
    }
    if log_format not in LOG_FORMATS:
        errors.fail("serve", ValueError(f"--log-format: must be one of {', '.join(LOG_FORMATS)}, "
                                        f"got {log_format!r}"))
    notes: Notes = []
    try:
        cfg = load_config(flags=flags, file=config, notes=notes)
    except ConfigError as e:
        errors.fail("serve", e)
    setup_logging(log_format, verbose=verbose)
    for level, text in notes:
        logging.getLogger("logd_trio.server.config").log(level, "%s", text)

    def where(err: BaseException) -> str:
        if verbose:
            logging.getLogger("logd_trio").error("fatal error", exc_info=err)
        return f" (listening on {cfg.host})" if isinstance(err, OSError) and not err.filename else ""

    errors.run("serve", lambda: run(cfg), where=where)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
