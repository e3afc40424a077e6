"""Load driver for a running hiresfix service (issue 11, "Survive load"): plain httpx + asyncio.

    python bench/load.py --clients 68 --duration 60                 # closed-loop mixed load
    python bench/load.py --burst 300 --duration 0                   # hundreds at once, then health
    python bench/load.py --clients 68 --duration 60 --burst 300 --json-out out/load.json

Load: N clients, each sending one request after another for --duration seconds, the route drawn from
--mix (weights for generate256 / hires / upscale). A client that gets a 503 waits its Retry-After
(capped by --backoff-cap) before the next request, as a well-behaved client would.
Burst: N requests released at the same instant; the time each took to be answered, from then.
After a burst: GET /health and one plain request, to see the service serve normally right after.

Prints per route: count, req/s, p50/p90/p99 latency, status-code counts, connection errors,
timeouts, and for 503s whether Retry-After was present and the body has the service's error shape
`{"error": str, "detail": ...}`. Exits 1 on any 5xx other than 503, any connection error or any
hang (a request that hits --timeout). Every loop is bounded in count and in time; only loopback URLs
are accepted. Requests are cheap: 256 px / 4 steps, hires 256 -> 512 with 2 hires steps, /upscale
of a 96 px PNG made in memory.

The pieces are importable (tests/test_load.py): run_load, run_burst, check_recovery, failures,
report.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import httpx

ROUTES = ("generate256", "hires", "upscale")
DEFAULT_MIX = {"generate256": 0.6, "hires": 0.2, "upscale": 0.2}
MAX_REQUESTS_PER_CLIENT = 10_000  # a second bound beside the duration: no loop runs unbounded


# ----------------------------------------------------------------------------------------- requests
def small_png_b64(size: int = 96) -> str:
    """A small RGB PNG with some structure (gradients and shapes), made in memory with Pillow."""
    from PIL import Image, ImageDraw

    g = Image.linear_gradient("L").resize((size, size))
    r = Image.radial_gradient("L").resize((size, size))
    im = Image.merge("RGB", (g, r, g.transpose(Image.Transpose.ROTATE_90)))
    d = ImageDraw.Draw(im)
    d.ellipse((size // 4, size // 4, size // 2, size // 2), fill=(200, 40, 40))
    d.rectangle((size // 2, size // 2, size - 8, size - 8), outline=(20, 220, 60), width=3)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request_for(route: str, seed: int, png_b64: str) -> tuple[str, dict]:
    """(path, JSON body) of one cheap request of the given kind."""
    if route == "generate256":
        return "/generate", {
            "prompt": "a lighthouse at dusk",
            "width": 256,
            "height": 256,
            "num_inference_steps": 4,
            "seed": seed,
        }
    if route == "hires":
        return "/generate", {
            "prompt": "a lighthouse at dusk",
            "width": 256,
            "height": 256,
            "num_inference_steps": 4,
            "seed": seed,
            "hires_fix": True,
            "hires_scale": 2,
            "hires_steps": 2,
            "denoising_strength": 0.5,
        }
    if route == "upscale":
        return "/upscale", {"image": png_b64, "scale": 2}
    if route == "refused":  # the stack's own floor: the ingress answers 422, no stage is called
        return "/generate", {"prompt": "a lighthouse at dusk", "width": 100, "seed": seed}
    raise ValueError(f"unknown route {route!r}; one of {', '.join(ROUTES)}")


def parse_mix(text: str) -> dict[str, float]:
    """'generate256=3,hires=1,upscale=1' or '3,1,1' (in ROUTES order)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all("=" not in p for p in parts):
        if len(parts) != len(ROUTES):
            raise ValueError(
                f"--mix needs {len(ROUTES)} weights ({', '.join(ROUTES)}), got {text!r}"
            )
        mix = dict(zip(ROUTES, map(float, parts)))
    else:
        mix = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts)}
    unknown = set(mix) - set(ROUTES)
    if unknown or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(
            f"bad --mix {text!r}: routes are {', '.join(ROUTES)}, weights >= 0, not all 0"
        )
    return mix


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"{url}: this driver only targets loopback (127.0.0.1, ::1, localhost)")


