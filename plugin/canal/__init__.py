"""Canal: a Docker network and IPAM plugin with flannel-style VXLAN and Calico-style policy."""

__version__ = "0.1.0"
