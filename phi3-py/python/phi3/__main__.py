"""``python -m phi3``: the ``generate`` and ``chat`` commands of the ``phi3`` CLI, in Python.

    python -m phi3 generate "Write a haiku about the sea."
    python -m phi3 generate --model /models/Phi-3-mini-4k-instruct -t 0.7 --seed 1 "Hi"
    python -m phi3 chat --system "Be brief."

Without --model the built-in demo model (random weights, gibberish output) is used.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

import phi3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m phi3",
        description="Run Microsoft Phi-3 models locally (phi3-rs). Without --model the "
        "built-in demo model (random weights) is used.",
    )
    p.add_argument("--version", action="version", version=f"phi3-rs {phi3.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,chat}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-m", "--model", metavar="DIR", help="Hugging Face model folder (default: the demo model)")
    common.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    common.add_argument("--max-context", type=int, metavar="TOKENS", help="largest context a session may hold")
    common.add_argument("-n", "--max-tokens", type=int, default=256, metavar="N", help="most tokens per reply (default: 256)")
    common.add_argument("-t", "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    common.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    common.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    common.add_argument("--min-p", type=float, default=0.0, metavar="M", help="0 = off")
    common.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off")
    common.add_argument("--seed", type=int, metavar="S", help="random seed (default: a fresh one)")
    common.add_argument("--stop", action="append", default=[], metavar="STR", help="stop at this text (repeatable)")
    common.add_argument("-s", "--system", metavar="TEXT", help="a system message first")

    g = sub.add_parser("generate", parents=[common], help="generate a reply to one prompt, streamed to stdout")
    g.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    g.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    g.add_argument("prompt", help='the prompt; "-" reads it from stdin')

    sub.add_parser("chat", parents=[common], help="chat interactively, one user message per line of stdin")
    return p


def _options(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or None,
    )


def _reply(session: phi3.Session, options: Dict[str, Any]) -> Optional[phi3.GenerationResult]:
    """Stream one reply to stdout; Ctrl-C stops it (the session stays usable)."""
    stream = session.stream(**options)
    try:
        for chunk in stream:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n[interrupted]")
    sys.stdout.write("\n")
    return stream.result


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.model:
            model = phi3.Model(args.model, device=args.device, max_context=args.max_context)
        else:
            model = phi3.Model.demo(device=args.device, max_context=args.max_context)
        options = _options(args)
        session = model.session()
        if args.command == "generate":
            prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
            if args.raw:
                session.append_text(prompt)
            else:
                if args.system:
                    session.append_message("system", args.system)
                session.append_message("user", prompt)
            result = _reply(session, options)
            if args.stats and result is not None:
                s = result.stats
                print(
                    f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated, "
                    f"{s.prefill_tokens_per_s:.1f} tok/s prefill, {s.decode_tokens_per_s:.1f} tok/s decode, "
                    f"finish: {result.finish_reason}]",
                    file=sys.stderr,
                )
            return 0
        # chat
        if args.system:
            session.append_message("system", args.system)
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return 0
            line = line.rstrip("\n")
            if line.strip() == "/reset":
                session.reset()
                if args.system:
                    session.append_message("system", args.system)
                continue
            if not line.strip():
                continue
            session.append_message("user", line)
            _reply(session, options)
    except phi3.Phi3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