# ------------------------------------------------------------------------------------------ results
@dataclass
class Result:
    route: str
    latency: float  # seconds, send to answer (burst: from the common release instant)
    status: int | None = None  # None: no HTTP answer
    error: str | None = None  # "connection" or "timeout" when there was no answer
    error_detail: str | None = None
    retry_after: str | None = None
    error_shape: bool | None = None  # for answers >= 400: {"error": str, "detail": ...}
    body_excerpt: str | None = None  # for answers >= 400
    content_type: str | None = None  # for answers >= 400


def _has_error_shape(resp: httpx.Response) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str) and "detail" in body


async def send(
    client: httpx.AsyncClient,
    url: str,
    route: str,
    seed: int,
    png_b64: str,
    t0: float | None = None,
) -> Result:
    """One request; never raises for HTTP-level trouble (it is what is being measured)."""
    path, body = request_for(route, seed, png_b64)
    start = time.perf_counter() if t0 is None else t0
    try:
        resp = await client.post(url + path, json=body)
    except httpx.TimeoutException as exc:
        return Result(
            route,
            time.perf_counter() - start,
            error="timeout",
            error_detail=f"{type(exc).__name__}: {exc}",
        )
    except httpx.HTTPError as exc:  # connect refused/reset, server disconnected, protocol errors
        return Result(
            route,
            time.perf_counter() - start,
            error="connection",
            error_detail=f"{type(exc).__name__}: {exc}"[:300],
        )
    res = Result(
        route,
        time.perf_counter() - start,
        status=resp.status_code,
        retry_after=resp.headers.get("retry-after"),
    )
    if resp.status_code >= 400:
        res.error_shape = _has_error_shape(resp)
        res.body_excerpt = resp.text[:300]
        res.content_type = resp.headers.get("content-type")
    return res


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))
    return v[k]


def _lat(values: list[float]) -> dict:
    return {
        "n": len(values),
        "min": min(values) if values else None,
        "p10": _pct(values, 10),
        "p50": _pct(values, 50),
        "p90": _pct(values, 90),
        "p99": _pct(values, 99),
        "max": max(values) if values else None,
    }


def _routes(results: list[Result]) -> list[str]:
    return list(dict.fromkeys(r.route for r in results))


def summarize(results: list[Result], elapsed: float) -> dict:
    """Per route and overall: counts, req/s, latency percentiles (all answers, 200s, 503s), status
    codes, connection errors, timeouts, and what the 503s carried."""

    def one(rs: list[Result]) -> dict:
        answered = [r for r in rs if r.status is not None]
        statuses: dict[str, int] = {}
        for r in answered:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        s503 = [r for r in answered if r.status == 503]
        errs = [r for r in answered if r.status >= 400]
        return {
            "count": len(rs),
            "rps": len(answered) / elapsed if elapsed > 0 else None,
            "ok_rps": sum(r.status == 200 for r in answered) / elapsed if elapsed > 0 else None,
            "latency": _lat([r.latency for r in answered]),
            "latency_200": _lat([r.latency for r in answered if r.status == 200]),
            "latency_503": _lat([r.latency for r in s503]),
            "statuses": dict(sorted(statuses.items())),
            "connection_errors": sum(r.error == "connection" for r in rs),
            "timeouts": sum(r.error == "timeout" for r in rs),
            "503_with_retry_after": sum(r.retry_after is not None for r in s503),
            "503_with_error_shape": sum(bool(r.error_shape) for r in s503),
            "errors_with_error_shape": sum(bool(r.error_shape) for r in errs),
            "errors": len(errs),
        }

    by_route = {route: one([r for r in results if r.route == route]) for route in _routes(results)}
    # A few distinct examples of every non-200 answer and of every failure without one.
    examples: dict[str, list[dict]] = {}
    for r in results:
        if r.status == 200:
            continue
        key = str(r.status) if r.status is not None else r.error
        bucket = examples.setdefault(key, [])
        sample = {
            "route": r.route,
            "retry_after": r.retry_after,
            "error_shape": r.error_shape,
            "content_type": r.content_type,
            "body": r.body_excerpt or r.error_detail,
        }
        if len(bucket) < 3 and sample not in bucket:
            bucket.append(sample)
    return {"elapsed_s": elapsed, "routes": by_route, "total": one(results), "examples": examples}


