"""Messages and exit statuses that say what happened, as docs/errors.md documents them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import llama_state, save_checkpoint
from hub_fixtures import hub  # noqa: F401
from hubserver import HubServer

from deltamerge.errors import InputError, WorkError


def _seed(server: HubServer, repo_id: str, folder: Path) -> None:
    server.seed(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})


# -- a Hub that fails is reported as failing ----------------------------------------------------
def test_hub_server_error_on_a_weight_download_is_a_work_error(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
):
    """huggingface_hub calls any failed request for an uncached file "not in the local cache":
    a Hub answering 500 is a Hub failure (exit 1, retry later), named with its status and file."""
    import huggingface_hub.utils._http as http

    from deltamerge.sources.hub import NotCachedError, download_input

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # its retries, without the waits
    _seed(hub, "owner/model", save_checkpoint(llama_state(0), tmp_path / "model"))
    hub.fail_requests("/model.safetensors", 500)
    with pytest.raises(WorkError) as caught:
        download_input("owner/model")
    assert not isinstance(caught.value, (InputError, NotCachedError))
    assert caught.value.exit_code == 1
    message = str(caught.value)
    assert "answered HTTP 500" in message and "model.safetensors" in message
    assert "not in the cache" not in message
