"""`mq pub`, `mq send` and `mq sub`: messages on a domain's bus."""

import json
import os
import sys
import time

from ..control.bus import Bus, Message, Subscription
from ..control.topics import inbox_topic
from ..tools.inspect import topic_subscribers
from .common import (
    AttachedTool,
    CommandError,
    checked_topic,
    count,
    domain_name,
    parse_value,
    print_json,
    seconds,
)


def add_parser(subparsers) -> None:
    for name, target, what, func in (
            ("pub", "topic", "publish a message on a bus topic", pub),
            ("send", "target", "send a message to the inbox of a block or process", send)):
        p = subparsers.add_parser(name, help=what)
        p.add_argument("domain", type=domain_name)
        p.add_argument(target)
        p.add_argument("message", help="JSON if it parses, else a string")
        p.add_argument("--text", action="store_true", help="MESSAGE is a string, even if it parses as JSON")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
    p = subparsers.add_parser("sub", help="print the messages of a bus topic (topic, sender pid, data)")
    p.add_argument("domain", type=domain_name)
    p.add_argument("topic", help="the topic (with --inbox: the name whose inbox to read)")
    p.add_argument("--inbox", action="store_true", help="read the inbox of TOPIC (what `mq send` delivers)")
    p.add_argument("--count", type=count, default=None, help="stop after this many messages")
    p.add_argument("--timeout", type=seconds, default=None,
                   help="stop after this many seconds (exit 1 if --count messages did not come)")
    p.add_argument("--json", action="store_true", help="one JSON object per message, one a line")
    p.set_defaults(func=sub, long_running=True)


# -- mq pub, mq send ------------------------------------------------------------------------


def pub(args) -> int:
    return _publish(args, checked_topic(args.topic), point_to_point=False)


def send(args) -> int:
    return _publish(args, checked_topic(inbox_topic(args.target)), point_to_point=True)


def _publish(args, topic: str, point_to_point: bool) -> int:
    """Publish once if anyone subscribes (a message nobody reads is not kept)."""
    data = parse_value(args.message, args.text)
    with AttachedTool(args.domain, args.command) as tool:
        subscribers = topic_subscribers(tool.manager, topic)
        if subscribers:
            with Bus(tool.manager) as bus:
                try:
                    bus.publish(topic, data, keep=False)
                except TypeError as e:
                    raise CommandError(str(e)) from None
    if args.json:
        print_json({"topic": topic, "subscribers": subscribers, "sent": bool(subscribers),
                    "sender_pid": os.getpid()})
    if not subscribers:
        if point_to_point:
            raise CommandError(f"nobody reads the inbox of {args.target!r} (topic {topic!r}) in domain "
                               f"{args.domain!r}; nothing sent")
        if not args.json:
            print(f"nobody subscribes to topic {topic!r} in domain {args.domain!r}; nothing sent")
        return 0
    if not args.json:
        print(f"sent to {topic!r} in domain {args.domain!r}: {subscribers} subscriber(s)")
    return 0


# -- mq sub ---------------------------------------------------------------------------------


def sub(args) -> int:
    topic = checked_topic(inbox_topic(args.topic) if args.inbox else args.topic)
    if args.count is not None and args.count < 1:
        raise CommandError(f"--count must be at least 1, not {args.count}")
    with AttachedTool(args.domain, "sub", reaper_interval=1.0) as tool:
        bus = Bus(tool.manager)
        subscription = bus.subscribe(topic)
        try:
            seen = _print_messages(subscription, tool, args)
        finally:
            drops = subscription.drops
            bus.close()
        if drops:
            print(f"{drops} message(s) lost: this subscriber read too slowly", file=sys.stderr)
    if args.count is not None and seen < args.count and args.timeout is not None:
        raise CommandError(f"{seen} of {args.count} message(s) on topic {topic!r} within {args.timeout:g} s")
    return 0


def _print_messages(subscription: Subscription, tool: AttachedTool, args) -> int:
    """Print messages until --count, --timeout, Ctrl-C or the domain's end; how many came."""
    seen = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:  # a Ctrl-C right after the line below stops it as well as one later
        print(f"subscribed to {subscription.topic!r} in domain {args.domain!r}; Ctrl-C stops",
              file=sys.stderr, flush=True)
        while args.count is None or seen < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            message = subscription.get(timeout=0.5 if left is None else min(0.5, left))
            if message is None:
                if tool.others_seen and not tool.others_alive():
                    print(f"domain {args.domain!r} has no live process left", file=sys.stderr)
                    break
                continue
            seen += 1
            print(json.dumps(_message_row(message)) if args.json else _format_message(message), flush=True)
    except KeyboardInterrupt:
        pass
    return seen


def _message_row(message: Message) -> dict:
    row = {"topic": message.topic, "sender_pid": message.sender_pid, "seq": message.seq,
           "timestamp": message.timestamp}
    if isinstance(message.data, bytes):
        row["data_hex"] = message.data.hex()
    else:
        row["data"] = message.data
    return row


def _format_message(message: Message) -> str:
    data = repr(message.data) if isinstance(message.data, bytes) else json.dumps(message.data)
    return f"{message.topic} pid={message.sender_pid} seq={message.seq} {data}"
