"""Settings: defaults, validation with one clear line naming the variable, secrets never shown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sidecar.config import load_settings
from sidecar.errors import ConfigError

SECRET = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0LWtleS12YWx1ZQ==;"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("SIDECAR_") or name == "AZURE_STORAGE_CONNECTION_STRING":
            monkeypatch.delenv(name)


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_STORAGE_CONNECTION_STRING", SECRET)
    s = load_settings()
    assert (s.a1111_url, s.queue_name, s.container_name) == ("http://127.0.0.1:7860", ["jobs"], "images")
    assert (s.max_dequeue_count, s.visibility_timeout, s.prefetch) == (5, 60, 1)
    assert (s.http_port, s.shutdown_grace) == (8000, 30)
    assert s.poison_queue_for("jobs") == "jobs-poison"
    assert s.a1111_command is None and s.result_queue_name is None


def test_azure_connection_string_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", SECRET)
    assert load_settings().connection_string == SECRET
    monkeypatch.setenv("SIDECAR_STORAGE_CONNECTION_STRING", SECRET + "x=y;")
    assert load_settings().connection_string == SECRET + "x=y;"


def test_sharded_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_STORAGE_CONNECTION_STRING", SECRET)
    monkeypatch.setenv("SIDECAR_QUEUE_NAME", "jobs-a, jobs-b,jobs-c")
    s = load_settings()
    assert s.queue_name == ["jobs-a", "jobs-b", "jobs-c"]
    assert [s.poison_queue_for(q) for q in s.queue_name] == [
        "jobs-a-poison",
        "jobs-b-poison",
        "jobs-c-poison",
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SIDECAR_PREFETCH", "-1"),
        ("SIDECAR_PREFETCH", "lots"),
        ("SIDECAR_VISIBILITY_TIMEOUT", "0"),
        ("SIDECAR_MAX_DEQUEUE_COUNT", "0"),
        ("SIDECAR_QUEUE_NAME", "Bad_Name"),
        ("SIDECAR_CONTAINER_NAME", "x"),
        ("SIDECAR_A1111_URL", "localhost:7860"),
        ("SIDECAR_HTTP_PORT", "70000"),
        ("SIDECAR_SHUTDOWN_GRACE", "-5"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv("SIDECAR_STORAGE_CONNECTION_STRING", SECRET)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{variable}:")
    assert "\n" not in str(caught.value)


def test_missing_storage_is_explained() -> None:
    with pytest.raises(ConfigError, match="SIDECAR_STORAGE_CONNECTION_STRING"):
        load_settings()


def test_bad_setting_stops_the_process_with_one_line_and_no_secret() -> None:
    env = {"SIDECAR_STORAGE_CONNECTION_STRING": SECRET, "SIDECAR_PREFETCH": "-3", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIDECAR_PREFETCH" in lines[0]
    assert "c2VjcmV0" not in done.stderr + done.stdout


def test_every_bad_value_is_reported_at_once_on_one_line() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"storage_connection_string": SECRET, "prefetch": "999", "max_steps": "lots"})
    line = str(refused.value)
    assert "\n" not in line
    assert "SIDECAR_PREFETCH: Input should be less than or equal to 256 (got '999')" in line
    assert "SIDECAR_MAX_STEPS: Input should be a valid integer" in line


def test_a_misspelled_variable_gets_a_warning_naming_the_setting_it_resembles() -> None:
    from sidecar.config import unknown_variables

    environ = {
        "SIDECAR_PREFTCH": "0",
        "SIDECAR_QUEUE_NAME": "jobs",
        "SIDECAR_ZZZ_UNRELATED": "1",
        "HOME": "/",
    }
    assert unknown_variables(environ) == [
        "SIDECAR_PREFTCH is not a setting and is ignored: did you mean SIDECAR_PREFETCH?",
        "SIDECAR_ZZZ_UNRELATED is not a setting and is ignored (see the README's Configuration table)",
    ]


def test_the_commands_say_so_before_anything_else() -> None:
    """``status`` prints the warning (a typo is otherwise silent) and still fails on the real error;
    ``run`` logs it in its own format before it reads storage."""
    env = {"SIDECAR_STORAGE_CONNECTION_STRING": SECRET, "SIDECAR_PREFTCH": "0", "PATH": "/usr/bin:/bin"}
    env |= {"SIDECAR_PREFETCH": "-3"}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.strip().splitlines()
    warning = "SIDECAR_PREFTCH is not a setting and is ignored: did you mean SIDECAR_PREFETCH?"
    assert lines[0] == f"a1111-sidecar: warning: {warning}"
    assert done.returncode == 2 and "SIDECAR_PREFETCH: Input should be greater than or equal to 0" in lines[1]
    dead = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
    dead += (
        "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    )
    env |= {"SIDECAR_PREFETCH": "1", "SIDECAR_STORAGE_CONNECTION_STRING": dead, "SIDECAR_LOG_FORMAT": "json"}
    env |= {
        "SIDECAR_RETRY_BUDGET": "0.5",
        "SIDECAR_HTTP_PORT": "0",
        "SIDECAR_A1111_URL": "http://127.0.0.1:9",
    }
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"], env=env, capture_output=True, text=True, timeout=120
    )
    first = json.loads(run.stderr.splitlines()[0])
    assert (first["level"], first["msg"]) == ("warning", warning), run.stderr
    assert run.returncode != 0
