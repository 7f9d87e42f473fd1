"""Command line: ``rollout serve [--model DIR] [--port N] ...`` (also ``python -m rollout serve``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

# CLI flag -> engine option, for the flags that are passed through only when given.
_ENGINE_FLAGS = (
    "device",
    "dtype",
    "page_size",
    "max_total_tokens",
    "max_running_requests",
    "chunked_prefill_size",
    "max_num_batched_tokens",
    "context_length",
    "seed",
    "tp_size",
    "ep_size",
    "ep_spare_slots",
    "ep_rebalance_interval",
    "speculative_method",
    "num_draft_tokens",
    "draft_model_path",
    "speculative_max_batch_size",
    "draft_on_stale_weights",
    "enable_return_routed_experts",
    "deterministic",
    "fp32_lm_head",
    "memory_backup_tags",
)


def _port(text: str) -> int:
    """A TCP port for argparse: an integer in 0..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (got {port})")
    return port


def _engine_default(name: str) -> Any:
    """The engine's default for option ``name``, read from the config dataclasses."""
    from rollout.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

    for cls in (EngineConfig, CacheConfig, SchedulerConfig, ParallelConfig):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.default
    raise KeyError(name)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rollout`` command."""
    from rollout.config import SPEC_METHODS

    parser = argparse.ArgumentParser(prog="rollout", description="RL rollout engine served over gRPC "
                                     "(and optionally an OpenAI-compatible HTTP API)")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over gRPC (rollout.v1.Rollout) and optionally HTTP",
                       description="Serve a model over gRPC (rollout.v1.Rollout); with --http-port also the "
                                   "OpenAI-compatible HTTP API. Options without a default shown are off unless given.")
    # Engine flags are passed on only when given, so their argparse default is None; their help shows
    # the engine's own default instead.
    d = _engine_default
    s.add_argument(
        "--model", default=None,
        help="Hugging Face model directory, or a Hub id such as Qwen/Qwen3-0.6B (fetched into the Hub cache; "
             "HF_HUB_OFFLINE=1 uses the cache only) (default: the embedded tiny Qwen3 model, random weights, "
             "written to $ROLLOUT_CACHE or ~/.cache/rollout on first use)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 127.0.0.1 is loopback only (default: %(default)s)")
    s.add_argument("--port", type=_port, default=50051, help="port to bind; 0 picks a free one (default: %(default)s)")
    s.add_argument("--auth-token", default=None,
                   help="require 'authorization: Bearer <token>' on every call (default: no auth)")
    s.add_argument("--tls-cert", default=None,
                   help="PEM certificate chain (with --tls-key) to serve TLS (default: plaintext)")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (default: none)")
    s.add_argument(
        "--disable-control",
        action="store_true",
        help="answer PERMISSION_DENIED to pause/continue/flush and weight/memory RPCs (default: enabled)",
    )
    s.add_argument("--engine-stall-timeout", type=float, default=10.0,
                   help="seconds the engine may be unready for commands before health says NOT_SERVING "
                        "(default: %(default)s)")
    s.add_argument("--max-request-mb", type=int, default=64,
                   help="largest request accepted, in MiB; larger ones get RESOURCE_EXHAUSTED before parsing "
                        "(default: %(default)s)")
    s.add_argument("--http-port", type=_port, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics) on this port, same engine, host, token and TLS; "
                        "0 picks a free one (default: off)")
    s.add_argument("--served-model-name", default=None,
                   help="model name of the HTTP API (default: --model as given, or the default model's name)")
    s.add_argument("--device", default=None, help=f"cpu, cuda or cuda:N (default: {d('device')})")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help=f"compute and KV dtype (default: {d('dtype')})")
    s.add_argument("--page-size", type=int, default=None,
                   help=f"KV token slots per page (default: {d('page_size')})")
    s.add_argument("--max-total-tokens", type=int, default=None,
                   help=f"KV cache capacity in tokens (default: {d('kv_memory_fraction')} of the free GPU memory "
                        "once the weights are loaded; on CPU 1 GiB of KV, at most 262144 tokens)")
    s.add_argument("--max-running-requests", type=int, default=None,
                   help=f"requests decoding at once (default: {d('max_running_requests')})")
    s.add_argument("--chunked-prefill-size", type=int, default=None,
                   help=f"longest prefill chunk of one request in one step (default: {d('chunked_prefill_size')})")
    s.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"token budget of one step (default: {d('max_num_batched_tokens')})")
    s.add_argument("--context-length", type=int, default=None, help="longest sequence (default: the model's)")
    s.add_argument("--tp-size", type=int, default=None,
                   help="tensor-parallel ranks, one process and one GPU each (from --device's index on); "
                        f"on CPU, gloo ranks (default: {d('tp_size')})")
    s.add_argument("--ep-size", type=int, default=None,
                   help="expert-parallel ranks: whole experts per rank, attention tensor-parallel over the same "
                        f"ranks (default: {d('ep_size')})")
    s.add_argument("--ep-spare-slots", type=int, default=None,
                   help=f"extra expert slots per rank for copies of hot experts (default: {d('ep_spare_slots')})")
    s.add_argument("--ep-rebalance-interval", type=int, default=None,
                   help="rebalance the experts every N steps, 0: only on request "
                        f"(default: {d('ep_rebalance_interval')})")
    s.add_argument("--deterministic", action="store_const", const=True, default=None,
                   help="batch-invariant kernels: a request's tokens and logprobs are bitwise the same whatever "
                        "the batch, the chunking or the prefix cache (dense models, one rank; slower)")
    s.add_argument("--fp32-lm-head", action="store_const", const=True, default=None,
                   help="logits from a float32 LM head (closer to a float32 trainer's logprobs)")
    s.add_argument("--seed", type=int, default=None,
                   help=f"seed for requests that carry none (default: {d('seed')})")
    s.add_argument("--speculative-method", default=None, choices=SPEC_METHODS,
                   help="speculative decoding: ngram (lookup in the prompt and output), draft (a small model, "
                        "--draft-model-path), eagle (an EAGLE-1/2 head for this target, --draft-model-path), "
                        "oracle (benchmarks only: not the target's distribution) (default: off)")
    s.add_argument("--num-draft-tokens", type=int, default=None,
                   help="most tokens drafted per sequence per step (default: 4)")
    s.add_argument("--draft-model-path", default=None,
                   help="HF model directory of the draft model, or of the EAGLE head (config.json and weights)")
    s.add_argument("--speculative-max-batch-size", type=int, default=None,
                   help="speculate only while at most this many sequences decode (default: 32)")
    s.add_argument("--draft-on-stale-weights", default=None, choices=("disable", "keep"),
                   help="draft model not updated with the target (no draft.<name> tensors in the update): "
                        "stop speculating or keep drafting with the old draft (default: disable)")
    s.add_argument("--enable-return-routed-experts", action="store_true", default=None,
                   help="record each MoE layer's top-k expert ids with the KV, so Generate calls can ask for "
                        "them (return_routed_experts; MoE models only; default: off)")
    s.add_argument("--memory-backup-tags", nargs="+", default=None, metavar="TAG",
                   help="memory tags (weights, kv_cache, cuda_graph) copied to host memory on ReleaseMemory and "
                        "restored on ResumeMemory; without weights here, released weights must be pushed again "
                        "(default: none)")
    s.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log verbosity (default: %(default)s)")
    return parser


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line (unset flags keep the engine defaults)."""
    return {name: getattr(args, name) for name in _ENGINE_FLAGS if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rollout`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "serve":
        from rollout.errors import RolloutError
        from rollout.server.app import serve

        try:
            serve(
                args.model,
                host=args.host,
                port=args.port,
                auth_token=args.auth_token,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                enable_control=not args.disable_control,
                engine_stall_timeout=args.engine_stall_timeout,
                max_request_mb=args.max_request_mb,
                http_port=args.http_port,
                served_model_name=args.served_model_name,
                **engine_options(args),
            )
        except (RolloutError, OSError, RuntimeError, ValueError) as e:
            print(f"rollout serve: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
