"""API smoke test with a client the project did not write (nats-py), against the worker
binaries started by `chctl up` (real processes, as a user runs them).

Checks the NATS services API ($SRV.PING/INFO/STATS), commands with exponent-notation
numbers, an error reply's headers and body, the stored event envelope, a re-used
`command_id`, and read-your-writes
(a query that cannot be answered is refused before its wait), comparing figures with a
small model of DOMAIN.md written here. Prints 'N passed, N failed'; exit status 1 on failure.

Environment: CH_NATS_URL, CH_SUBJECT_PREFIX.
"""

import asyncio
import json
import os
import sys
import uuid
from decimal import ROUND_HALF_EVEN, Decimal

import nats

URL = os.environ.get("CH_NATS_URL", "nats://127.0.0.1:14222")
P = os.environ.get("CH_SUBJECT_PREFIX", "ch")
SERVICES = ["cmd-strategy", "cmd-portfolio", "cmd-signal", "cmd-market",
            "proj-portfolio", "proj-strategy", "query-portfolio", "query-strategy"]

passed, failed = 0, 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name}: {detail}", file=sys.stderr)


def round8(d):
    return d.quantize(Decimal("0.00000001"), rounding=ROUND_HALF_EVEN)


async def collect(nc, subject, done=lambda replies: len(replies) >= 1, limit=10.0):
    """Publishes to a $SRV subject and gathers replies until `done(replies)` holds (by
    default: one reply), or `limit` seconds have passed (then what came is returned, and
    the checks on it say what is missing)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    replies = []
    deadline = asyncio.get_running_loop().time() + limit
    try:
        while not done(replies):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            msg = await sub.next_msg(timeout=left)
            replies.append(json.loads(msg.data))
    except (asyncio.TimeoutError, nats.errors.TimeoutError):
        pass
    await sub.unsubscribe()
    return replies


async def req(nc, suffix, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(f"{P}.{suffix}", data, timeout=10)
    headers = msg.headers or {}
    return headers, json.loads(msg.data)


async def main():
    nc = await nats.connect(URL)
    expected = {f"{P}-{s}" for s in SERVICES}
    pings = await collect(nc, "$SRV.PING", done=lambda rs: expected <= {r["name"] for r in rs})
    names = {r["name"] for r in pings}
    for s in SERVICES:
        check(f"ping {s}", f"{P}-{s}" in names, sorted(names))

    info = await collect(nc, f"$SRV.INFO.{P}-cmd-portfolio")
    subjects = [e["subject"] for i in info for e in i.get("endpoints", [])]
    check("info lists the endpoint", f"{P}.cmd.portfolio.update" in subjects, info)

    run = uuid.uuid4().hex[:8]
    sid, pid = f"s-{run}", f"p-{run}"
    h, r = await req(nc, "cmd.strategy.create", {
        "strategy_id": sid, "user_id": "py", "strategy_name": "py smoke",
        "rules": [{"rule_id": "r1", "symbol": "BTC-USDT",
                   "stake": {"mode": "fixed_quote", "value": 1000}}],
        "risk_profile": {"allowed_symbols": ["BTC-USDT"], "max_open_positions": 2,
                         "max_order_notional": 100000, "max_position_notional": "100000",
                         "max_leverage": 1}})
    check("strategy created", r.get("aggregate_id") == sid and r.get("version") == 1, r)

    await req(nc, "cmd.portfolio.update", {"portfolio_id": pid, "op": "open", "user_id": "py",
                                           "name": "py", "quote_currency": "USDT"})
    # A JSON number in exponent notation, parsed exactly.
    body = ('{"portfolio_id": "%s", "op": "deposit", "amount": 1.5e4}' % pid).encode()
    h, r = await req(nc, "cmd.portfolio.update", body)
    check("deposit 1.5e4", r.get("version") == 2, r)
    await req(nc, "cmd.portfolio.update", {"portfolio_id": pid, "op": "attach_strategy", "strategy_id": sid})

    # Independent model: buy q at p with the default fee rate 0.001.
    q, p = Decimal("0.12345678"), Decimal("30123.45")
    n = q * p
    fee = round8(n * Decimal("0.001"))
    cash = Decimal(15000) - n - fee
    h, r = await req(nc, "cmd.signal.execute", {"portfolio_id": pid, "strategy_id": sid,
                                                "symbol": "BTC-USDT", "side": "buy",
                                                "quantity": str(q), "price": str(p)})
    check("buy executed", r.get("status") == "executed", r)
    trade = r.get("trade", {})
    check("fee", Decimal(trade.get("fee", "NaN")) == fee, (trade, fee))
    check("cash_after", Decimal(trade.get("cash_after", "NaN")) == cash, (trade, cash))
    seq = r["stream_seq"]

    h, r = await req(nc, "cmd.portfolio.update", {"portfolio_id": pid, "op": "deposit", "amout": "1"})
    check("unknown field is 400", h.get("Nats-Service-Error-Code") == "400", h)
    check("error body", r.get("error", {}).get("code") == "bad_request" and "amout" in r["error"]["message"], r)

    h, r = await req(nc, "query.portfolio.performance", {"portfolio_id": pid, "min_stream_seq": seq, "timeout_ms": 10000})
    check("read your write", r.get("as_of_seq", 0) >= seq, r)
    check("query cash", Decimal(r.get("cash", "NaN")) == cash, (r.get("cash"), cash))
    check("query position", r.get("positions", [{}])[0].get("quantity") == str(q), r.get("positions"))
    check("invariant", Decimal(r["equity"]) - Decimal(r["net_deposits"])
          == Decimal(r["realized_pnl"]) + Decimal(r["unrealized_pnl"]), r)

    # The stored envelope: the client's correlation and causation ids, and `command_id`
    # named even when the command had none (API.md's envelope).
    await req(nc, "cmd.portfolio.update", {"portfolio_id": pid, "op": "deposit", "amount": "1",
                                           "correlation_id": f"flow-{run}",
                                           "causation_id": "py-cause"})
    stream = P.upper().replace("-", "_") + "_EVENTS"
    msg = await nc.jetstream().get_last_msg(stream, f"{P}.events.portfolio.{pid}")
    env = json.loads(msg.data)
    check("envelope ids", env.get("correlation_id") == f"flow-{run}"
          and env.get("causation_id") == "py-cause"
          and "command_id" in env and env["command_id"] is None, env)

    # A command_id names one intent: sent again with another amount it answers the first
    # result, marked as differing; used for another aggregate it is 409, nothing stored.
    cid = str(uuid.uuid4())
    h, first = await req(nc, "cmd.portfolio.update", {"portfolio_id": pid, "op": "deposit",
                                                      "amount": "2", "command_id": cid})
    h, again = await req(nc, "cmd.portfolio.update", {"portfolio_id": pid, "op": "deposit",
                                                      "amount": "3", "command_id": cid})
    check("re-sent with other fields", again.get("duplicate") is True
          and again.get("request_differs") is True
          and again.get("stream_seq") == first.get("stream_seq"), (first, again))
    h, r = await req(nc, "cmd.market.price", {"symbol": "ETH-USDT", "price": "1",
                                              "command_id": cid})
    check("command_id of another aggregate is 409", h.get("Nats-Service-Error-Code") == "409"
          and r.get("error", {}).get("code") == "command_id_reused"
          and cid in r.get("error", {}).get("message", ""), (h, r))
    msg = await nc.jetstream().get_last_msg(stream, f"{P}.events.portfolio.{pid}")
    env = json.loads(msg.data)
    check("envelope command_digest", env.get("command_id") == cid
          and env.get("command_digest", "").startswith("portfolio.update/deposit:"), env)

    # A value of the wrong type is named by its field.
    h, r = await req(nc, "cmd.portfolio.update", {"portfolio_id": pid, "op": "rename", "name": 5})
    check("type error names the field",
          r.get("error", {}).get("message", "").startswith("name: invalid type"), r)

    # An invalid id is refused at once, not after waiting 10 s for a stream sequence that
    # will not come.
    h, r = await req(nc, "query.portfolio.performance",
                     {"portfolio_id": "p.x", "min_stream_seq": seq + 10**9, "timeout_ms": 9000})
    check("bad query before its wait", h.get("Nats-Service-Error-Code") == "400", (h, r))

    stats = await collect(nc, f"$SRV.STATS.{P}-cmd-signal")
    reqs = sum(e.get("num_requests", 0) for s in stats for e in s.get("endpoints", []))
    check("stats count requests", reqs >= 1, stats)

    await nc.close()
    print(f"smoke: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
