"""The benchmark's output: the senders' own rate and, per broadcast, its rate, stages,
workers and CPU."""

from __future__ import annotations

from bench.fanout.broadcast import Broadcast
from bench.fanout.cpus import Placement, cpu_name
from bench.fanout.emulators import Baseline, Rate
from bench.fanout.metrics import summed

STAGES = ("resolve", "query", "send", "report")  # a page each; "commit": a record


def _mb(kb: int) -> str:
    return f"{kb / 1024:,.0f} MB"


def report(b: Broadcast, senders: Baseline | None, one: Broadcast | None = None) -> None:
    """Print ``b``: its rate (against the senders' own and ``one``'s when given), its
    stages, each worker and the CPU. Without ``senders`` (a phase the senders' rate does
    not bound) the comparisons with them are left out."""
    shards = b.status.shards_total or 0
    p = b.progress
    split = f", split in {p.split_s * 1000:,.0f} ms" if p.split_s is not None else ""
    split += "".join(f", {pct}% of the users by {t:.1f} s" for pct, t in p.marks.items())
    exactly = "every token delivered exactly once, " if b.delivered else ""
    check = "; ".join(b.problems()) or (f"{exactly}ledger completed with sent {b.status.sent:,}")
    ratio = f"   ratio to the senders {b.rate / senders.rate:.2f}" if senders else ""
    speedup = f"   speed-up over 1 worker {b.rate / one.rate:.2f}x" if one else ""
    print(
        f"fanout {b.label:<10} {b.rate:>10,.0f} tokens/s end to end{ratio}{speedup}"
        f"   ({b.tokens:,} tokens of {b.users:,} users in {b.seconds:.2f} s, {shards} shards"
        f"{split}; {check})"
    )
    pages = summed(b.stages, "pushfan_worker_stage_seconds_count", stage="send") or 1.0
    per_page, per_token = [], []
    for stage in STAGES:
        total = summed(b.stages, "pushfan_worker_stage_seconds_sum", stage=stage)
        count = summed(b.stages, "pushfan_worker_stage_seconds_count", stage=stage) or 1.0
        per_page.append(f"{stage} {total / count * 1000:,.1f}")
        per_token.append(f"{stage} {total / b.tokens * 1e6:,.0f}")
    busy = sum(
        summed(b.stages, "pushfan_worker_stage_seconds_sum", stage=s) for s in ("send", "report")
    )
    commits = summed(b.stages, "pushfan_worker_stage_seconds_count", stage="commit")
    commit = ""
    if commits:
        total = summed(b.stages, "pushfan_worker_stage_seconds_sum", stage="commit")
        commit = f"; commit {total / commits * 1000:,.1f} ms per record ({commits:,.0f} records)"
    print(
        f"fanout {b.label:<10} stages, ms per page of {b.tokens / pages:,.0f} tokens:"
        f" {', '.join(per_page)}; summed over {pages:,.0f} pages, us per token:"
        f" {', '.join(per_token)}{commit}; {busy / b.seconds:.1f} pages in send+report at"
        " once on average (a lane's next page is resolved and queried during its send)"
    )
    for w in b.workers:
        print(
            f"fanout {b.label:<10} {w.short} on {w.where}: peak RSS {_mb(w.peak_rss_kb)}"
            f" (VmHWM; {_mb(w.rss_before_kb)} before the broadcast), {w.pages:,.0f} pages,"
            f" {w.users:,.0f} users"
        )
    cpu_us = b.worker_cores * b.seconds / b.tokens * 1e6
    alone = f" (the senders alone: {senders.cpu_us:,.0f})" if senders else ""
    print(
        f"fanout {b.label:<10} CPU (cores): {b.cores.line()};"
        f" worker CPU {cpu_us:,.0f} us/token{alone}"
    )


def print_senders(alone: list[Rate], base: Baseline, where: Placement) -> None:
    fcm, apns = alone
    runs = " and ".join(f"{r.rate:,.0f}" for r in base.runs)
    exact = all(r.exact for r in (*alone, *base.runs))
    print(
        f"fanout senders' own rate {base.rate:>10,.0f} msg/s   (FCM and APNs lean at once in"
        f" this mix: {runs}/s before and after the broadcasts, {base.runs[0].tokens:,} tokens"
        f" each time; alone: FCM {fcm.rate:,.0f}/s, APNs {apns.rate:,.0f}/s, {fcm.tokens:,}"
        f" tokens; this process on {cpu_name(where.worker)};"
        f" {'every token delivered once' if exact else 'NOT EVERY TOKEN DELIVERED ONCE'})"
    )
    print(
        "fanout senders' CPU      "
        + ", ".join(
            f"{r.cpu_us:,.0f} us/token (senders {r.client_cores:.2f} cores, emulators"
            f" {r.emulator_cores:.2f})"
            for r in base.runs
        )
    )
