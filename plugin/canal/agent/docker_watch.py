"""Learns what Docker never tells a driver: network names and container labels.

Never from inside a handler (ContainerInspect there deadlocks on the container lock, see
libnetwork-plugin#49): this thread reads Docker's API on its own, triggered by Docker events,
by the plugin's handlers (poke) and by a timer, and writes what it learns into the
endpoint and network records, where every host's policy compiler sees it. Until then an
endpoint's labels are unknown (None) and the compiler fails closed for it.

It uses the container *list* (which carries labels and each network's EndpointID and does
not take per-container locks), never ContainerInspect.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from canal.datastore.base import Datastore
from canal.datastore.keys import Keys
from canal.errors import CanalError
from canal.records import (
    AddressRecord,
    EndpointRecord,
    NetworkRecord,
    RecordError,
    address_entry,
    container_id,
    container_name,
    endpoint_entry,
    network_entry,
    network_name,
    pool_entry,
    replace,
    safe,
)
from canal.records import (
    labels as parse_labels,
)

if TYPE_CHECKING:
    from canal.agent.mirror import RecordView

log = logging.getLogger(__name__)


class DockerWatch:
    def __init__(
        self,
        store: Datastore,
        keys: Keys,
        host: str,
        docker_host: str,
        interval: float = 30.0,
        client_factory: Callable[[], Any] | None = None,
        records: Callable[[str, Callable[[str, Any], Any]], dict[str, Any]] | None = None,
        collect_endpoint: Callable[[str, str], None] | None = None,
        collect_address: Callable[[str, str], None] | None = None,
        grace: float = 60.0,
        on_reconnect: Callable[[], object] = lambda: None,
        endpoints: "RecordView[EndpointRecord] | None" = None,
        addresses: "RecordView[AddressRecord] | None" = None,
    ):
        self.store = store
        # Garbage collection of what Docker forgot (a DeleteEndpoint or ReleaseAddress lost
        # while the plugin was down): endpoint records and unbound addresses of this host that
        # Docker no longer knows about, older than `grace` seconds, are removed.
        self.collect_endpoint = collect_endpoint
        self.collect_address = collect_address
        self.grace = grace
        # Called whenever Docker's event stream (re)connects: dockerd (re)started and may have
        # rewritten its chains ahead of ours, so the next pass reads the kernel back.
        self.on_reconnect = on_reconnect
        self._last_gc = 0.0
        self._unusable: set[str] = set()  # endpoints whose container record was refused (logged once)
        # The agent's mirror (memory, typed, malformed records quarantined), or the datastore.
        self.records = records or self._list_records
        # This host's endpoint records as a view of the mirror kept from its journal
        # (Mirror.view with keep): a resolve costs what changed and what is local, not the
        # cluster; it runs every 20 ms while a new container's labels are unknown.
        self._view = endpoints
        self._addresses = addresses
        self.keys = keys
        self.host = host
        self.docker_host = docker_host
        self.interval = interval
        self._client_factory = client_factory or self._default_client
        self._client: Any = None
        self._cond = threading.Condition()
        self._poked = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.last_error = ""

    def _default_client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.docker_host, timeout=10)

    def start(self) -> None:
        for target, name in ((self._run, "canal-docker"), (self._events, "canal-docker-events")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def poke(self) -> None:
        """Something changed (a handler ran, an event came): resolve soon."""
        with self._cond:
            self._poked = True
            self._cond.notify_all()

    # Resolution -----------------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _list_records(self, prefix: str, parse: Callable[[str, Any], Any]) -> dict[str, Any]:
        out = {}
        for key, raw in self.store.list_json(prefix).items():
            try:
                out[key] = parse(key, raw)
            except RecordError:
                continue
        return out

    def _local_endpoints(self) -> dict[str, EndpointRecord]:
        """Endpoint id -> record, this host's only (a copy: the caller writes records)."""
        if self._view is None:
            return {k: r for k, r in self.records(self.keys.endpoints, endpoint_entry).items() if r.host == self.host}
        self._view.refresh()
        return dict(self._view.items())

    def _local_addresses(self) -> list[AddressRecord]:
        """This host's address records (the cluster's are not held: at 20,000 they were 13 MB)."""
        if self._addresses is None:
            return [r for r in self.records(self.keys.addresses, address_entry).values() if r.host == self.host]
        self._addresses.refresh()
        return list(self._addresses.values())

    def _update_endpoint(self, endpoint_id: str, change: Callable[[EndpointRecord], EndpointRecord]) -> None:
        def apply(raw: Any) -> Any:
            if raw is None:
                return None  # removed meanwhile: nothing to record
            try:
                return change(EndpointRecord.parse(raw, endpoint_id)).to_json()
            except RecordError:
                return raw  # malformed: quarantined by the agent, not ours to rewrite
        self.store.update(self.keys.endpoint(endpoint_id), apply)

    def resolve(self) -> int:
        """One pass; returns how many local endpoints still have unknown labels."""
        api = self.client().api
        docker_networks = api.networks()
        names: dict[str, str] = {}
        for network in docker_networks:
            try:
                names[network["Id"]] = network_name(network.get("Name"))
            except (RecordError, KeyError, TypeError):
                continue  # not a name we could put in a selector: the network stays unnamed
        by_endpoint: dict[str, dict[str, Any]] = {}
        for container in api.containers(all=True):
            networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
            for settings in networks.values():
                endpoint_id = (settings or {}).get("EndpointID")
                if endpoint_id:
                    by_endpoint[endpoint_id] = container
        networks_here = self.records(self.keys.networks, network_entry)
        for record in networks_here.values():
            if record.host != self.host or record.id not in names or record.explicit_name:
                continue
            name = names[record.id]
            if record.name != name:
                def rename(raw: Any, n: str = name) -> Any:
                    try:
                        return raw and replace(NetworkRecord.parse(raw), name=n).to_json()
                    except RecordError:
                        return raw
                self.store.update(self.keys.network(self.host, record.id), rename)
                log.info("network %s is named %s", record.id[:12], name)
        unknown = 0
        for endpoint_id, record in self._local_endpoints().items():
            container = by_endpoint.get(endpoint_id)
            if container is None:
                unknown += record.labels is None
                continue
            try:
                labels = parse_labels(container.get("Labels") or {}, "container labels")
                cid = container_id(container.get("Id"))
            except RecordError as err:
                # Unknown labels keep the endpoint closed; say why, once per endpoint.
                if endpoint_id not in self._unusable:
                    self._unusable.add(endpoint_id)
                    log.warning("endpoint %s: Docker's container record is unusable, labels stay unknown: %s",
                                endpoint_id[:12], err)
                unknown += record.labels is None
                continue
            try:
                cname = container_name((container.get("Names") or [""])[0])
            except RecordError:
                cname = ""  # only shown by `canal endpoint list`
            if record.labels != labels or record.container != cid:
                def learned(r: EndpointRecord, l: dict[str, str] = labels, c: str = cid, n: str = cname) -> EndpointRecord:
                    return replace(r, labels=l, container=c, container_name=n)

                self._update_endpoint(endpoint_id, learned)
                log.info("endpoint %s belongs to container %s, labels %s", endpoint_id[:12], cname, safe(labels, 300))
        if time.monotonic() - self._last_gc > self.interval:
            self._last_gc = time.monotonic()
            self.collect(set(by_endpoint), docker_networks)
        return unknown

    @staticmethod
    def _shared_pool(pool_id: str, pools: dict[str, Any]) -> bool:
        """Swarm pools: the manager allocates task addresses that stay unbound until a node
        runs the task; they are the manager's to release."""
        cidr = pool_id.split(":")[1] if pool_id.startswith("canal-pool:") else ""
        if not cidr:
            return False
        record = pools.get(cidr.replace("/", "-"))
        return record is not None and record.shared

    def _libnetwork_endpoints(self, docker_networks: list[dict[str, Any]]) -> set[str]:
        """Endpoints libnetwork holds on this host's canal networks. A container being started
        has its endpoint created and joined well before its own record (the container list)
        names it: seconds on a loaded host, longer while Docker retries a restarting plugin.
        libnetwork lists it from CreateEndpoint on ("ep-<id>" until it has a sandbox)."""
        ours = {r.id for r in self.records(self.keys.networks, network_entry).values() if r.host == self.host}
        known: set[str] = set()
        for network in docker_networks:
            if network.get("Id") not in ours:
                continue
            try:
                details = self.client().api.inspect_network(network["Id"])
            except Exception as err:  # noqa: BLE001 - only "gone meanwhile" is expected
                if getattr(err, "status_code", None) == 404:
                    continue  # removed since the list: its endpoints are gone with it
                raise
            for attached in ((details or {}).get("Containers") or {}).values():
                endpoint_id = (attached or {}).get("EndpointID")
                if isinstance(endpoint_id, str):
                    known.add(endpoint_id)
        return known

    def collect(self, known_endpoints: set[str], docker_networks: list[dict[str, Any]]) -> None:
        now = time.time()
        if self.collect_endpoint is not None:
            forgotten = [record for record in self._local_endpoints().values()
                         if record.id not in known_endpoints
                         and now - record.created > self.grace]
            if forgotten:  # libnetwork asked only when something looks forgotten
                known_endpoints = known_endpoints | self._libnetwork_endpoints(docker_networks)
            for record in forgotten:
                if record.id not in known_endpoints:
                    log.warning("endpoint %s (%s): Docker no longer knows it; removing it",
                                record.id[:12], record.ip)
                    self.collect_endpoint(record.network, record.id)
        if self.collect_address is None:
            return
        reserved = {  # --aux-address: allocated, never bound, yet in use
            str(ip).split("/")[0]
            for network in docker_networks
            for config in ((network.get("IPAM") or {}).get("Config") or [])
            for ip in ((config or {}).get("AuxiliaryAddresses") or {}).values()
        }
        pools = self.records(self.keys.pools, pool_entry)
        for address in self._local_addresses():
            if address.kind != "endpoint" or address.endpoint:
                continue
            local_pool = address.pool != "canal-cluster" and not self._shared_pool(address.pool, pools)
            if local_pool and str(address.ip) not in reserved:
                if now - address.time > self.grace:
                    log.warning("address %s: allocated but never used by Docker; releasing it", address.ip)
                    self.collect_address(address.pool, str(address.ip))

    def _run(self) -> None:
        unknown = 0
        while True:
            with self._cond:
                if not self._poked and not self._stopping:
                    # An endpoint with unknown labels is closed: poll quickly until they are
                    # known (its container shows in Docker's list only once started), keep
                    # asking every half second while Docker's API fails, slowly otherwise.
                    self._cond.wait(0.5 if self.last_error else 0.02 if unknown else self.interval)
                if self._stopping:
                    return
                self._poked = False
            try:
                unknown = self.resolve()
                if self.last_error:
                    log.info("Docker's API at %s answers again", self.docker_host)
                self.last_error = ""
            except CanalError as err:  # the datastore is down: try again soon
                if not self.last_error:
                    log.warning("cannot record what Docker says: %s", err)
                self.last_error = str(err)
            except Exception as err:  # Docker down or restarting: try again soon
                self._client = None
                if not self.last_error:
                    log.warning("cannot read Docker's API at %s: %s; endpoints whose labels are "
                                "unknown stay closed until it answers", self.docker_host, err)
                self.last_error = str(err)

    def _events(self) -> None:
        while not self._stopping:
            try:
                client = self._client_factory()
                stream = client.events(
                    decode=True,
                    filters={"type": ["container", "network"], "event": ["start", "create", "connect", "disconnect", "update"]},
                )
                self.on_reconnect()
                self.poke()  # what happened while the stream was down
                for _event in stream:
                    self.poke()
                    if self._stopping:
                        return
            except Exception as err:
                log.debug("docker event stream ended: %s", err)
            time.sleep(1)
