"""--log-format json: one JSON object per line with time, level, logger, message and context;
redaction of secrets before any handler; the bounded ring."""

from __future__ import annotations

import io
import json
import logging

import pytest

from canal import config, logs


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers = handlers
    root.setLevel(level)


def test_json_lines_have_the_fields_and_context(restore_root):
    out = io.StringIO()
    logs.setup("DEBUG", "json", stream=out)
    logging.getLogger("canal.test").info("pass: %s", "12ms", extra={"endpoint": "abc123", "count": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("canal.test").exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "canal.test" and first["message"] == "pass: 12ms"
    assert first["time"].endswith("Z") and first["endpoint"] == "abc123" and first["count"] == 3
    assert "process" in first and "thread" in first
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_text_format_is_the_default_line(restore_root):
    out = io.StringIO()
    logs.setup("INFO", "text", stream=out)
    logging.getLogger("canal.test").info("hello")
    line = out.getvalue()
    assert " INFO canal.test [" in line and line.rstrip().endswith("hello")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_secrets_are_redacted_in_messages_exceptions_and_the_ring(restore_root):
    out = io.StringIO()
    logs.setup("INFO", "json", secrets=["s3cr3t-pass"], stream=out)
    log = logging.getLogger("canal.test")
    log.warning("auth failed for password %s", "s3cr3t-pass", extra={"detail": "pw=s3cr3t-pass"})
    try:
        raise RuntimeError("s3cr3t-pass leaked")
    except RuntimeError:
        log.exception("oops")
    log.info("key: -----BEGIN PRIVATE KEY-----\nMIIEabc\n-----END PRIVATE KEY-----")
    text = out.getvalue() + json.dumps(logs.RING.records())
    assert "s3cr3t-pass" not in text and "MIIEabc" not in text
    assert logs.MASK in text
    # positive control: the same records without redaction do carry it
    plain = io.StringIO()
    logs.setup("INFO", "json", stream=plain)
    logging.getLogger("canal.test").warning("auth failed for password %s", "s3cr3t-pass")
    assert "s3cr3t-pass" in plain.getvalue()


def test_ring_is_bounded():
    ring = logs.Ring(size=3)
    for i in range(5):
        ring.emit(logging.LogRecord("x", logging.INFO, "", 0, f"m{i}", None, None))
    assert [r["message"] for r in ring.records()] == ["m2", "m3", "m4"]


def test_log_format_setting():
    assert config.load({}, {}).log_format == "text"
    assert config.load({}, {"CANAL_LOG_FORMAT": "json"}).log_format == "json"
    assert config.load({"log_format": "text"}, {"CANAL_LOG_FORMAT": "json"}).log_format == "text"
    with pytest.raises(Exception, match="log_format 'xml'.*text, json"):
        config.load({}, {"CANAL_LOG_FORMAT": "xml"})
