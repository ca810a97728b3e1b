"""The ``hub`` pytest fixture: a fresh local Hub per test, and a huggingface_hub that can only reach it.

Use it from a test module with ``from hub_fixtures import hub  # noqa: F401``.

huggingface_hub reads its settings (endpoint, cache paths, Xet, telemetry) into
``huggingface_hub.constants`` once, at import, which happens long before any fixture runs. Setting
environment variables is therefore not enough in-process: the fixture sets them (for subprocesses,
e.g. the CLI) *and* patches the matching constants (for code running in the test process). The
module-level helpers (``huggingface_hub.model_info``, ``get_safetensors_metadata``, ...) are bound
to an ``HfApi`` created at import, so its ``endpoint`` is patched too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import DEFAULT_TOKEN, HubServer
from huggingface_hub import HfApi, constants, hf_api
from huggingface_hub.utils import close_session

__all__ = ["DEFAULT_TOKEN", "hub"]

_UNSET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """Start a ``HubServer`` (token ``DEFAULT_TOKEN``), point huggingface_hub at it, stop it after."""
    home = tmp_path / "hf_home"
    with HubServer(token=DEFAULT_TOKEN) as server:
        for name in _UNSET_ENV:
            monkeypatch.delenv(name, raising=False)
        env = {
            "HF_HOME": str(home),
            "HF_ENDPOINT": server.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        patched = {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
            "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_UPDATE_CHECK": True,
            "HF_HUB_OFFLINE": False,
        }
        for name, value in patched.items():
            monkeypatch.setattr(constants, name, value, raising=False)
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)
        close_session()  # a fresh HTTP client: no connection pooled by a previous test
        try:
            yield server
        finally:
            close_session()


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    """A client of the test Hub, with its token."""
    return HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)


@pytest.fixture
def all_routes_known(hub: HubServer) -> Iterator[None]:
    """After the test, fail on any request the test Hub did not know (``usefixtures`` it)."""
    yield
    hub.assert_clean()
