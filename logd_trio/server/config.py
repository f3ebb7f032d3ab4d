"""Server configuration: one frozen dataclass, validated on construction.

Sources merge with precedence flags > environment (``LOGD_*``) > TOML file >
defaults; :func:`load_config` does the merge, the CLI only collects flags.
Every bad key or value raises :class:`ConfigError` naming it (an environment
variable by its own name); what is worth saying but not fatal (how a permission
mode was read, a ``LOGD_*`` variable no setting has, a TOML table no one reads)
goes to the ``notes`` list a caller passes, to be logged once logging is set up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from logd_trio.core import durations
from logd_trio.core.defaults import DEFAULT_ADDRESS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_MESSAGES
from logd_trio.core.durations import format_duration
from logd_trio.core.errors import LogdError

__all__ = ["FSYNC_MODES", "ConfigError", "Notes", "ServerConfig", "format_duration", "join_host_port",
           "load_config", "parse_duration", "parse_mode"]

FSYNC_MODES: Final = ("always", "interval", "never")
MIB: Final = 1024 * 1024

# (logging level, message) pairs that load_config has to say; logged by the caller.
Notes = list[tuple[int, str]]


class ConfigError(LogdError, ValueError):
    """A configuration key or value is invalid; the message names it."""


def parse_duration(value: str | float | int, *, key: str = "duration") -> float:
    """Seconds from a number or a Go-style duration (``15s``, ``1m30s``, ``200ms``): the one
    grammar of :mod:`logd_trio.core.durations`, raising :class:`ConfigError`."""
    try:
        return durations.parse_duration(value, key=key)
    except durations.DurationError as exc:
        raise ConfigError(str(exc)) from None


def join_host_port(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 address in brackets (``[::1]:1774``), as ``--host`` takes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1, got {value}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``logd serve`` can be told.  Field names are the TOML keys
    (with ``-`` for ``_``) and, upper-cased with ``LOGD_``, the environment."""

    host: str = DEFAULT_ADDRESS
    workdir: Path = Path("logs")
    batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_messages: int = DEFAULT_MAX_MESSAGES
    partition_size: int = 2000 * MIB
    partitions: int = 8
    fsync: str = "always"
    flush_interval: float = 1.0
    flush_batches: int = 0
    topics: int = 1024  # Go logd's default is 8
    topics_whitelist: tuple[str, ...] = ()
    timeout: float = 15.0
    idle_timeout: float = 30.0
    shutdown_timeout: float = 15.0
    max_connections: int = 1024
    max_connections_per_ip: int = 256
    max_wait: float = 30.0
    pipeline_depth: int = 128
    file_mode: int = 0o600
    dir_mode: int = 0o700
    min_free_space: int = 16 * MIB
    max_waiters: int = 1024
    scrub_rate: int = 32 * MIB
    retention_time: float = 0.0  # drop sealed partitions whose newest batch is older (seconds); 0: off
    http_host: str = ""  # HOST:PORT of /metrics, /healthz, /readyz; "" (the default): off
    node_id: str = ""  # this node's name in a replicated cluster (required with replicate_from)
    replicate_from: str = ""  # HOST:PORT of the leader: this node is a follower; "": a leader
    acks: str = "leader"  # leader: OK once durable on the leader; all: once durable on min_insync nodes
    min_insync: int = 1  # nodes (the leader included) an OK needs with acks=all
    replica_lag: float = 10.0  # a follower not caught up for this long leaves the in-sync set
    fetch_max_bytes: int = MIB  # frame bytes of one FETCH reply (at least one batch): asked and served
    tls_cert: str = ""  # PEM certificate chain: clients must speak TLS (server/tls.py); "": plaintext
    tls_key: str = ""  # its private key (PEM); "": in tls_cert
    tls_client_ca: str = ""  # CA of client certificates: mutual TLS, a certificate required
    auth_file: str = ""  # TOML principals and rights (server/auth.py); "": every client may do everything
    replicate_ca: str = ""  # CA of the leader's certificate: a follower's link uses TLS
    replicate_token: str = dataclasses.field(default="", repr=False)  # a follower's AUTH token: never in a repr
    etcd: str = ""  # comma-separated etcd endpoints: automatic failover (server/clustering.py); "": off
    cluster: str = ""  # the cluster's name in etcd (required with etcd)
    lease_ttl: float = 2.0  # the etcd session lease (whole seconds)
    etcd_ca: str = ""  # CA (PEM) of the etcd members' certificates (https:// endpoints); "": the system's
    etcd_cert: str = ""  # a client certificate (PEM) this node presents to etcd; "": none
    etcd_key: str = ""  # its private key (PEM); "": in etcd_cert
    advertise: str = ""  # HOST:PORT clients and peers use to reach this node ("": the bound address)
    workers: int = 1  # processes serving the port (server/workers/): 1, the owner alone

    def __post_init__(self) -> None:
        object.__setattr__(self, "workdir", Path(self.workdir))
        _ = self.address, self.http_address  # validates host and http_host
        for name in ("batch_size", "max_messages", "partition_size", "partitions", "topics",
                     "max_connections", "pipeline_depth", "workers"):
            _positive(name, getattr(self, name))
        if self.batch_size < 64:
            raise ConfigError(f"batch_size: must be at least 64 bytes, got {self.batch_size}")
        if self.fsync not in FSYNC_MODES:
            raise ConfigError(f"fsync: must be one of {', '.join(FSYNC_MODES)}, got {self.fsync!r}")
        for name in ("flush_batches", "min_free_space", "max_waiters", "scrub_rate", "max_connections_per_ip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        for name in ("flush_interval", "timeout", "idle_timeout", "shutdown_timeout", "max_wait", "retention_time"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        if self.fsync == "interval" and self.flush_interval <= 0:
            raise ConfigError("flush_interval: must be above 0 with fsync=interval")
        for mode_name in ("file_mode", "dir_mode"):
            mode = getattr(self, mode_name)
            if not 0 <= mode <= 0o777:
                raise ConfigError(f"{mode_name}: {mode!r} is not a permission mode")
        from logd_trio.core.framing import valid_topic

        for t in self.topics_whitelist:
            if not valid_topic(t.encode("ascii", "replace")):
                raise ConfigError(f"topics_whitelist: {t!r} is not a valid topic name")
        if self.node_id and not valid_topic(self.node_id.encode("ascii", "replace")):
            raise ConfigError(f"node_id: {self.node_id!r} is not a valid name (letters, digits, '-', '_', '.')")
        if self.acks not in ("leader", "all"):
            raise ConfigError(f"acks: must be leader or all, got {self.acks!r}")
        _positive("min_insync", self.min_insync)
        _positive("fetch_max_bytes", self.fetch_max_bytes)
        if self.replica_lag <= 0:
            raise ConfigError("replica_lag: must be above 0")
        if self.acks == "all" and self.fsync != "always":
            raise ConfigError(f"acks: all needs fsync=always (with fsync={self.fsync} a batch is acknowledged "
                              "before it is durable)")
        if self.tls_key and not self.tls_cert:
            raise ConfigError("tls_key: needs tls_cert (the certificate the key belongs to)")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca: needs tls_cert and tls_key (mutual TLS is TLS first)")
        if self.replicate_from:
            _ = self.leader_address
            if self.fsync != "always":
                raise ConfigError(f"replicate_from: needs fsync=always (a follower's fetch offset is its "
                                  f"acknowledgement, and with fsync={self.fsync} it runs ahead of its disk)")
            if not self.node_id:
                raise ConfigError("replicate_from: needs node_id (each follower names itself to the leader)")
            if self.replicate_from == self.host:
                raise ConfigError(f"replicate_from: {self.replicate_from} is this server's own address")
        if self.workers > 1:
            _check_workers(self)
        if self.etcd or self.cluster:
            _check_cluster(self)
        elif self.etcd_ca or self.etcd_cert or self.etcd_key:
            raise ConfigError("etcd_ca, etcd_cert and etcd_key: only with etcd (--etcd URL[,URL...])")

    @property
    def leader_address(self) -> tuple[str, int] | None:
        """The leader a follower copies (``replicate_from``); None on a leader."""
        if not self.replicate_from:
            return None
        host, sep, port = self.replicate_from.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
            raise ConfigError(f"replicate_from: expected HOST:PORT of the leader, got {self.replicate_from!r}")
        return host.strip("[]"), int(port)

    @property
    def address(self) -> tuple[str, int]:
        host, sep, port = self.host.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"host: expected HOST:PORT, got {self.host!r}")
        host = host.strip("[]") or "127.0.0.1"
        return host, int(port)

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where the monitoring endpoints listen; None when ``http_host`` is empty (off)."""
        if not self.http_host:
            return None
        host, sep, port = self.http_host.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535 or any(c.isspace() for c in host):
            raise ConfigError(f"http_host: expected HOST:PORT such as 127.0.0.1:9100 (or \"\" for off), "
                              f"got {self.http_host!r}")
        return host.strip("[]") or "127.0.0.1", int(port)


def _check_workers(c: ServerConfig) -> None:
    for name, why in (("tls_cert", "TLS"), ("auth_file", "an auth file"), ("replicate_from", "replication"),
                      ("etcd", "a cluster")):
        if getattr(c, name):
            raise ConfigError(f"workers: {c.workers} with {name}: {why} is served by one process in this "
                              "version (use workers = 1)")
    if c.acks != "leader":
        raise ConfigError("workers: more than 1 needs acks=leader in this version")
    if (machine := platform.machine()) not in ("x86_64", "AMD64"):  # the head table's seqlock (workers/heads.py)
        raise ConfigError(f"workers: more than 1 needs an x86-64 machine in this version (this one is {machine})")


def _check_cluster(c: ServerConfig) -> None:
    if not c.etcd or not c.cluster:
        raise ConfigError("etcd and cluster: each needs the other (--etcd URL[,URL...] --cluster NAME)")
    if c.replicate_from:
        raise ConfigError("replicate_from: not with etcd (the cluster elects the leader)")
    if not c.node_id:
        raise ConfigError("etcd: needs node_id (each node names itself in the cluster)")
    if c.fsync != "always":
        raise ConfigError(f"etcd: needs fsync=always (any node may become a follower), got fsync={c.fsync}")
    for url in c.etcd.split(","):
        if not re.fullmatch(r"https?://[^\s/,]+/?", url.strip()):
            raise ConfigError(f"etcd: expected http://HOST:PORT endpoints separated by commas, got {url!r}")
        if (c.etcd_ca or c.etcd_cert) and not url.strip().startswith("https://"):
            raise ConfigError(f"etcd: {'etcd_ca' if c.etcd_ca else 'etcd_cert'} needs https:// endpoints, "
                              f"got {url.strip()!r}")
    if c.etcd_key and not c.etcd_cert:
        raise ConfigError("etcd_key: needs etcd_cert (the certificate the key belongs to)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", c.cluster):
        raise ConfigError(f"cluster: {c.cluster!r} is not a valid name (1-64 letters, digits, '.', '_', '-')")
    if c.lease_ttl < 1 or c.lease_ttl != int(c.lease_ttl):
        raise ConfigError(f"lease_ttl: must be whole seconds, at least 1s, got {c.lease_ttl:g}s")
    if c.advertise:
        host, sep, port = c.advertise.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
            raise ConfigError(f"advertise: expected HOST:PORT, got {c.advertise!r}")


_FIELDS: Final = {f.name: f for f in dataclasses.fields(ServerConfig) }
_DURATIONS: Final = {"flush_interval", "timeout", "idle_timeout", "shutdown_timeout", "max_wait", "replica_lag",
                    "lease_ttl", "retention_time"}
_INTS: Final = {"batch_size", "max_messages", "partition_size", "partitions", "flush_batches", "topics",
                "max_connections", "max_connections_per_ip", "pipeline_depth", "min_free_space", "max_waiters",
                "scrub_rate", "min_insync", "fetch_max_bytes", "workers"}
_MODES: Final = {"file_mode", "dir_mode"}
# LOGD_* variables the project's test suite reads (never the server): not reported.
_OTHER_ENV: Final = ("LOGD_SHARED_DIR", "LOGD_PG_BIN", "LOGD_TEST_")
_SECURITY: Final = ("tls_cert", "tls_key", "tls_client_ca", "auth_file", "replicate_ca", "replicate_token",
                     "etcd_ca", "etcd_cert", "etcd_key")


def parse_mode(value: object, *, key: str = "mode") -> tuple[int, str]:
    """A permission mode and how it was read, by Go's rules for integer flags: ``0644`` and
    ``0o644`` are octal, ``420`` (how Go logd prints 0644) is decimal; a TOML integer is
    taken as the number it is.  A decimal reading above 0o777 is an error that shows the
    octal spelling, so ``644`` never becomes mode 01204 silently."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a permission mode such as 0644, got {value!r}")
    if isinstance(value, int):
        mode, text, reading = value, str(value), "an integer"
    else:
        text = str(value).strip()
        digits, base, reading = text, 10, "a decimal integer (Go's spelling)"
        if text[:2].lower() == "0o":
            digits, base, reading = text[2:], 8, "octal"
        elif len(text) > 1 and text.startswith("0"):
            digits, base, reading = text[1:], 8, "octal"
        if not (digits.isascii() and digits.isdigit()):
            raise ConfigError(f"{key}: expected a permission mode such as 0644 (octal) or 420 (decimal, as Go "
                              f"logd prints 0644), got {value!r}")
        try:
            mode = int(digits, base)
        except ValueError:
            raise ConfigError(f"{key}: {text!r} is not an octal number") from None
    if not 0 <= mode <= 0o777:
        hint = "" if reading == "octal" else f"; an octal mode needs a leading 0, such as 0{text}"
        raise ConfigError(f"{key}: {text} read as {reading} is {mode:#o}, not a permission mode (at most "
                          f"0777){hint}")
    return mode, reading


