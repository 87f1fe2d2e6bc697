"""`emailpers send`: hand a render's messages to an SMTP relay, exactly once,
at the rate the relay allows.

Several connections (`connections`) each carry many transactions; one pacer
(pacing.py) spaces their starts so that `rate` is never exceeded, even in a
burst. The relay and the options are relay.py's, the report sendreport.py's.
Each transaction is journalled before it starts
and after its reply (journal.py): a run killed at any moment resumes without
sending a message twice, except those it reports `unknown` (sent, but no
reply came back), which `resend_unknown` sends again.

aiosmtplib's exceptions are mapped to outcomes here and go no further.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import json
import re
import signal
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiosmtplib

from emailpers.errors import Interrupted, SendError
from emailpers.journal import (
    DONE,
    Journal,
    Outgoing,
    open_folder,
    read_manifest,
    read_message,
)
from emailpers.output import write_atomic
from emailpers.pacing import Pacer
from emailpers.processes import stop_on_signals
from emailpers.relay import SendOptions
from emailpers.sendreport import Tally, build_report
from emailpers.shards import Shard

MAX_BACKOFF = 300.0  # seconds: the longest wait between two attempts of a message
_QUEUE_ID = re.compile(r"(?:queued as|id=)\s*<?([\w.@/+=-]+)>?|\b([A-Za-z0-9][\w.@/+=-]{7,})\s*$", re.IGNORECASE)



# -- one connection ------------------------------------------------------------------------


class _Fatal(Exception):
    """Sending cannot go on (TLS, login, policy): stop every connection."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _queue_id(reply: str) -> str | None:
    match = _QUEUE_ID.search(reply)
    return None if match is None else match.group(1) or match.group(2)


def _headers(data: bytes) -> tuple[str, str | None]:
    """(envelope sender from From, Message-ID) of a message."""
    head = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data.split(b"\r\n\r\n", 1)[0])
    return email.utils.parseaddr(str(head.get("From", "")))[1], head.get("Message-ID")


