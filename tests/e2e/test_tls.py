"""TLS: a server started with a certificate serves TLS clients that trust it and refuses plaintext."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from rollout.client import RolloutClient
from rollout.errors import RolloutError
from rollout.types import SamplingParams
from tests.e2e.conftest import ServerProcess


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 made with the openssl command."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def test_tls_server_serves_trusting_clients_and_refuses_plaintext(tiny_model, certificate, tmp_path) -> None:
    cert, key = certificate
    server = ServerProcess(["--model", tiny_model, "--tls-cert", cert, "--tls-key", key, "--http-port", "0"],
                           str(tmp_path / "log"))
    try:
        with RolloutClient(server.address, tls_ca=cert) as client:
            client.wait_ready(120)
            out = client.generate([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
            assert len(out[0].output_ids) == 4
        with RolloutClient(server.address, timeout=10) as plain:
            with pytest.raises(RolloutError) as err:
                plain.generate([5, 6, 7], SamplingParams(max_new_tokens=2))
            assert err.value.code == "UNAVAILABLE"
        # The HTTP API serves TLS with the same certificate, and nothing in plaintext.
        assert server.http_url.startswith("https://")
        assert httpx.get(f"{server.http_url}/health", verify=cert, timeout=10).json() == {"status": "ok"}
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.http_url.replace("https://", "http://") + "/health", timeout=10)
    finally:
        assert server.stop() == 0, server.log()
