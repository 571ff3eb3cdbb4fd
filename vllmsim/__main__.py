"""``python -m vllmsim`` / ``vllm-sim``: start one simulated vLLM replica from a vLLM command line."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from .config import ConfigError, log_level, parse_args
from .server import Simulator


async def _serve(sim: Simulator) -> None:
    """Run until SIGTERM/SIGINT (a pod's stop) and shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await sim.start()
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse vLLM's flags, then serve; a bad command line exits 2 with the reason, as vLLM refuses to start."""
    args = list(sys.argv[1:] if argv is None else argv)
    level = log_level(args).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = parse_args(args)
        sim = Simulator(config, exit_on_crash=True)
    except ConfigError as exc:
        print(f"vllm-sim: error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency off Windows
        asyncio.run(_serve(sim))
    else:
        uvloop.run(_serve(sim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
