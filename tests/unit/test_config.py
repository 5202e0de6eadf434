from __future__ import annotations

import pytest

from canal import config
from canal.errors import BadRequest


def test_defaults():
    cfg = config.load({}, {})
    assert cfg.socket == "/run/docker/plugins/canal.sock"
    assert cfg.network == "10.1.0.0/16" and cfg.subnet_len == 24
    assert cfg.datastore == "local" and cfg.scope == "local"


def test_flag_beats_environment_beats_default():
    env = {"CANAL_NETWORK": "100.64.0.0/16", "CANAL_LOG_LEVEL": "debug"}
    cfg = config.load({"network": "100.96.0.0/16"}, env)
    assert cfg.network == "100.96.0.0/16"
    assert cfg.log_level == "DEBUG"


@pytest.mark.parametrize(
    "flags, env, message",
    [
        ({"network": "10.1.0.1/16"}, {}, "invalid network '10.1.0.1/16' from flag --network"),
        ({}, {"CANAL_DATASTORE": "consul"}, "invalid datastore 'consul' from environment CANAL_DATASTORE"),
        ({}, {"CANAL_SUBNET_LEN": "40"}, "from 8 to 30"),
        ({}, {"CANAL_ETCD_ENDPOINTS": "etcd:2379"}, "not an http"),
        ({}, {"CANAL_PUBLIC_IP": "300.1.1.1"}, "invalid public_ip"),
    ],
)
def test_bad_values_name_setting_and_source(flags, env, message):
    with pytest.raises(BadRequest, match=message):
        config.load(flags, env)


def test_every_setting_is_documented():
    rows = config.describe()
    assert all(flag.startswith("--") and env.startswith("CANAL_") and text for flag, env, _, text in rows)
    assert len({env for _, env, _, _ in rows}) == len(rows)
