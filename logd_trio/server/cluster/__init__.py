"""Coordination of a logd cluster through etcd (see docs/replication.md).

- etcd.py: the etcd v3 client (JSON gateway, httpx under Trio): kv, txn, leases, watch;
  etcd_wire.py its encoding and typed errors, transport.py the endpoint failover,
  watch.py the bounded streaming watch.
- fencing.py: pure decisions: the lease deadline counted from keepalive send times,
  and whether a leader may still acknowledge.
- session.py: a node's lease, kept alive by one task.
- election.py: key layout, membership, the takeover txn with its epoch, leadership.
- node.py: a node's cluster task: session, registration, following, campaigning;
  its view (role, leader, epoch, etcd health) and whether it may acknowledge.
"""
