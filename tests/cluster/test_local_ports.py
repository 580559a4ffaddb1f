"""The ports a local test cluster gives its Ray processes are distinct: one CI run failed when a head's GCS port and
its object manager's port came out the same (each picked by binding port 0 and closing, one at a time)."""

from __future__ import annotations

from hrsa.cluster.local_cluster import NODE_PORT_FLAGS, free_ports, node_port_args


def test_free_ports_are_distinct_even_when_many_are_asked_for() -> None:
    # 300 one-at-a-time picks out of ~28k ephemeral ports repeat one with probability ~0.8 (birthday bound).
    ports = free_ports(300)
    assert len(ports) == 300 and len(set(ports)) == 300


def test_each_node_flag_gets_its_own_port_from_the_pool() -> None:
    pool = iter(free_ports(2 * len(NODE_PORT_FLAGS)))
    head, second = node_port_args(pool), node_port_args(pool)
    values = [arg.split("=")[1] for arg in head + second]
    assert len(set(values)) == 2 * len(NODE_PORT_FLAGS)
    assert [arg.split("=")[0] for arg in head] == list(NODE_PORT_FLAGS)
