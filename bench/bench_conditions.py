"""CEL condition micro-benchmark (numbers, not assertions).

    python bench/bench_conditions.py [--n 20000]

For three representative conditions: compile (type check + parse, done once per config load) and
evaluate including the build of the request's activation, which is what a condition adds to one
tools/call (goal: p50 < 50 µs). Also the type check against a tool's inputSchema, cold (a schema seen
for the first time: protobuf declarations + checker) and warm (cached declarations).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from gateway.conditions import ConditionInput, ConditionUser, compile_condition

CONDITIONS = {
    "arguments": "args.amount <= 1000 && args.currency == 'EUR'",
    "user and time": "'finance' in user.groups && now < timestamp('2030-01-01T00:00:00Z')",
    "list macro": "args.lines.all(l, l.qty <= 10) && has(user.email) && user.email.endsWith('@x.example')",
}
SCHEMA = {
    "type": "object",
    "properties": {
        "amount": {"type": "number"},
        "currency": {"type": "string"},
        "reason": {"type": "string"},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {}, "qty": {"type": "integer"}}}},
    },
}
# A realistic refund call: a handful of arguments, a user with a few groups.
ARGS: dict[str, Any] = {
    "amount": 250.0,
    "currency": "EUR",
    "reason": "damaged on arrival",
    "order": "A-10023",
    "lines": [{"sku": "X-1", "qty": 1}, {"sku": "X-2", "qty": 3}],
}
USER = ConditionUser(sub="alice", idp="https://idp.example", groups=("support", "finance", "ops"), email="a@x.example")


def percentiles_us(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1e6, ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1e6


def measure(n: int, call: Callable[[], object]) -> tuple[float, float]:
    for _ in range(min(n, 500)):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentiles_us(samples)


def line(name: str, n: int, figures: tuple[float, float]) -> None:
    print(f"{name:<44} n={n:<6} p50={figures[0]:8.2f} µs  p90={figures[1]:8.2f} µs")


def bench_conditions(n: int) -> None:
    compile_n = max(200, n // 20)
    for label, source in CONDITIONS.items():
        condition = compile_condition(source, kind="tools")

        def evaluate(condition=condition) -> bool:
            data = ConditionInput(args=ARGS, user=USER, client="agent-1", route="payments", tool="refund")
            return condition.evaluate(data)

        assert evaluate(), source
        line(f"compile: {label}", compile_n, measure(compile_n, lambda s=source: compile_condition(s, kind="tools")))
        line(f"evaluate incl. activation: {label}", n, measure(n, evaluate))

    condition = compile_condition(CONDITIONS["arguments"], kind="tools")
    started = time.perf_counter()
    assert condition.check_schema(SCHEMA) == []
    print(f"{'check_schema, first time for a schema':<44} {(time.perf_counter() - started) * 1e3:.2f} ms")
    line("check_schema, schema seen before", compile_n, measure(compile_n, lambda: condition.check_schema(SCHEMA)))
    line(
        "activation build alone",
        n,
        measure(n, lambda: ConditionInput(args=ARGS, user=USER, client="agent-1", route="payments").activation),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="evaluations per condition")
    bench_conditions(parser.parse_args().n)


if __name__ == "__main__":
    main()
