"""The CLI's admin client against the real app on a unix socket: each refusal arrives as the
error kind the plugin raised, with its message, so `canal policy apply` prints it as is."""

from __future__ import annotations

import threading

import pytest
from werkzeug.serving import make_server

from canal.cli.client import AdminClient
from canal.errors import BadRequest, NotFound

POLICY = "apiVersion: canal/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: web}\nspec:\n  ingress:\n  - action: Allow\n"


@pytest.fixture
def admin(plugin, tmp_path):
    path = str(tmp_path / "canal.sock")
    server = make_server("unix://" + path, 0, plugin.app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield AdminClient(path, timeout=10)
    finally:
        server.shutdown()
        thread.join()


def test_refusals_keep_their_kind_and_message(admin):
    with pytest.raises(BadRequest, match="anchor &a is not allowed"):
        admin.post("/canal/v1/policies", {"documents": "a: &a [1]\nb: *a\n"})
    with pytest.raises(BadRequest, match="larger than 1048576 bytes"):
        admin.post("/canal/v1/policies", {"documents": "#" * (2 << 20)})
    with pytest.raises(NotFound, match="no policy 'nope'"):
        admin.get("/canal/v1/policies/nope")


def test_positive_control_a_valid_apply_goes_through(admin):
    assert admin.post("/canal/v1/policies", {"documents": POLICY})["results"][0]["result"] == "created"
    assert admin.get("/canal/v1/policies/web")["metadata"] == {"name": "web"}
