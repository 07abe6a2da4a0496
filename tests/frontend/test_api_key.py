"""The API key: ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>`` when one is
configured, ``/health`` never does, and without one everything is open as before.

(The key sent to vLLM instances: ``test_http_backend``.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from frontend_fakes import ANSWER, FakeWorker, RunningFrontend, wait_until

from fabric.errors import ConfigError
from fabric.frontend.api_key import ENV_API_KEY_FILE, ApiKey, resolve_api_key

KEY = "test-key-0123456789"
BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 4}


@pytest.fixture
def protected(
    make_worker: Callable[..., FakeWorker], start_frontend: Callable[..., RunningFrontend]
) -> RunningFrontend:
    make_worker("decode-0")
    running = start_frontend(api_key=ApiKey(KEY))
    assert wait_until(lambda: len(running.frontend.router.fleet.workers()) == 1)
    return running


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert KEY not in response.text


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"}],
    ids=["no-key", "wrong-key", "not-bearer"],
)
def test_requests_without_the_key_are_refused(
    protected: RunningFrontend, headers: dict[str, str]
) -> None:
    url = protected.url
    _assert_401(httpx.post(f"{url}/v1/completions", json=BODY, headers=headers, timeout=10))
    _assert_401(httpx.get(f"{url}/v1/models", headers=headers, timeout=10))
    _assert_401(httpx.get(f"{url}/metrics", headers=headers, timeout=10))
    _assert_401(httpx.get(f"{url}/v1/no-such-route", headers=headers, timeout=10))


def test_the_right_key_is_served(protected: RunningFrontend) -> None:
    client = openai.OpenAI(base_url=f"{protected.url}/v1", api_key=KEY, max_retries=0)
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=100)
    assert completion.choices[0].text == ANSWER
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{protected.url}/metrics", headers=headers, timeout=10).status_code == 200


def test_the_openai_client_with_a_wrong_key_gets_its_typed_error(
    protected: RunningFrontend,
) -> None:
    client = openai.OpenAI(base_url=f"{protected.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_stays_open(protected: RunningFrontend) -> None:
    response = httpx.get(f"{protected.url}/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_off_by_default(
    make_worker: Callable[..., FakeWorker], start_frontend: Callable[..., RunningFrontend]
) -> None:
    make_worker("decode-0")
    running = start_frontend()
    assert wait_until(lambda: len(running.frontend.router.fleet.workers()) == 1)
    assert httpx.post(f"{running.url}/v1/completions", json=BODY, timeout=10).status_code == 200
    assert httpx.get(f"{running.url}/metrics", timeout=10).status_code == 200


def test_resolving_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_API_KEY_FILE, raising=False)
    assert resolve_api_key(None) is None
    env_file, flag_file = tmp_path / "env.key", tmp_path / "flag.key"
    env_file.write_text("from-env\n")
    flag_file.write_text("from-flag")
    monkeypatch.setenv(ENV_API_KEY_FILE, str(env_file))
    assert resolve_api_key(None) == ApiKey("from-env")
    assert resolve_api_key(str(flag_file)) == ApiKey("from-flag")
    assert "from-flag" not in repr(ApiKey("from-flag"))
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"--api-key-file=.*empty"):
        resolve_api_key(str(empty))
    monkeypatch.setenv(ENV_API_KEY_FILE, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=f"{ENV_API_KEY_FILE}=.*cannot read"):
        resolve_api_key(None)
