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


# ------------------------------------------------------------------------------ etcd security


@pytest.fixture
def files(tmp_path):
    """Readable stand-ins for the certificate files and a password file."""
    paths = {}
    for name in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_text("x\n")
        paths[name] = str(tmp_path / name)
    (tmp_path / "password").write_text("pw-from-file\n")
    paths["password"] = str(tmp_path / "password")
    return paths


def test_etcd_security_settings_default_to_none():
    cfg = config.load({}, {})
    assert (cfg.etcd_cafile, cfg.etcd_certfile, cfg.etcd_keyfile, cfg.etcd_username) == ("", "", "", "")
    assert not cfg.etcd_password and cfg.etcd_password_file == ""
    assert cfg.etcd_endpoints.startswith("http://")  # plain http, as before


def test_etcd_settings_come_from_flags_and_environment(files):
    env = {"CANAL_ETCD_ENDPOINTS": "https://etcd:2379", "CANAL_ETCD_CAFILE": files["ca.crt"],
           "CANAL_ETCD_CERTFILE": files["client.crt"], "CANAL_ETCD_KEYFILE": files["client.key"],
           "CANAL_ETCD_USERNAME": "canal", "CANAL_ETCD_PASSWORD_FILE": files["password"]}
    cfg = config.load({}, env)
    assert (cfg.etcd_cafile, cfg.etcd_certfile, cfg.etcd_keyfile) == (files["ca.crt"], files["client.crt"], files["client.key"])
    assert cfg.etcd_username == "canal" and cfg.etcd_password_value() == "pw-from-file"  # no newline
    cfg = config.load({"etcd_username": "u", "etcd_password": "pw"}, {})
    assert cfg.etcd_password_value() == "pw"


@pytest.mark.parametrize("given", ["etcd_certfile", "etcd_keyfile"])
def test_certfile_and_keyfile_go_together(files, given):
    path = files["client.crt"] if given == "etcd_certfile" else files["client.key"]
    with pytest.raises(BadRequest) as err:
        config.load({given: path, "etcd_endpoints": "https://etcd:2379"}, {})
    assert "--etcd-certfile" in str(err.value) and "--etcd-keyfile" in str(err.value)


@pytest.mark.parametrize("setting", ["etcd_cafile", "etcd_certfile", "etcd_keyfile", "etcd_password_file"])
def test_missing_file_names_the_setting_and_the_path(files, tmp_path, setting):
    flags = {"etcd_endpoints": "https://etcd:2379", "etcd_certfile": files["client.crt"],
             "etcd_keyfile": files["client.key"]}
    if setting == "etcd_password_file":
        flags["etcd_username"] = "canal"
    missing = str(tmp_path / "nope" / "file.pem")
    flags[setting] = missing
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(BadRequest, match=f"{flag} .*{missing}: no such file"):
        config.load(flags, {})
    flags[setting] = str(tmp_path)  # a directory
    with pytest.raises(BadRequest, match=f"{flag} .*not a regular file"):
        config.load(flags, {})


def test_password_and_password_file_exclude_each_other(files):
    with pytest.raises(BadRequest, match="--etcd-password.* and --etcd-password-file.* exclude each other"):
        config.load({"etcd_username": "u", "etcd_password": "pw", "etcd_password_file": files["password"]}, {})


def test_username_needs_a_password_and_a_password_a_username(files):
    with pytest.raises(BadRequest, match="--etcd-username.* needs a password"):
        config.load({"etcd_username": "u"}, {})
    with pytest.raises(BadRequest, match="--etcd-password-file.* needs --etcd-username"):
        config.load({"etcd_password_file": files["password"]}, {})


def test_empty_password_file_is_refused(files, tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BadRequest, match=f"--etcd-password-file: {tmp_path / 'empty'} is empty"):
        config.load({"etcd_username": "u", "etcd_password_file": str(tmp_path / "empty")}, {})


def test_tls_settings_with_plain_http_endpoints_are_refused(files):
    """flanneld silently ignores a lone CA; here TLS settings never fall back to http."""
    with pytest.raises(BadRequest, match="--etcd-cafile .* plain http"):
        config.load({"etcd_cafile": files["ca.crt"]}, {"CANAL_ETCD_ENDPOINTS": "http://etcd:2379"})


def test_password_never_in_repr_errors_or_help(files):
    secret = "hunter2-do-not-show"
    cfg = config.load({}, {"CANAL_ETCD_USERNAME": "u", "CANAL_ETCD_PASSWORD": secret})
    assert cfg.etcd_password_value() == secret  # positive control: it is in there
    assert secret not in repr(cfg) and secret not in str(cfg)
    assert secret not in repr(cfg.etcd_password) and secret not in f"{cfg.etcd_password}"
    with pytest.raises(BadRequest) as err:  # a refused combination, password given
        config.load({}, {"CANAL_ETCD_PASSWORD": secret})
    assert secret not in str(err.value)
    with pytest.raises(BadRequest) as err:
        config.load({}, {"CANAL_ETCD_USERNAME": "u", "CANAL_ETCD_PASSWORD": secret,
                         "CANAL_ETCD_PASSWORD_FILE": files["password"]})
    assert secret not in str(err.value)
    assert all(secret not in " ".join(row) for row in config.describe())
    with pytest.raises(TypeError):  # no way around the mask through pickling
        import pickle

        pickle.dumps(cfg.etcd_password)