# --------------------------------------------------------------------------------------------- load
def _client(clients: int, timeout: float) -> httpx.AsyncClient:
    # Enough connections that no request waits for the pool (that wait would be the driver's, not
    # the service's); the pool wait is still bounded by the same timeout.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        trust_env=False,
        limits=httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8),
    )


def _retry_after_s(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0


async def run_load(
    url: str,
    clients: int,
    duration: float,
    mix: dict[str, float] | None = None,
    timeout: float = 120.0,
    seed: int = 0,
    backoff_cap: float = 1.0,
    max_requests_per_client: int = MAX_REQUESTS_PER_CLIENT,
) -> dict:
    """`clients` closed-loop clients for `duration` seconds (requests in flight at the end finish,
    each bounded by `timeout`). Returns summarize(...) plus the parameters."""
    check_loopback(url)
    url = url.rstrip("/")
    mix = mix or DEFAULT_MIX
    routes, weights = zip(*[(k, v) for k, v in mix.items() if v > 0])
    png = small_png_b64()
    results: list[Result] = []
    t_start = time.perf_counter()
    deadline = t_start + duration

    async def client_loop(ci: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 100_003 + ci)
        for n in range(max_requests_per_client):
            if time.perf_counter() >= deadline:
                return
            res = await send(http, url, rng.choices(routes, weights)[0], ci * 1_000_003 + n, png)
            results.append(res)
            if res.status == 503 or res.error is not None:
                # Back off as a client should, but never past the end of the run.
                wait = min(
                    _retry_after_s(res.retry_after),
                    backoff_cap,
                    max(0.0, deadline - time.perf_counter()),
                )
                await asyncio.sleep(wait)

    async with _client(clients, timeout) as http:
        await asyncio.gather(*(client_loop(i, http) for i in range(clients)))
    out = summarize(results, time.perf_counter() - t_start)
    out["params"] = {
        "url": url,
        "clients": clients,
        "duration_s": duration,
        "mix": dict(mix),
        "timeout_s": timeout,
        "backoff_cap_s": backoff_cap,
    }
    return out


async def run_burst(url: str, n: int, route: str = "generate256", timeout: float = 120.0) -> dict:
    """`n` requests released at the same instant; latency = time from that instant to the answer.
    `route` may list several ("generate256,refused"): request i takes the (i mod k)-th, so each
    route's figures are measured under the very same burst (a reference in the same run)."""
    check_loopback(url)
    routes = [r.strip() for r in route.split(",") if r.strip()]
    for r in routes:
        request_for(r, 0, "")  # an unknown route fails here, before the burst
    url = url.rstrip("/")
    png = small_png_b64()
    go = asyncio.Event()
    t0: list[float] = []

    async def one(i: int, http: httpx.AsyncClient) -> Result:
        await go.wait()
        return await send(http, url, routes[i % len(routes)], 7_000_000 + i, png, t0=t0[0])

    async with _client(n, timeout) as http:
        tasks = [asyncio.create_task(one(i, http)) for i in range(n)]
        await asyncio.sleep(0)  # every task is parked on the event
        t0.append(time.perf_counter())
        go.set()
        results = await asyncio.gather(*tasks)
    out = summarize(list(results), time.perf_counter() - t0[0])
    out["params"] = {"url": url, "burst": n, "route": route, "timeout_s": timeout}
    return out


def client_baseline(n: int, timeout: float = 30.0) -> dict:
    """The same burst against an in-process server that answers 503 at once (its own thread and
    event loop): what this client and this box add to every time-to-answer, the floor for
    run_burst's figures."""
    import threading

    ready = threading.Event()
    box: dict = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # one request per connection, then close: no handler outlives the burst
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            body = b'{"error": "busy", "detail": []}'
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n"
                b"content-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096))
        box["port"], box["loop"] = server.sockets[0].getsockname()[1], loop
        ready.set()
        loop.run_forever()
        server.close()
        loop.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(10)
    try:
        out = asyncio.run(run_burst(f"http://127.0.0.1:{box['port']}", n, timeout=timeout))
    finally:
        box["loop"].call_soon_threadsafe(box["loop"].stop)
        t.join(10)
    out["params"]["baseline"] = True
    return out


async def check_recovery(url: str, timeout: float = 120.0) -> dict:
    """Right after a burst: GET /health, then one plain 256 px request."""
    check_loopback(url)
    url = url.rstrip("/")
    out: dict = {}
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
        t = time.perf_counter()
        try:
            h = await http.get(url + "/health")
            body = (
                h.json()
                if h.headers.get("content-type", "").startswith("application/json")
                else None
            )
            out["health"] = {
                "status_code": h.status_code,
                "status": (body or {}).get("status"),
                "seconds": time.perf_counter() - t,
                "states": {
                    k: v.get("state") for k, v in (body or {}).get("deployments", {}).items()
                },
            }
        except httpx.HTTPError as exc:
            out["health"] = {"status_code": None, "error": f"{type(exc).__name__}: {exc}"}
        res = await send(http, url, "generate256", 424242, "")
        out["request"] = asdict(res)
    return out


# ----------------------------------------------------------------------------------------- verdicts
def failures(summary: dict) -> list[str]:
    """What breaks the issue's rule: any 5xx other than 503, any connection error, any hang."""
    bad = []
    for route, s in summary["routes"].items():
        other5xx = {k: v for k, v in s["statuses"].items() if k.startswith("5") and k != "503"}
        if other5xx:
            bad.append(f"{route}: 5xx other than 503: {other5xx}")
        if s["connection_errors"]:
            bad.append(f"{route}: {s['connection_errors']} connection errors")
        if s["timeouts"]:
            bad.append(f"{route}: {s['timeouts']} hangs (no answer within the client timeout)")
    return bad


def warnings(summary: dict) -> list[str]:
    """Contract points that do not change the exit code: what a 503 carries, other statuses."""
    out = []
    for route, s in summary["routes"].items():
        n503 = s["statuses"].get("503", 0)
        if n503 and s["503_with_retry_after"] < n503:
            out.append(
                f"{route}: {n503 - s['503_with_retry_after']} of {n503} 503s without Retry-After"
            )
        if n503 and s["503_with_error_shape"] < n503:
            out.append(
                f"{route}: {n503 - s['503_with_error_shape']} of {n503} 503s without the error"
                " shape"
                ' {"error": str, "detail": ...}'
            )
        others = {
            k: v
            for k, v in s["statuses"].items()
            if k not in ("200", "503") and not k.startswith("5")
        }
        if others:
            out.append(f"{route}: statuses other than 200/503: {others}")
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def report(summary: dict, title: str) -> str:
    lines = [f"== {title} ({summary['elapsed_s']:.1f} s)"]
    hdr = (
        f"{'route':<12}{'count':>7}{'req/s':>8}{'200/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'503 p50':>9}{'conn err':>9}{'timeout':>8}  statuses"
    )
    lines.append(hdr)
    rows = list(summary["routes"].items()) + [("all", summary["total"])]
    for route, s in rows:
        lat = s["latency"]
        lines.append(
            f"{route:<12}{s['count']:>7}{s['rps'] or 0:>8.2f}{s['ok_rps'] or 0:>8.2f}"
            f"{_ms(lat['p50']):>9}"
            f"{_ms(lat['p90']):>9}{_ms(lat['p99']):>9}{_ms(s['latency_503']['p50']):>9}"
            f"{s['connection_errors']:>9}{s['timeouts']:>8}  "
            + " ".join(f"{k}:{v}" for k, v in s["statuses"].items())
        )
    lines.append(
        f"{'route':<12}{'200 p50':>9}{'200 p90':>9}{'200 p99':>9}{'503 min':>9}{'503 p10':>9}"
        f"{'503 p90':>9}{'503 max':>9}   503s: with Retry-After / error shape"
    )
    for route, s in rows:
        l2, l5 = s["latency_200"], s["latency_503"]
        n503 = s["statuses"].get("503", 0)
        lines.append(
            f"{route:<12}{_ms(l2['p50']):>9}{_ms(l2['p90']):>9}{_ms(l2['p99']):>9}{_ms(l5['min']):>9}"
            f"{_ms(l5['p10']):>9}{_ms(l5['p90']):>9}{_ms(l5['max']):>9}   "
            + (
                f"{s['503_with_retry_after']}/{n503} / {s['503_with_error_shape']}/{n503}"
                if n503
                else "-"
            )
        )
    for key, samples in summary["examples"].items():
        for ex in samples:
            lines.append(
                f"  example {key} ({ex['route']}): retry-after={ex['retry_after']!r}"
                f" content-type={ex['content_type']!r} error_shape={ex['error_shape']}"
                f" body={(ex['body'] or '')[:200]!r}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
async def _main(args: argparse.Namespace) -> int:
    mix = parse_mix(args.mix)
    out: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    bad: list[str] = []
    notes: list[str] = []
    if args.duration > 0 and args.clients > 0:
        load = await run_load(
            args.url, args.clients, args.duration, mix, args.timeout, args.seed, args.backoff_cap
        )
        out["load"] = load
        p = load["params"]
        print(
            report(
                load,
                f"load: {p['clients']} clients, {p['duration_s']:.0f} s, mix {p['mix']},"
                f" timeout {p['timeout_s']:.0f} s",
            ),
            flush=True,
        )
        bad += [f"load {b}" for b in failures(load)]
        notes += [f"load {w}" for w in warnings(load)]
    if args.burst > 0:
        burst = await run_burst(args.url, args.burst, args.burst_route, args.timeout)
        out["burst"] = burst
        print(
            report(
                burst,
                f"burst: {args.burst} x {args.burst_route} at once; latency from the release"
                f" instant, timeout {args.timeout:.0f} s",
            ),
            flush=True,
        )
        rec = await check_recovery(args.url, args.timeout)
        out["recovery"] = rec
        h, r = rec["health"], rec["request"]
        print(
            f"after the burst: /health {h.get('status_code')} {h.get('status')}"
            f" in {_ms(h.get('seconds'))} ms"
            f" {h.get('states') or h.get('error', '')}; generate256 -> {r['status'] or r['error']}"
            f" in {_ms(r['latency'])} ms",
            flush=True,
        )
        bad += [f"burst {b}" for b in failures(burst)]
        notes += [f"burst {w}" for w in warnings(burst)]
        if h.get("status") != "ok":
            bad.append(f"after the burst: /health is {h}")
        if r["status"] != 200:
            bad.append(
                f"after the burst: a plain request got {r['status'] or r['error']}:"
                f" {r['body_excerpt'] or r['error_detail']}"
            )
    for w in notes:
        print(f"WARN {w}")
    for b in bad:
        print(f"FAIL {b}")
    print("PASS" if not bad else "FAIL", flush=True)
    out["failures"], out["warnings"] = bad, notes
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--url", default="http://127.0.0.1:7860", help="service base URL (loopback only)"
    )
    ap.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    ap.add_argument(
        "--duration", type=float, default=30.0, help="seconds of load (0: no load phase)"
    )
    ap.add_argument(
        "--mix",
        default="generate256=0.6,hires=0.2,upscale=0.2",
        help="route weights: 'generate256=3,hires=1,upscale=1' or '3,1,1'",
    )
    ap.add_argument(
        "--burst", type=int, default=0, help="then fire N requests at once (0: no burst)"
    )
    ap.add_argument(
        "--burst-route",
        default="generate256",
        help=(
            f"one of {', '.join((*ROUTES, 'refused'))}, or several, comma-separated, interleaved;"
            " refused: a body the ingress answers with 422 itself (the serving stack's floor)"
        ),
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="client timeout per request; hitting it is a hang",
    )
    ap.add_argument(
        "--backoff-cap",
        type=float,
        default=1.0,
        help="after a 503 a client waits its Retry-After, at most this many seconds",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", help="write every figure as JSON here")
    args = ap.parse_args(argv)
    try:
        check_loopback(args.url)
        parse_mix(args.mix)
        for r in args.burst_route.split(","):
            request_for(r.strip(), 0, "")
    except ValueError as exc:
        ap.error(str(exc))
    if args.clients > 2000 or args.burst > 2000:
        ap.error("at most 2000 clients / burst requests")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