class Sender:
    """The run: a queue of messages, `connections` workers, one pacer."""

    def __init__(self, options: SendOptions, journal: Journal, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.journal = journal
        self.clock = clock
        self.pacer = Pacer(options.rate, clock)
        self.tally = Tally()
        self.stop_signal: int | None = None
        self.fatal: str | None = None
        self._tls = ssl.create_default_context(cafile=str(options.ca_file) if options.ca_file else None)

    # connections

    async def connect(self) -> aiosmtplib.SMTP:
        """A connection that is encrypted (or allowed not to be) and logged in."""
        o, relay = self.options, self.options.relay
        client = aiosmtplib.SMTP(
            hostname=relay.host, port=relay.port, use_tls=relay.implicit_tls, start_tls=False,
            tls_context=self._tls, timeout=o.timeout,
        )  # fmt: skip
        try:
            await client.connect()
            if not relay.implicit_tls:
                await client.ehlo()
                if client.supports_extension("starttls"):
                    await client.starttls(tls_context=self._tls)
                    await client.ehlo()  # what the server offers can change once encrypted (AUTH, often)
                elif not relay.plaintext_ok:
                    client.close()
                    raise _Fatal(
                        f"{relay.url} does not offer STARTTLS: refusing to send (and log in) in clear text. Use "
                        "smtps:// if it speaks TLS on connect, or --allow-plaintext for a relay on a trusted network"
                    )
            if o.credentials is not None:
                if not client.supports_extension("auth"):
                    client.close()
                    raise _Fatal(f"{relay.url} offers no AUTH, but SMTP credentials are set; unset them or fix the relay")
                await client.login(o.credentials.user, o.credentials.password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise _Fatal(f"{relay.url} refused the login: {exc.code} {exc.message}") from None
        except ssl.SSLError as exc:
            client.close()
            raise _Fatal(f"{relay.url}: TLS failed: {exc.reason or exc}") from None
        except aiosmtplib.SMTPConnectError as exc:
            client.close()
            if isinstance(exc.__cause__, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
                raise _Fatal(f"{relay.url}: TLS failed: {exc}") from None
            raise
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise _Fatal(f"{relay.url} refused the session: {exc.code} {exc.message}") from None
        return client

    # transactions

    def _finish(self, message: Outgoing, event: str, code: int | None, reply: str, **extra: Any) -> None:
        if code is not None:
            self.tally.codes[str(code)] += 1
        self.journal.write({
            "id": message.id, "event": event, "to": message.to, "attempt": message.attempt, "code": code,
            "reply": reply[:500], **extra, "at": _now(),
        })  # fmt: skip

    async def transaction(self, client: aiosmtplib.SMTP, message: Outgoing, data: bytes) -> str:
        """Send one message; journal its outcome: sent, rejected, retry,
        deferred (final), unknown, or `reconnect` (the connection broke before
        the message was handed over: it was not delivered)."""
        o = self.options
        sender, message_id = _headers(data)
        sender = o.mail_from or sender
        rcpt = o.to_override or message.to
        self.journal.write({
            "id": message.id, "event": "sending", "to": rcpt, "attempt": message.attempt, "message_id": message_id,
            "at": _now(),
        })  # fmt: skip
        self.tally.starts += 1
        self.tally.last_start = self.clock()
        if self.tally.first_start is None:
            self.tally.first_start = self.tally.last_start
        utf8 = not (sender.isascii() and rcpt.isascii())
        if utf8 and not client.supports_extension("smtputf8"):
            self._finish(message, "rejected", None, f"{rcpt} is not ASCII and the relay does not offer SMTPUTF8")
            return "rejected"
        handed_over = False
        try:
            await client.mail(sender, options=["SMTPUTF8"] if utf8 else None, encoding="utf-8" if utf8 else "ascii")
            await client.rcpt(rcpt, encoding="utf-8" if utf8 else "ascii")
            handed_over = True
            response = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                self._finish(message, "rejected", exc.code, exc.message)
                await self._politely(client, client.rset)
                return "rejected"
            final = self._defer(message, exc.code, exc.message)
            await self._politely(client, client.rset)
            return "deferred" if final else "retry"
        except (aiosmtplib.SMTPException, OSError) as exc:
            if handed_over:
                # The message may have reached the relay; sending again could deliver it twice.
                self._finish(message, "unknown", None, f"connection lost before the reply: {exc}")
                return "unknown"
            client.close()
            final = self._defer(message, None, f"connection lost: {exc}")
            return "deferred" if final else "reconnect"
        except Exception as exc:  # noqa: BLE001 - one message must never stop the send
            client.close()
            if handed_over:
                self._finish(message, "unknown", None, f"unexpected error after the message was handed over: {exc!r}")
                return "unknown"
            self._finish(message, "deferred", None, f"unexpected error: {exc!r}", final=True)
            return "deferred"
        queue_id = _queue_id(response.message)
        self._finish(message, "sent", response.code, response.message, queue_id=queue_id)
        return "sent"

    @staticmethod
    async def _politely(client: aiosmtplib.SMTP, command: Callable[[], Awaitable[object]]) -> None:
        """`client.rset` or `client.quit`: a relay that fails it only costs the connection."""
        try:
            await command()
        except (aiosmtplib.SMTPException, OSError):
            client.close()

    # the run

    async def run(self, messages: list[Outgoing]) -> None:
        o = self.options
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self.open = len(messages)
        self.retry_timers: set[asyncio.TimerHandle] = set()
        self.stopping = asyncio.Event()
        for message in messages:
            self.queue.put_nowait(message)
        if not messages and not o.dry_run:
            return  # nothing left to send: the relay is not needed
        try:
            first = await self.connect()  # loud and early: TLS, login, policy, before any message
        except _Fatal as exc:
            raise SendError(str(exc)) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SendError(f"{o.relay.url}: cannot connect: {exc}") from None
        if o.dry_run:
            await self._politely(first, first.quit)
            return
        # SIGINT and SIGTERM stop the send in the event loop (call_soon_threadsafe wakes it).
        with stop_on_signals(lambda signum: loop.call_soon_threadsafe(self._on_signal, signum)):
            workers = min(o.connections, len(messages))
            tasks = [asyncio.create_task(self._worker(first if i == 0 else None)) for i in range(workers)]
            await asyncio.gather(*tasks)
            for timer in self.retry_timers:
                timer.cancel()
        if self.fatal is not None:
            raise SendError(self.fatal)

    def _done_one(self) -> None:
        self.open -= 1
        if self.open == 0:
            self._stop()

    def _stop(self) -> None:
        self.stopping.set()
        for _ in range(self.options.connections):
            self.queue.put_nowait(None)

    def _on_signal(self, signum: int) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self._stop()

    async def _worker(self, client: aiosmtplib.SMTP | None) -> None:
        o = self.options
        while True:
            message = await self.queue.get()
            if message is None or self.stopping.is_set():
                break
            try:
                data = read_message(message)
            except OSError as exc:
                self.tally.unreadable.append(f"{message.path}: {exc.strerror}")
                self._settle("unreadable")
                continue
            if o.dkim is not None:
                data = o.dkim.sign(data)
            if client is None or not client.is_connected:
                try:
                    client = await self.connect()
                except _Fatal as exc:
                    self.fatal = str(exc)
                    self._stop()
                    break
                except (aiosmtplib.SMTPException, OSError) as exc:
                    client = None
                    self._retry_later(message, f"cannot connect: {exc}")
                    continue
            if not await self.pacer.wait_turn(self.stopping):
                break  # stopped while waiting for its turn: this message was not started
            outcome = await self.transaction(client, message, data)
            if outcome in ("retry", "reconnect"):
                if outcome == "reconnect":
                    client = None
                self._schedule(message)
                continue
            self._settle(outcome)
        if client is not None:
            await self._politely(client, client.quit)

    def _retry_later(self, message: Outgoing, why: str) -> None:
        if self._defer(message, None, why):
            self._settle("deferred")
        else:
            self._schedule(message)

    def _defer(self, message: Outgoing, code: int | None, why: str) -> bool:
        """Journal a 4xx or a failed connection as deferred; True when it is
        final (the retries are spent), else it is tried again."""
        final = message.attempt > self.options.retries
        self._finish(message, "deferred", code, why, final=final)
        return final

    def _settle(self, outcome: str) -> None:
        """A message done with for this run: counted, and one fewer open."""
        self.tally.outcomes[outcome] += 1
        self._done_one()

    def _schedule(self, message: Outgoing) -> None:
        delay = min(self.options.backoff * 2 ** (message.attempt - 1), MAX_BACKOFF)
        again = replace(message, attempt=message.attempt + 1)
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def put() -> None:
            self.retry_timers.discard(timer)
            self.queue.put_nowait(again)

        timer = loop.call_later(delay, put)
        self.retry_timers.add(timer)


# -- the command's core ---------------------------------------------------------------------


def plan(messages: list[Outgoing], states: Mapping[str, str], options: SendOptions) -> tuple[list[Outgoing], Counter[str]]:
    """What this run sends, and what earlier runs already settled (by state)."""
    todo, settled = [], Counter[str]()
    for message in messages:
        state = states.get(message.id)
        if state in DONE or (state == "unknown" and not options.resend_unknown):
            settled[state] += 1
        else:
            todo.append(message)
    if options.limit is not None:
        todo = todo[: options.limit]
    return todo, settled


def send_messages(
    options: SendOptions, clock: Callable[[], float] = time.monotonic, shard: Shard | None = None
) -> dict[str, Any]:
    """Send what the manifest of `options.out` (every shard's journal, or
    `shard`'s alone) holds and the send's journal has not settled; return the
    report (also written to send-report.json, or the shard's). Raises
    SendError, or Interrupted after SIGINT/SIGTERM once the transactions in
    flight have their replies."""
    out = options.out
    folder = open_folder(out, shard, options.partial)
    try:
        messages = [m for path in folder.manifests for m in read_manifest(path, out)]
        journal = Journal(folder.journal, readonly=options.dry_run)
        try:
            todo, settled = plan(messages, journal.states, options)
            sender = Sender(options, journal, clock)
            started = clock()
            error: SendError | None = None
            try:
                asyncio.run(sender.run(todo))
            except SendError as exc:
                error = exc
            report = build_report(
                options, sender.tally, sender.stop_signal, messages, journal.states, settled, len(todo), clock() - started
            )
            if shard is not None:
                report["shard"] = str(shard)
            if not options.dry_run:
                write_atomic(folder.report, (json.dumps(report, indent=2) + "\n").encode())
        finally:
            journal.close()
    finally:
        folder.close()
    if error is not None:
        error.send_report = report if report["this_run"]["attempted"] else None
        raise error
    if sender.stop_signal is not None:
        name = signal.Signals(sender.stop_signal).name
        stopped = Interrupted(
            sender.stop_signal,
            f"Interrupted by {name}: the transactions in flight finished; run the same command to send the rest.",
        )
        stopped.send_report = report
        raise stopped
    return report


