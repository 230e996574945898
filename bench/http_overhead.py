"""What the HTTP layer costs `softprompt serve` and `softprompt ui`: start-up (the imports of
the server stack, then binding a port, in a fresh interpreter) and one request's overhead
(GET /api/v1/model round trips on loopback, one kept-alive connection, then a new
connection each time), for the standard-library base (softprompt/http.py, as `serve` uses
it) and, when installed, Starlette on uvicorn doing the same. Prints figures; asserts
nothing. docs/architecture.md quotes them.

    python bench/http_overhead.py [--requests 1000]
    pip install starlette uvicorn   # in a scratch venv, to compare with a framework
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent

# each prints the seconds from its first line to a bound, listening socket
STARTUP = {
    "stdlib (softprompt.http)": f"""
        import time; t0 = time.perf_counter()
        import importlib.util
        spec = importlib.util.spec_from_file_location("sphttp", {str(ROOT / "softprompt" / "http.py")!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        class A(m.App):
            routes = m.Router()
        A.routes.add("GET", "/api/v1/model", lambda r: m.send_json(r, 200, {{"result": "x"}}))
        listener = m.Listener(A(), "127.0.0.1", 0)
        print(time.perf_counter() - t0)
    """,
    "starlette + uvicorn": """
        import time; t0 = time.perf_counter()
        import threading
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route
        async def model(request):
            return JSONResponse({"result": "x"})
        app = Starlette(routes=[Route("/api/v1/model", model)])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.001)
        print(time.perf_counter() - t0)
    """,
}


def startup(code: str, runs: int) -> float | None:
    times = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True
        )
        if done.returncode != 0:
            if "ModuleNotFoundError" not in done.stderr:
                print(done.stderr, file=sys.stderr)
            return None
        times.append(float(done.stdout.split()[-1]))
    return statistics.median(times)


def round_trips(port: int, n: int, keep_alive: bool) -> float:
    """Median of three rounds: microseconds per GET /api/v1/model."""
    rounds = []
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(50):  # warm up
            conn.request("GET", "/api/v1/model")
            conn.getresponse().read()
        t0 = time.perf_counter()
        for _ in range(n):
            if not keep_alive:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/api/v1/model")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        rounds.append((time.perf_counter() - t0) / n * 1e6)
        conn.close()
    return statistics.median(rounds)


def stdlib_server() -> tuple[int, object]:
    sys.path.insert(0, str(ROOT))
    from softprompt.serve import Server

    lm = SimpleNamespace(bos_ids=[], model=None, name="bench-model", context_length=2048)
    srv = Server(lm, port=0)  # the real serve: its route table, API key check, CORS
    return srv.start(), srv.close


def starlette_server(http: str) -> tuple[int, object] | None:
    """Starlette on uvicorn with its ``http`` implementation (h11: pure Python; httptools: C,
    what ``uvicorn[standard]`` brings), the same CORS headers as serve's."""
    try:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        if http == "httptools":
            import httptools  # noqa: F401
    except ImportError:
        return None

    async def model(request):
        return JSONResponse({"result": "bench-model"})

    app = Starlette(
        routes=[Route("/api/v1/model", model)],
        middleware=[Middleware(CORSMiddleware, allow_origins=["*"], allow_headers=["*"])],
    )
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def close():
        server.should_exit = True
        thread.join(10)

    return server.servers[0].sockets[0].getsockname()[1], close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--startups", type=int, default=5)
    args = parser.parse_args()
    print("start-up: imports + bind, fresh interpreter, median of", args.startups)
    for name, code in STARTUP.items():
        took = startup(code, args.startups)
        print(f"  {name:32s} " + ("not installed" if took is None else f"{took * 1e3:7.1f} ms"))
    print(f"one request: GET /api/v1/model, {args.requests} round trips, median of 3 rounds")
    for name, make in (
        ("stdlib (softprompt serve)", stdlib_server),
        ("starlette + uvicorn (h11)", lambda: starlette_server("h11")),
        ("starlette + uvicorn (httptools)", lambda: starlette_server("httptools")),
    ):
        made = make()
        if made is None:
            print(f"  {name:32s} not installed")
            continue
        port, close = made
        try:
            kept = round_trips(port, args.requests, keep_alive=True)
            fresh = round_trips(port, args.requests // 4, keep_alive=False)
        finally:
            close()
        print(f"  {name:32s} {kept:6.0f} us kept-alive, {fresh:6.0f} us on a new connection")


if __name__ == "__main__":
    main()
