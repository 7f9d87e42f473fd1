"""The README's HTTP examples (curl and the openai client) run as written against the default model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from rollout.default_model import DEFAULT_MODEL_NAME
from tests.e2e.conftest import REPO_ROOT

README_ADDRESS = "http://127.0.0.1:8000"


def _block(marker: str) -> str:
    """The fenced code block right after ``<!-- readme-test: marker -->`` in the README."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(rf"<!-- readme-test: {marker} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"no block marked {marker} in the README"
    assert README_ADDRESS in m.group(1)
    return m.group(1)


def _json_values(text: str) -> list:
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        value, i = decoder.raw_decode(text, i)
        values.append(value)
    return values


@pytest.fixture(scope="module")
def default_server(start_server, tmp_path_factory):
    """A server on the embedded default model, written to a fresh cache as on a new machine."""
    return start_server("--http-port", "0", env={"ROLLOUT_CACHE": str(tmp_path_factory.mktemp("cache"))})


def _curl_in_python(script: str) -> str:
    """What the README's curl lines print, sent with httpx where no curl is installed: each line's
    -H headers, -d body (POST) and URL, parsed from the block itself so a change to it is tested."""
    import httpx

    out = []
    for line in script.replace("\\\n", " ").splitlines():
        args = shlex.split(line)
        if not args:
            continue
        assert args[0] == "curl", line
        url, headers, body, i = None, {}, None, 1
        while i < len(args):
            if args[i] == "-H":
                key, _, value = args[i + 1].partition(":")
                headers[key.strip()] = value.strip()
                i += 2
            elif args[i] == "-d":
                body, i = args[i + 1], i + 2
            elif args[i] == "-s":
                i += 1
            else:
                url, i = args[i], i + 1
        reply = httpx.request("POST" if body is not None else "GET", url, headers=headers, content=body, timeout=120)
        out.append(reply.text)
    return "\n".join(out)


def test_readme_curl_example(default_server):
    script = _block("curl").replace(README_ADDRESS, default_server.http_url)
    if shutil.which("curl") is None:
        stdout = _curl_in_python(script)
    else:
        done = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        stdout = done.stdout
    models, chat = _json_values(stdout)
    assert models["data"][0]["id"] == DEFAULT_MODEL_NAME
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] > 0, chat


def test_readme_openai_client_example(default_server):
    code = _block("openai").replace(README_ADDRESS, default_server.http_url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The random model's text may hold any character; the ids and versions line has a fixed shape.
    assert re.search(r"\[(\d+, )*\d+\] \[(0, )*0\] -\d+\.\d+", done.stdout), done.stdout
