"""``kvtier router --port P --worker URL [--worker URL ...] [--tokenizer PATH] [--events ENDPOINT ...]``"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from kvtier.router.auth import ADMIN_ENV, KEYS_ENV, Auth, load_admin_key, load_keys
from kvtier.router.choice import CostWeights
from kvtier.router.server import EventSource, KvRouter, RouterConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--worker", action="append", required=True, metavar="URL",
                        help="an OpenAI-compatible worker (vLLM or SGLang server); repeat for each")
    parser.add_argument("--events", action="append", default=[], metavar="ENDPOINT",
                        help="the KV-event stream of the worker at the same position: tcp://h:p, or "
                             "tcp://h:p,tcp://h:replay_port; '-' for a worker without events (approximate mode)")
    parser.add_argument("--tokenizer", help="tokenizer.json or a model directory (chat template from its "
                        "tokenizer_config.json): exact block keys that match the workers' KV events. Without it the "
                        "router hashes character blocks, which is approximate and only matches its own past decisions")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block, as the workers use (16)")
    parser.add_argument("--device-credit", type=float, default=1.0)
    parser.add_argument("--host-credit", type=float, default=0.75)
    parser.add_argument("--disk-credit", type=float, default=0.25)
    parser.add_argument("--decode-weight", type=float, default=1.0, help="cost per KV block a worker is decoding with")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: cheapest worker; >0: softmax sampling")
    parser.add_argument("--max-inflight", type=int, default=64, help="requests per worker before it counts as saturated")
    parser.add_argument("--max-waiting", type=int, default=1024, help="bound of the queue when all are saturated")
    parser.add_argument("--approx-ttl", type=float, default=120.0, help="seconds a routed prefix is assumed cached")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY[:SALT]",
                        help="a client API key (Authorization: Bearer KEY or x-api-key: KEY); ':SALT' binds it to a "
                             f"tenant's cache salt. Also --api-key-file and {KEYS_ENV} (comma-separated KEY[:SALT]). "
                             "Without any key the API is open")
    parser.add_argument("--api-key-file", metavar="PATH", help="client API keys, one 'KEY [TENANT_SALT]' a line, # comments")
    parser.add_argument("--admin-key", help=f"key for POST/DELETE /admin/workers (or {ADMIN_ENV}); without one the "
                                            "admin API is off")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="largest request body (32 MiB)")
    parser.add_argument("--max-sessions", type=int, default=100_000, help="sessions remembered for stickiness")
    parser.add_argument("--max-approx-blocks", type=int, default=1_000_000,
                        help="blocks per worker assumed cached from routing decisions (approximate mode)")
    parser.add_argument("--log-level", default="INFO")


def build_router(args: argparse.Namespace) -> KvRouter:
    if len(args.events) > len(args.worker):
        raise ValueError(f"{len(args.events)} --events for {len(args.worker)} workers")
    events = {url.rstrip("/"): EventSource.parse(ep) for url, ep in zip(args.worker, args.events) if ep != "-"}
    weights = CostWeights(args.device_credit, args.host_credit, args.disk_credit, args.decode_weight, args.temperature)
    try:
        auth = Auth(load_keys(args.api_key, args.api_key_file), load_admin_key(args.admin_key))
    except OSError as exc:
        raise ValueError(f"cannot read --api-key-file: {exc}") from None
    config = RouterConfig(block_size=args.block_size, weights=weights, max_inflight_per_worker=args.max_inflight,
                          max_waiting=args.max_waiting, approx_ttl_s=args.approx_ttl, max_body_bytes=args.max_body_bytes,
                          max_sessions=args.max_sessions, max_approx_blocks=args.max_approx_blocks, auth=auth)
    return KvRouter(args.worker, config, tokenizer=args.tokenizer, events=events)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        router = build_router(args)
    except ValueError as exc:
        print(f"kvtier router: {exc}")
        return 2
    # backlog: a burst of new client connections (hundreds of agents at once) must not overflow aiohttp's
    # default of 128, where dropped SYNs cost clients a 1 s retransmit
    web.run_app(router.app(), host=args.host, port=args.port, print=None, backlog=1024)
    return 0
