"""`hogwild-ray serve`: an OpenAI-compatible endpoint on Ray Serve, until Ctrl-C."""

from __future__ import annotations

import argparse

from ..core.dtypes import DTYPE_NAMES
from .common import FORMATTER, at_least

EXAMPLES = """\
examples:
  hogwild-ray serve                                  # the built-in model on http://127.0.0.1:8000/v1
  hogwild-ray serve --model Qwen/Qwen3-8B --replicas 2 --workers 4 --api-key "$KEY"
  hogwild-ray serve --model /models/qwq-32b --autoscale 1,8 --address auto --host 0.0.0.0

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is 17 * 23?"}],
         "workers": 2, "max_tokens": 256}'

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (stream: true for
server-sent events), GET /metrics (Prometheus), GET /health. The answer is the message's
content; every worker's text is in reasoning_content; Hogwild! options are extra body
fields: workers, layout, max_forward_passes, top_k, worker_sampling, redundancy_every,
finisher, finisher_tokens, stop_on_answer, protocol.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "serve", formatter_class=FORMATTER, epilog=EXAMPLES,
        help="an OpenAI-compatible HTTP endpoint (Ray Serve: replicas, autoscaling, metrics)",
        description="Serve a model over HTTP in OpenAI's API: concurrent requests share forward passes, each\n"
                    "engine replica (one GPU, or one CPU process) runs its own batching scheduler, and Ray\n"
                    "Serve places, health-checks and scales the replicas. Runs until Ctrl-C or SIGTERM, then\n"
                    "shuts down gracefully. Binds to 127.0.0.1 unless --host says otherwise.")
    g = p.add_argument_group("the model")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="local HF directory, GGUF file or random:<shape> (default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the name /v1/models lists and requests must give (default: --model, or the built-in's name)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda where the replica has a GPU)")
    g.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, metavar="DTYPE",
                   help=f"weights and K/V dtype: {', '.join(sorted(DTYPE_NAMES))} (default: bf16 on GPUs, fp32 on CPUs)")
    g.add_argument("--cache-tokens", type=at_least(1), default=None, metavar="N",
                   help="each replica's K/V pool in tokens, all sessions together (default: the engine's)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                   help="run every forward pass eagerly (default: CUDA graphs on GPUs)")
    g.add_argument("--tp", type=at_least(1), default=1, metavar="N", help="tensor-parallel ranks per replica: N shard actors, one GPU each (default: 1, the replica's own device)")
    g.add_argument("--graph-warmup", type=at_least(0), default=32, metavar="N",
                   help="before serving, capture the CUDA graphs of decode passes of batches of up to N sessions "
                        "of --workers workers (a few seconds; default: 32; 0: capture each as requests meet it)")
    g = p.add_argument_group("the server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    g.add_argument("--port", type=at_least(1), default=8000, help="port (default: %(default)s)")
    g.add_argument("--replicas", type=at_least(1), default=1, metavar="R", help="engine replicas (default: 1)")
    g.add_argument("--autoscale", metavar="MIN,MAX", default=None,
                   help="scale the engine replicas between MIN and MAX on ongoing requests (instead of --replicas)")
    g.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $HOGWILD_API_KEY, else none)")
    g.add_argument("--max-waiting", type=at_least(0), default=256, metavar="M",
                   help="sessions that may wait for K/V pages; more answer 503 with Retry-After (an idle server "
                        "takes any request; default: 256)")
    g.add_argument("--address", metavar="ADDR", default=None,
                   help="Ray cluster to run on (default: a running one, else a new local one)")
    g = p.add_argument_group("request defaults")
    g.add_argument("--workers", type=at_least(1), default=2, metavar="N",
                   help="workers per session when a request does not say (default: 2)")
    g.add_argument("--max-workers", type=at_least(1), default=64, metavar="N",
                   help="the most workers a request may ask for (default: 64)")
    g.add_argument("--max-tokens", type=at_least(1), default=1024, metavar="N",
                   help="tokens per worker when a request does not say (default: 1024)")
    p.set_defaults(execute=execute)


def settings_from(args: argparse.Namespace):
    from ..serve.app import ServeSettings, parse_autoscale

    return ServeSettings(
        model=args.model, served_model_name=args.served_model_name, device=args.device, dtype=args.dtype,
        cache_tokens=args.cache_tokens, cuda_graphs=args.cuda_graphs, tp=args.tp, workers=args.workers,
        max_workers=args.max_workers, max_tokens=args.max_tokens, replicas=args.replicas,
        autoscale=parse_autoscale(args.autoscale) if args.autoscale else None, api_key=args.api_key,
        max_waiting=args.max_waiting, graph_warmup=args.graph_warmup)


def execute(args: argparse.Namespace, engine=None) -> int:
    from ..serve.launch import serve_forever

    settings = settings_from(args)  # every flag checked before Ray or a model starts

    def ready(url: str) -> None:
        print(f"serving {settings.model_name} on {url}/v1 (metrics: {url}/metrics); Ctrl-C stops", flush=True)

    serve_forever(settings, args.host, args.port, args.address, ready, lambda: print("shutting down", flush=True))
    return 0
