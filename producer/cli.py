"""``pushfan publish``: notification jobs from the command line or from JSON on stdin.

Prints each published job's id on its own line. Every job is validated before any is
sent: an invalid one (or JSON that does not parse) is a one-line error, exit status 2,
and nothing on the topic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import timedelta
from typing import Any, TextIO

from producer.jobs import InvalidJob, JobProducer, build_job, validate
from pushfan.settings import Settings
from schemas import NotificationJob

AUDIENCES = {
    "user": "one user's active devices",
    "users": "a list of users (up to 10,000 ids)",
    "broadcast": "every member of a segment (--segment)",
    "all": "everyone with an active token",
}


def add_parser(sub: Any) -> None:
    """Add ``publish`` and its audiences to the ``pushfan`` subcommands."""
    p = sub.add_parser(
        "publish",
        help="publish notification jobs (to a user, users, a segment, everyone, or JSON)",
        description="Validate and publish notification jobs to the jobs topic, waiting for"
        " the broker's acknowledgement; prints each job id. `pushfan publish json` reads"
        " jobs as JSON from stdin (one object, an array, or one object per line), as any"
        " other producer would write them (schemas/json/notification-job.v1.schema.json).",
    )
    audiences = p.add_subparsers(dest="audience", required=True, metavar="AUDIENCE")
    for name, summary in AUDIENCES.items():
        a = audiences.add_parser(name, help=summary, description=f"A job to {summary}.")
        if name == "user":
            a.add_argument("user_id", metavar="USER_ID")
        elif name == "users":
            a.add_argument("user_ids", nargs="+", metavar="USER_ID")
        elif name == "broadcast":
            a.add_argument("--segment", required=True, help="the segment's name")
        _job_options(a)
    j = audiences.add_parser(
        "json", help="jobs as JSON from stdin", description="Jobs as JSON from stdin."
    )
    j.add_argument("--check", action="store_true", help="validate only; publish nothing")
    p.set_defaults(run=run)


def _job_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--type", required=True, help="notification type (e.g. order_shipped)")
    a.add_argument("--title", help="notification title")
    a.add_argument("--body", help="notification body")
    a.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_pair,
        help="a data field for the app (repeat for more)",
    )
    a.add_argument("--priority", choices=("urgent", "normal", "low"), default="normal")
    a.add_argument(
        "--platform",
        action="append",
        choices=("android", "ios", "web"),
        help="only these platforms (repeat; default all)",
    )
    a.add_argument(
        "--ttl",
        type=float,
        default=86_400,
        metavar="SECONDS",
        help="not sent after this long (default a day; 0: never expires)",
    )
    a.add_argument("--job-id", help="the idempotency key (default: a new one)")
    a.add_argument("--campaign-id", help="campaign this job belongs to")
    a.add_argument(
        "--dry-run",
        action="store_true",
        help="the worker resolves and counts the audience per platform, sends nothing",
    )


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _from_options(args: argparse.Namespace) -> NotificationJob:
    audience: dict[str, Any] = {"kind": args.audience}
    if args.audience == "user":
        audience["user_id"] = args.user_id
    elif args.audience == "users":
        audience["user_ids"] = args.user_ids
    elif args.audience == "broadcast":
        audience = {"kind": "segment", "segment": args.segment}
    fields: dict[str, Any] = {"priority": args.priority, "dry_run": args.dry_run}
    if args.platform:
        fields["platforms"] = args.platform
    if args.campaign_id:
        fields["campaign_id"] = args.campaign_id
    return build_job(
        audience,
        type=args.type,
        title=args.title,
        body=args.body,
        data=dict(args.data),
        job_id=args.job_id,
        ttl=timedelta(seconds=args.ttl) if args.ttl else None,
        **fields,
    )


def read_jobs(stream: TextIO) -> list[NotificationJob]:
    """Jobs from JSON text: one object, an array of them, or one object per line.
    Raises :class:`InvalidJob` naming the job (by position) that is wrong."""
    text = stream.read()
    try:
        parsed = json.loads(text)
        items = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidJob(f"line {n}: not JSON: {exc.msg}") from exc
    if not items:
        raise InvalidJob("no job in the input")
    jobs = []
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise InvalidJob(f"job {n}: expected a JSON object")
        try:
            jobs.append(validate(item))
        except InvalidJob as exc:
            raise InvalidJob(f"job {n}: {exc}") from exc
    return jobs


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        jobs = read_jobs(sys.stdin) if args.audience == "json" else [_from_options(args)]
    except InvalidJob as exc:
        print(f"pushfan publish: invalid job: {exc}", file=sys.stderr)
        return 2
    if args.audience == "json" and args.check:
        print(f"{len(jobs)} valid job(s); nothing published (--check)", file=sys.stderr)
        return 0

    async def publish() -> list[str]:
        async with JobProducer(settings.kafka) as producer:
            return await producer.publish_many(jobs)

    for job_id in asyncio.run(publish()):
        print(job_id)
    return 0