def _coerce(key: str, value: Any, where: str, notes: Notes) -> Any:
    if key in _DURATIONS:
        return parse_duration(value, key=where)
    if key in _INTS:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        text = str(value).strip().replace("_", "")
        units = {"k": 1024, "kb": 1024, "kib": 1024, "m": MIB, "mb": MIB, "mib": MIB, "g": 1024 * MIB,
                 "gb": 1024 * MIB, "gib": 1024 * MIB}
        m = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text)
        if not m or (m.group(2) and m.group(2).lower() not in units):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(m.group(1)) * (units[m.group(2).lower()] if m.group(2) else 1)
    if key in _MODES:
        mode, reading = parse_mode(value, key=where)
        notes.append((logging.INFO, f"{where}: {value!r} read as {reading}: mode {mode:04o}"))
        return mode
    if key == "topics_whitelist":  # a list (a flag given more times, as Go's stringArray), or "a,b"
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(t, str) for t in items):
            raise ConfigError(f"{where}: expected a list of topic names, got {value!r}")
        names = (t.strip() for item in items for t in item.split(","))
        return tuple(dict.fromkeys(t for t in names if t))
    if key == "workdir":
        return Path(str(value))
    if key in ("host", "fsync", "http_host", "node_id", "replicate_from", "acks", "etcd", "cluster",
               "advertise", *_SECURITY):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"unknown key {where}")  # pragma: no cover


