"""`python -m hack.demo` (what `make demo` runs after set-up): the LoRA autoscaler end to end, locally.

A real control plane, a vLLM fleet of simulators, the webhook, the controller and the router; a skewed
load whose hot adapter moves; a live view each second; a summary, plots and a JSON summary at the end.
Every process started here is stopped at the end, on an error, on Ctrl-C (SIGINT) and on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from types import FrameType

from hack.demo.cluster import AUTOSCALER, NAMESPACE, POD_SELECTOR, DemoCluster, adapter_names
from hack.demo.load import REQUEST_TIMEOUT_SECONDS, LoadRunner, Phase, arrivals, phase_at, plan_phases
from hack.demo.observe import Observer, Sample, http_get
from hack.demo.report import format_summary, percentile, summarise, write_json, write_plots
from hack.demo.view import CLEAR, Progress, render
from localkube.process import pid_alive, started_pids

NON_TTY_FRAME_EVERY = 10
"""Without a terminal (CI, a pipe), print the view every this many seconds instead of redrawing it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hack/demo.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=150.0,
                        help="seconds of load (three phases); set-up adds about half a minute (default 150)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for plots, summary and logs (default out/demo-<timestamp>)")
    parser.add_argument("--replicas", type=int, default=4, help="vLLM replicas, 3 to 8 (default 4)")
    parser.add_argument("--hot-rate", type=float, default=10.0, help="requests/s to the hot adapter (default 10)")
    parser.add_argument("--background-rate", type=float, default=0.4,
                        help="requests/s to every other adapter (default 0.4; half that in the quiet phase)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request arrival times")
    args = parser.parse_args(argv)
    if not 20 <= args.duration <= 3600:
        parser.error(f"--duration must be between 20 and 3600 seconds, got {args.duration:g}")
    if not 3 <= args.replicas <= 8:
        parser.error(f"--replicas must be between 3 (6 adapters, 2 LoRA slots a replica) and 8, got {args.replicas}")
    if not 0 < args.hot_rate <= 50:
        parser.error(f"--hot-rate must be above 0 and at most 50 requests/s, got {args.hot_rate:g}")
    if not 0 <= args.background_rate <= args.hot_rate:
        parser.error(f"--background-rate must be between 0 and --hot-rate, got {args.background_rate:g}")
    if args.out is None:
        args.out = Path("out") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return args


def count_lora_calls(addresses: dict[str, str]) -> dict[str, dict[str, int]]:
    """Successful load and unload calls per adapter, from each simulator's own event log."""
    import json

    loads: dict[str, int] = {}
    unloads: dict[str, int] = {}
    for address in addresses.values():
        try:
            events = json.loads(http_get(f"http://{address}/sim/events", timeout=3))["events"]
        except (OSError, ValueError, KeyError):
            continue
        for ev in events:
            counts = {"load": loads, "unload": unloads}.get(ev.get("kind"))
            if counts is not None and ev.get("status") == 200:
                counts[ev["adapter"]] = counts.get(ev["adapter"], 0) + 1
    return {"loads": loads, "unloads": unloads}


def live(cluster: DemoCluster, runner: LoadRunner, phases: list[Phase], *, duration: float, out: Path,
         samples: list[Sample]) -> None:
    """Sample (into ``samples``) and show the system every second until the load has finished (bounded)."""
    assert cluster.kube is not None
    observer = Observer(cluster.kube, NAMESPACE, AUTOSCALER, adapters=adapter_names(), pod_selector=POD_SELECTOR,
                        router_metrics_url=cluster.router_metrics_url)
    tty = sys.stdout.isatty()
    deadline = duration + REQUEST_TIMEOUT_SECONDS + 10
    with (out / "live.txt").open("w") as frames:
        tick = 0
        while True:
            t = runner.elapsed()
            sample = observer.sample(t)
            samples.append(sample)
            records = list(runner.records)
            ok = sum(1 for r in records if r.status == 200)
            recent = [r.latency for r in records if r.status == 200 and r.start + r.latency >= t - 10]
            progress = Progress(min(t, duration), duration, phase_at(phases, t), runner.sent, ok, len(records) - ok,
                                runner.in_flight, percentile(recent, 50), percentile(recent, 99))
            screen = render(sample, progress, phases, AUTOSCALER)
            frames.write(f"--- t={t:.1f}s\n{screen}\n")
            if tty:
                sys.stdout.write(CLEAR + screen + "\n")
                sys.stdout.flush()
            elif tick % NON_TTY_FRAME_EVERY == 0:
                print(f"--- t={t:.0f}s\n{screen}\n", flush=True)
            if runner.done() or t > deadline:
                return
            tick += 1
            time.sleep(max(0.0, tick - runner.elapsed()))


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so both take the same clean-up path."""

    signum = signal.SIGTERM


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def _still_cleaning_up(signum: int, frame: FrameType | None) -> None:
    print("still cleaning up, one moment", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def say(message: str) -> None:
        print(f"[demo {time.monotonic() - t0:5.1f}s] {message}", flush=True)

    phases = plan_phases(args.duration, adapter_names(), hot_rate=args.hot_rate,
                         background_rate=args.background_rate)
    cluster = DemoCluster(out, say)
    runner: LoadRunner | None = None
    samples: list[Sample] = []
    lora_calls: dict[str, dict[str, int]] = {}
    code = 0
    # A shell that starts the demo in the background without job control leaves SIGINT ignored; SIGTERM
    # (what `kill` and process managers send) is always honoured, with the same clean-up as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        cluster.start()
        cluster.deploy(args.replicas)
        plan = arrivals(phases, args.seed)
        say(f"load: {len(plan)} requests over {args.duration:.0f}s through the router: "
            + "; ".join(f"{p.name} {p.start:.0f}-{p.end:.0f}s" for p in phases))
        runner = LoadRunner(cluster.router_url, plan)
        runner.start()
        live(cluster, runner, phases, duration=args.duration, out=out, samples=samples)
        lora_calls = count_lora_calls(cluster.pod_addresses())
    except KeyboardInterrupt as exc:
        code = 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
        print("\ninterrupted: stopping everything the demo started", flush=True)
    except Exception as exc:
        code = 1
        print(f"\ndemo failed: {exc}\nlogs are in {out / 'logs'}", file=sys.stderr, flush=True)
    finally:
        previous = {sig: signal.signal(sig, _still_cleaning_up) for sig in (signal.SIGINT, signal.SIGTERM)}
        if runner is not None:
            runner.stop()
        cluster.stop()
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    pids = started_pids()
    left = [pid for pid in pids if pid_alive(pid)]
    say(f"still running, though they should not be: {left}" if left else
        f"all {len(pids)} processes the demo started are stopped")
    if left and code == 0:
        code = 1
    if runner is None or not samples:
        return code or 1
    records = list(runner.records)
    summary = summarise(records, phases, samples, lora_calls, interrupted=code > 128)
    plots = write_plots(out, samples, records, phases)
    summary["processes"] = {"pids": pids, "left_running": left}
    summary["files"] = {"plots": [str(p) for p in plots], "logs": str(out / "logs"), "live": str(out / "live.txt")}
    write_json(out / "summary.json", summary)
    print("\n" + format_summary(summary) + "\n")
    print(f"plots:   {', '.join(str(p) for p in plots)}\nsummary: {out / 'summary.json'}\nlogs:    {out / 'logs'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
