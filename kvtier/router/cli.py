"""``kvtier router --port P --worker URL [--worker URL ...] [--tokenizer PATH] [--events ENDPOINT ...]``"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from aiohttp import web

from kvtier.command_options import non_negative_float, positive_float, positive_int
from kvtier.errors import UsageError
from kvtier.router.auth import Auth, load_keys
from kvtier.router.choice import CostWeights
from kvtier.router.server import EventSource, KvRouter, RouterConfig, check_worker_url
from kvtier.router.translate import BadRequest

log = logging.getLogger("kvtier.router")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=port_arg, required=True, help="port to listen on")
    parser.add_argument("--worker", action="append", required=True, metavar="URL", type=worker_arg,
                        help="an OpenAI-compatible worker (vLLM or SGLang server), http://host:port; repeat for each")
    parser.add_argument("--events", action="append", default=[], metavar="ENDPOINT", type=events_arg,
                        help="the KV-event stream of the worker at the same position: tcp://h:p, or "
                             "tcp://h:p,tcp://h:replay_port; '-' for a worker without events (approximate mode)")
    parser.add_argument("--tokenizer", help="tokenizer.json or a model directory (chat template from its "
                        "tokenizer_config.json): exact block keys that match the workers' KV events. Without it the "
                        "router hashes character blocks, which is approximate and only matches its own past decisions")
    parser.add_argument("--block-size", type=positive_int, default=16,
                        help="tokens per block, as the workers use")
    parser.add_argument("--device-credit", type=non_negative_float, default=1.0,
                        help="cost saved per prompt block a worker holds in GPU memory")
    parser.add_argument("--host-credit", type=non_negative_float, default=0.75,
                        help="cost saved per prompt block a worker holds in host memory (G2)")
    parser.add_argument("--disk-credit", type=non_negative_float, default=0.25,
                        help="cost saved per prompt block a worker holds on disk or in its remote store (G3/G4)")
    parser.add_argument("--decode-weight", type=non_negative_float, default=1.0, help="cost per KV block a worker is decoding with")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: cheapest worker; >0: softmax sampling")
    parser.add_argument("--max-inflight", type=positive_int, default=64,
                        help="requests per worker before it counts as saturated")
    parser.add_argument("--max-waiting", type=positive_int, default=1024,
                        help="bound of the queue when all are saturated (then 429)")
    parser.add_argument("--approx-ttl", type=positive_float, default=120.0, help="seconds a routed prefix is assumed cached")
    parser.add_argument("--health-interval", type=positive_float, default=2.0,
                        help="seconds between health checks of every worker (two failed in a row: dead)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY[:SALT]",
                        help="a client API key (Authorization: Bearer KEY or x-api-key: KEY), repeat for several; "
                             "':SALT' binds it to a tenant's cache salt. Without any key the API is open")
    parser.add_argument("--api-key-file", metavar="PATH",
                        help="client API keys, one 'KEY [TENANT_SALT]' a line, # comments")
    parser.add_argument("--admin-key", help="key for POST/DELETE /admin/workers; without one the admin API is off")
    parser.add_argument("--max-body-bytes", type=positive_int, default=32 * 2**20, help="largest request body")
    parser.add_argument("--max-sessions", type=positive_int, default=100_000,
                        help="sessions remembered for stickiness")
    parser.add_argument("--max-approx-blocks", type=positive_int, default=1_000_000,
                        help="blocks per worker assumed cached from routing decisions (approximate mode)")
    parser.add_argument("--no-derive-hints", dest="derive_hints", action="store_false",
                        help="forward only the agent hints clients send explicitly (nvext or kv_transfer_params), "
                             "validated; derive nothing from session headers, metadata, prompt_cache_key, cache_control "
                             "breakpoints or prefix continuation")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging threshold")


def port_arg(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expects a TCP port (1-65535), got {text!r}")
    return value


def worker_arg(text: str) -> str:
    try:
        return check_worker_url(text)
    except BadRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def events_arg(text: str) -> str:
    if text != "-":
        try:
            EventSource.parse(text)
        except ValueError as exc:
            expected = "tcp://host:port[,tcp://host:replay_port] or '-'"
            raise argparse.ArgumentTypeError(f"{exc}: expects {expected}") from None
    return text


def build_router(args: argparse.Namespace) -> KvRouter:
    if len(args.events) > len(args.worker):
        raise UsageError(f"{len(args.events)} --events for {len(args.worker)} --worker: give one per worker, in order")
    events = {url: EventSource.parse(ep) for url, ep in zip(args.worker, args.events) if ep != "-"}
    try:
        auth = Auth(load_keys(args.api_key, args.api_key_file), args.admin_key)
    except OSError as exc:
        raise UsageError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a malformed key entry
        raise UsageError(str(exc)) from None
    try:
        weights = CostWeights(args.device_credit, args.host_credit, args.disk_credit, args.decode_weight,
                              args.temperature)
        config = RouterConfig(block_size=args.block_size, weights=weights, max_inflight_per_worker=args.max_inflight,
                              max_waiting=args.max_waiting, approx_ttl_s=args.approx_ttl,
                              health_interval_s=args.health_interval, max_body_bytes=args.max_body_bytes,
                              max_sessions=args.max_sessions, max_approx_blocks=args.max_approx_blocks, auth=auth,
                              derive_hints=args.derive_hints)
        return KvRouter(args.worker, config, tokenizer=args.tokenizer, events=events)
    except (ValueError, OSError) as exc:  # a weight out of range, a tokenizer that cannot be read
        raise UsageError(str(exc)) from None


def listen(host: str, port: int) -> socket.socket:
    try:
        # backlog: a burst of new client connections (hundreds of agents at once) must not overflow the default
        # of 128, where dropped SYNs cost clients a 1 s retransmit
        return socket.create_server((host, port), backlog=1024)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UsageError(f"cannot listen on {host}:{port}: {reason}") from None


def describe(router: KvRouter, args: argparse.Namespace) -> str:
    """The start-up line: where the router listens, whom it routes to, and how it keys prompts."""
    sources = args.events + ["-"] * (len(args.worker) - len(args.events))
    workers = ", ".join(f"{url} ({'no KV events: approximate' if ep == '-' else 'KV events ' + ep})"
                        for url, ep in zip(args.worker, sources))
    keys = (f"exact block keys from the tokenizer {args.tokenizer}" if router.hasher.exact
            else "approximate block keys from character blocks (no --tokenizer)")
    return f"kvtier router on http://{args.host}:{args.port}: {len(args.worker)} worker(s): {workers}; {keys}"


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router = build_router(args)
    sock = listen(args.host, args.port)
    log.info("%s", describe(router, args))
    web.run_app(router.app(), sock=sock, print=None)
    return 0
