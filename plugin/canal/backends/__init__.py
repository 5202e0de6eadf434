"""flannel's Manager/Backend split for Canal's multi-host dataplane.

`manager` owns the host's subnet lease, flannel-mode detection and subnet.env (flannel's
subnet.Manager); one module per backend (`vxlan`, `hostgw`) turns the cluster's leases into a
desired state with a pure function, tested without root; `apply` converges the kernel on it.
The backend is flannel's: `/coreos.com/network/config` "Backend", parsed by `parse_backend`.
"""

from canal.backends.base import BACKENDS, BackendConfig, Desired, parse_backend

__all__ = ["BACKENDS", "BackendConfig", "Desired", "parse_backend"]
