"""A multi-host Docker test bed on one machine, without touching the machine's network.

    ul = Underlay()                                   # bridge in netns cnlt<pid>-ul
    etcd = Etcd(ul)                                   # http://198.18.0.254:2379
    h1 = SimHost(ul, "h1", "198.18.0.1")              # netns cnlt<pid>-h1, private /run
    h1.start_dockerd(); h1.load_image(); h1.start_plugin(["--etcd", etcd.endpoint])
    h1.docker("run", "-d", "--name", "c1", IMAGE, "sleep", "1000")
    ...
    ul.close()                                        # closes hosts and etcd too

Everything is registered and closed at interpreter exit or on SIGTERM/SIGHUP as well;
``cleanup_leftovers()`` (or ``scripts/cleanup-testbed``) removes what a crashed run left.
"""

from ._util import CommandFailed, TestbedError, enter_netns, plugin_post, wait_until
from .host import PLUGIN_SOCKET, REPO, SimHost
from .image import IMAGE, busybox_rootfs_tar
from .registry import cleanup_leftovers, close_all, live_objects, new_run_id
from .underlay import ALLOWED_RANGE, Etcd, Underlay

__all__ = ["ALLOWED_RANGE", "CommandFailed", "Etcd", "IMAGE", "PLUGIN_SOCKET", "REPO", "SimHost",
           "TestbedError", "enter_netns", "Underlay", "busybox_rootfs_tar", "cleanup_leftovers", "close_all",
           "live_objects", "new_run_id", "plugin_post", "wait_until"]