def _normalise(raw: Mapping[str, Any], source: str, notes: Notes, *, env: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.replace("-", "_").lower()
        if key not in _FIELDS:
            known = ", ".join(sorted(n.replace("_", "-") for n in _FIELDS))
            raise ConfigError(f"unknown key {k!r} in {source} (known: {known})")
        out[key] = _coerce(key, v, f"LOGD_{k} (environment)" if env else f"{key} ({source})", notes)
    return out


def read_toml(path: str | Path, where: str) -> dict[str, Any]:
    """A TOML file's contents; :class:`ConfigError` starting with ``where`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _file_section(file: Path, notes: Notes) -> Mapping[str, Any]:
    """The settings of a TOML file: its ``[serve]`` table if it has one (anything else at the
    top level is then an error or, for another table, a note), else its top level."""
    data = read_toml(file, f"config file {file}")
    if "serve" not in data:
        return data
    section = data["serve"]
    if not isinstance(section, dict):
        raise ConfigError(f"config file {file}: [serve] must be a table")
    for key, value in data.items():
        if key == "serve":
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config file {file}: key {key!r} is outside [serve], so it would be ignored; "
                              "put it under [serve] (keys after a [table] header belong to that table)")
        notes.append((logging.WARNING, f"config file {file}: table [{key}] is not read by logd serve "
                                       "(only [serve] is)"))
    return section


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
    notes: Notes | None = None,
) -> ServerConfig:
    """Merge defaults < TOML ``file`` < ``LOGD_*`` env < ``flags`` (``None`` values are unset).

    What is worth logging (see the module docstring) is appended to ``notes``."""
    said: Notes = [] if notes is None else notes
    merged: dict[str, Any] = {}
    if file is not None:
        merged.update(_normalise(_file_section(file, said), f"config file {file}", said))
    environ = os.environ if env is None else env
    env_values: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith("LOGD_"):
            continue
        if name[5:].lower() in _FIELDS:
            env_values[name[5:]] = value
        elif not name.startswith(_OTHER_ENV):
            said.append((logging.WARNING, f"environment variable {name} is not a logd serve setting (ignored); "
                                          f"settings are LOGD_<FLAG>, such as LOGD_TOPICS"))
    merged.update(_normalise(env_values, "environment", said, env=True))
    if flags:
        merged.update(_normalise({k: v for k, v in flags.items() if v is not None}, "flags", said))
    try:
        return ServerConfig(**merged)
    except TypeError as e:  # pragma: no cover - guarded by _normalise
        raise ConfigError(str(e)) from None
