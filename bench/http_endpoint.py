"""GET /v1/audit-events through a real HTTP server: the baseline and the enhanced endpoint, and a fixed body.

Three server processes, each the same standard-library server (enhanced_audit/server.py: HTTP/1.1,
a thread per connection) on 127.0.0.1:
- baseline: the endpoint's query parsing (enhanced_audit/wsgi.py), then json.dumps of the baseline's
  answer, got through its published surface only: its _pick_query set to return the request's
  query (thread-local), then handle_request();
- enhanced: `enhanced_audit_log_service.make_app()`, the body from execute_json();
- fixed: a WSGI application sending a fixed 12-byte JSON body without looking at the request: the
  server's own ceiling on this machine (`--fixed-bytes N`: a body of N bytes, e.g. a page's mean
  size, to see what sending the bytes costs).
The load comes from separate client processes (http.client, one persistent connection per thread,
closed loop: the next request when the answer is read), at most --clients processes, the
connections split evenly between them: 1 connection = 1 process; 8 = 4 processes x 2; 20 = 4 x 5.
Workloads: the contract's draws (_pick_query, reseeded per round and client) and pages that hold
events (tests.support.pages_picker). Each run sends the same requests to each server in turn (a
round), --rounds rounds; each figure is the median of the rounds, and every round is printed.

RPS = requests / (last answer - first request sent), over all client processes (CLOCK_MONOTONIC).
Latency: from sending a request to having read its whole answer, in the client. Percentiles: linear
interpolation between the closest ranks of the sorted latencies, at rank (n - 1) * p (the
definition of runner.py's). Server CPU: the server process's user + system time over the run (from
/proc/<pid>/stat) per request, which splits the time between the server and the service: the
fixed server's is the server's own cost per request. Before timing, the baseline's and the
enhanced endpoint's bodies are compared byte for byte on a sample of both workloads.

    flock /tmp/bench.lock python3 bench/http_endpoint.py [--quick] [--rounds 3] [--requests 2000] [--json]

Named http_endpoint.py, not http.py: a script's folder comes first on sys.path, so a bench/http.py
would shadow the standard library's http package for every script in bench/.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the contract's paths are relative to the working directory

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from tests.contract import percentile  # noqa: E402  (runner.py's definition)

IMPLS = ("baseline", "enhanced", "fixed")
WORKLOADS = ("contract", "pages")
FIXED_BODY = b'{"ok": true}'
KEYS = ("rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "cpu_ms")
WARMUP = 5  # requests per connection before each run's clock starts
SAMPLE = 40  # queries of each workload whose bodies are compared between baseline and enhanced


# -- server processes -------------------------------------------------------------------------

def fixed_body(size):
    """A JSON body of `size` bytes (at least the 12 of FIXED_BODY)."""
    if size <= len(FIXED_BODY):
        return FIXED_BODY
    return b'{"pad": "' + b"x" * (size - 11) + b'"}'


def server_main(kind, fixed_bytes):
    """Serve `kind` on a free port; print it; stop when stdin closes (the parent went away)."""
    from enhanced_audit import server, wsgi
    if kind == "fixed":
        body = fixed_body(fixed_bytes)

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
    elif kind == "enhanced":
        import enhanced_audit_log_service as enhanced
        app = enhanced.make_app()
    else:
        import audit_log_service as baseline
        baseline.init()
        local = threading.local()
        baseline._pick_query = lambda: local.query  # the published way to answer a given query

        def page(query):
            local.query = query
            return json.dumps(baseline.handle_request()).encode()
        app = wsgi.Endpoint(page)
    srv = server.Server(("127.0.0.1", 0), app)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(srv.server_address[1], flush=True)
    sys.stdin.read()
    srv.shutdown()
    return 0


def start_server(kind, fixed_bytes):
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--server", kind,
                             "--fixed-bytes", str(fixed_bytes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"the {kind} server did not start")
    return proc, int(line)


def cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# -- client processes -------------------------------------------------------------------------

def client_main():
    """Read a job (port, targets per connection), connect and warm up, print "ready", wait for "go",
    send every target, print the latencies and the span."""
    job = json.loads(sys.stdin.readline())
    go = threading.Event()
    results = [None] * len(job["targets"])
    ready = threading.Barrier(len(job["targets"]) + 1)

    def connection(i, targets):
        conn = http.client.HTTPConnection("127.0.0.1", job["port"], timeout=120)
        for target in targets[:WARMUP]:
            conn.request("GET", target)
            conn.getresponse().read()
        ready.wait()
        go.wait()
        lat, bad = [], 0
        clock = time.perf_counter
        start = time.monotonic()
        for target in targets:
            t0 = clock()
            conn.request("GET", target)
            r = conn.getresponse()
            r.read()
            lat.append((clock() - t0) * 1000.0)
            bad += r.status != 200
        results[i] = (start, time.monotonic(), lat, bad)
        conn.close()

    threads = [threading.Thread(target=connection, args=(i, t)) for i, t in enumerate(job["targets"])]
    for t in threads:
        t.start()
    ready.wait()
    print("ready", flush=True)
    sys.stdin.readline()
    before = os.times()
    go.set()
    for t in threads:
        t.join()
    after = os.times()
    print(json.dumps({"start": min(r[0] for r in results), "end": max(r[1] for r in results),
                      "lat": [x for r in results for x in r[2]], "bad": sum(r[3] for r in results),
                      "cpu": after.user + after.system - before.user - before.system}), flush=True)
    return 0


def run(port, pid, targets, conns, max_clients):
    """One timed run: `targets` split over `conns` connections in min(conns, max_clients) processes."""
    nproc = min(conns, max_clients)
    per_conn = [targets[i::conns] for i in range(conns)]
    procs = []
    for p in range(nproc):
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps({"port": port, "targets": per_conn[p::nproc]}) + "\n")
        proc.stdin.flush()
        procs.append(proc)
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a client process failed")
    cpu0 = cpu_seconds(pid)
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [json.loads(proc.stdout.readline()) for proc in procs]
    cpu1 = cpu_seconds(pid)
    for proc in procs:
        proc.stdin.close()
        proc.wait()
    lat = [x for o in outs for x in o["lat"]]
    span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    out = {"rps": len(lat) / span, "bad": sum(o["bad"] for o in outs), "clients": nproc,
           "client_cpu_share": sum(o["cpu"] for o in outs) / span,  # cores the clients kept busy
           "cpu_ms": (cpu1 - cpu0) * 1000 / len(lat) if cpu0 is not None and cpu1 is not None else float("nan")}
    for p in (50, 90, 95, 99):
        out[f"p{p}_ms"] = percentile(lat, p / 100)
    return out


# -- the driver -------------------------------------------------------------------------------

def targets_for(workload, n, seed):
    import audit_log_service as baseline
    from tests.support import pages_picker
    if workload == "contract":
        baseline._rng.seed(seed)
        pick = baseline._pick_query
    else:
        pick = pages_picker(seed=seed)
    out = []
    for _ in range(n):
        q = pick()
        params = [("from_ts", q.from_ts), ("to_ts", q.to_ts), ("actor_id", q.actor_id), ("action", q.action),
                  ("page", q.page), ("page_size", q.page_size)]
        out.append("/v1/audit-events?" + "&".join(f"{k}={v}" for k, v in params if v is not None))
    return out


def same_bodies(ports, targets):
    """How many targets get byte-equal 200 bodies from the baseline and the enhanced server."""
    conns = {k: http.client.HTTPConnection("127.0.0.1", ports[k], timeout=120) for k in ("baseline", "enhanced")}
    equal = 0
    for target in targets:
        bodies = []
        for conn in conns.values():
            conn.request("GET", target)
            r = conn.getresponse()
            bodies.append((r.status, r.read()))
        equal += bodies[0] == bodies[1] and bodies[0][0] == 200
    for conn in conns.values():
        conn.close()
    return equal


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 300 requests a run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="requests a run")
    parser.add_argument("--conns", default="1,8,20", help="connections, comma-separated")
    parser.add_argument("--clients", type=int, default=4, help="at most this many client processes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--json", action="store_true", help="also print every round as JSON")
    parser.add_argument("--fixed-bytes", type=int, default=len(FIXED_BODY),
                        help="the fixed body's size (default 12; a page's size shows what sending its bytes costs)")
    parser.add_argument("--server", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        return server_main(args.server, args.fixed_bytes)
    if args.client:
        return client_main()
    if args.quick:
        args.rounds, args.requests = 1, 300
    from tests.support import fingerprint
    print("fingerprint: %s (sha256 of %d source files)" % fingerprint())
    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()}, {os.cpu_count()} cpus; "
          f"{args.requests} requests a run, {args.rounds} round(s), at most {args.clients} client processes, "
          f"fixed body {len(fixed_body(args.fixed_bytes))} bytes")
    servers = {}
    try:
        for kind in IMPLS:
            servers[kind] = start_server(kind, args.fixed_bytes)
        ports = {k: port for k, (_, port) in servers.items()}
        sample = targets_for("contract", SAMPLE, 1) + targets_for("pages", SAMPLE, 1)
        equal = same_bodies(ports, sample)
        print(f"bodies byte-equal, baseline vs enhanced: {equal}/{len(sample)}")
        everything = []
        for workload in args.workloads.split(","):
            for conns in (int(c) for c in args.conns.split(",")):
                rounds = {k: [] for k in IMPLS}
                for r in range(args.rounds):
                    targets = targets_for(workload, args.requests, 1000 * r + conns)
                    for kind in IMPLS:
                        proc, port = servers[kind]
                        rounds[kind].append(run(port, proc.pid, targets, conns, args.clients))
                report(workload, conns, rounds, args.requests)
                everything.append({"workload": workload, "conns": conns, "rounds": rounds})
        if args.json:
            print(json.dumps(everything, indent=1))
        return 0 if equal == len(sample) else 1
    finally:
        for proc, _ in servers.values():
            proc.stdin.close()
            proc.wait()


def report(workload, conns, rounds, requests):
    med = {k: {m: statistics.median(r[m] for r in rs) for m in KEYS} for k, rs in rounds.items()}
    print(f"\n{workload}, {conns} connection(s), {rounds['baseline'][0]['clients']} client process(es), "
          f"{requests} requests a run")
    print(f"  {'impl':<9}{'rps':>9}{'p50 ms':>9}{'p90 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'cpu ms/req':>12}"
          f"{'client cpu':>12}  rounds: rps / p99 ms")
    for kind in IMPLS:
        m, rs = med[kind], rounds[kind]
        bad = sum(r["bad"] for r in rs)
        share = statistics.median(r["client_cpu_share"] for r in rs)
        print(f"  {kind:<9}{m['rps']:>9.0f}" + "".join(f"{m[k]:>9.2f}" for k in KEYS[1:5]) + f"{m['cpu_ms']:>12.3f}"
              f"{share:>11.2f}c  " + "/".join(f"{r['rps']:.0f}" for r in rs) + "  "
              + "/".join(f"{r['p99_ms']:.2f}" for r in rs) + (f"  NON-200: {bad}" if bad else ""))
    b, e, f = med["baseline"], med["enhanced"], med["fixed"]
    per_round = [(er["rps"] / br["rps"], br["p99_ms"] / er["p99_ms"], er["rps"] / fr["rps"])
                 for br, er, fr in zip(rounds["baseline"], rounds["enhanced"], rounds["fixed"])]
    print(f"  enhanced vs baseline: rps {e['rps'] / b['rps']:.1f}x, p99 {b['p99_ms'] / e['p99_ms']:.1f}x shorter; "
          f"enhanced / fixed-body ceiling: {e['rps'] / f['rps']:.2f}  (rounds: "
          + ", ".join(f"{a:.1f}x/{p:.1f}x/{c:.2f}" for a, p, c in per_round) + ")")


if __name__ == "__main__":
    sys.exit(main())
