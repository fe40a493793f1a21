"""cim.history.journal (and its files, cim.history.journal_file; its transactions,
cim.storage.timeline_journal): appends numbered in memory and journaled on SQLite.

A temporary SQLite file, the database run inline, a ``task.Clock``: a record is
journaled at the end of the reactor turn (``clock.advance(0)``) and copied after the
copy wait (``COPY_WAIT``) or at once when a read needs it. A "restart" is a second
``Timelines`` on the same database and directory, the first never stopped (as after
kill -9).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import TestCase

from cim.groups.directory import GroupDirectory
from cim.history import journal_file
from cim.history.journal import COPY_WAIT, journal_directory
from cim.history.journal_file import encode, read_records
from cim.history.timeline import Timelines, TimelineSettings, TimelineUnavailable
from cim.protocols.held_writes import HeldWrites
from cim.storage.changes import ChangeAsked
from cim.storage.schema import conversations, timeline, user_conversations
from cim.storage.timeline import Appended, NewMessage, forget_user
from cim.storage.timeline_journal import Numbered, row_of
from tests.unit.test_groups import USERS, add_users_txn
from tests.unit.test_timeline import AB, GROUP, START, DatabaseMixin, message, new

real_start_file = journal_file.JournalFiles._start_file


class JournalTests(DatabaseMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def timelines(self, **settings: Any) -> Timelines:
        timelines = Timelines(
            self.db, self.clock, TimelineSettings(**settings), journal=self.directory
        )
        self.ok(timelines.start())
        return timelines

    def append(self, timelines: Timelines, *args: Any, **kwargs: Any) -> Appended:
        d = timelines.append(message(*args, **kwargs), "phone")
        if not d.called:  # a new one waits for the turn's write; a resend may not
            self.clock.advance(0)
        return self.ok(d)

    def rows(self) -> list[tuple[str, int, int]]:
        query = select(timeline.c.conversation, timeline.c.seq, timeline.c.msg_id).order_by(
            timeline.c.conversation, timeline.c.seq
        )
        return [tuple(row) for row in self.txn(lambda c: list(c.execute(query)))]

    def journal_size(self) -> int:
        """Bytes of whole records in the journal's files (a mapped file's reserved
        space after them is not counted)."""
        return sum(self.records_in(n)[1] for n in self.journal_files())

    def records_in(self, name: str) -> tuple[list[Numbered], int]:
        with open(os.path.join(self.directory, name), "rb") as f:
            return read_records(f.read())

    def cannot_reserve(self) -> None:
        """No space can be reserved: the journal writes with pwrite instead."""

        def unsupported(*args: Any) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        self.patch(os, "posix_fallocate", unsupported)

    def journal_files(self) -> list[str]:
        names = os.listdir(self.directory)
        return sorted(n for n in names if n.startswith("timeline.journal.") and n[17:].isdigit())

    def kill(self, timelines: Timelines) -> None:
        """The process dies: nothing more is written, its lock on the journal goes."""
        assert timelines.journal is not None
        timelines.journal._files.unlock()

    # --- numbering and copying ----------------------------------------------------------

    def test_numbered_at_once_copied_after_the_wait_in_one_batch(self) -> None:
        timelines = self.timelines()
        seqs = [self.append(timelines, n).seq for n in (1, 2, 3)]
        self.assertEqual(seqs, [1, 2, 3])
        self.assertEqual(self.rows(), [])  # promised: in the journal, not in SQLite yet
        self.assertEqual(timelines.pending, 3)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2), (AB, 3, 3)])
        last = self.txn(lambda c: c.execute(select(conversations.c.last_seq)).scalar())
        self.assertEqual(last, 3)
        readers = self.txn(
            lambda c: c.execute(select(func.count()).select_from(user_conversations)).scalar()
        )
        self.assertEqual(readers, 2)  # the 1:1's two reader rows, as append_txn writes
        self.assertEqual(timelines.pending, 0)

    def test_a_copy_committed_inside_its_own_hand_over_is_counted(self) -> None:
        # A full batch is written at once, and this database answers at once: the
        # copy commits while the journal is still handing it over. Its records must
        # be counted as journaled by then, or the commit finds nothing to settle.
        timelines = self.timelines()
        assert timelines.journal is not None
        timelines.journal._copies._writer.batch_size = 2
        seqs = [self.append(timelines, n).seq for n in (1, 2, 3)]
        self.assertEqual(seqs, [1, 2, 3])
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(timelines.pending, 1)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2), (AB, 3, 3)])
        self.assertEqual(timelines.pending, 0)

    def test_past_the_kept_conversations_the_earliest_loaded_are_loaded_again(self) -> None:
        from cim.history import journal as journal_module

        self.patch(journal_module, "CONVERSATIONS_KEPT", 8)
        timelines = self.timelines()
        assert timelines.journal is not None
        first = [self.append(timelines, n, to=f"u{n}").seq for n in range(1, 11)]
        self.assertEqual(first, [1] * 10)
        self.assertLessEqual(len(timelines.journal._last), 8)
        self.assertNotIn("d:alice:u1", timelines.journal._last)  # dropped: loaded first
        # Its numbering comes back from the database: the next is 2, not 1 again.
        again = [self.append(timelines, 10 + n, to=f"u{n}").seq for n in (1, 10)]
        self.assertEqual(again, [2, 2])

    def test_a_turn_is_one_write_and_promises_follow_it(self) -> None:
        timelines = self.timelines()
        answers = [timelines.append(message(n), "phone") for n in (1, 2, 3)]
        resend = timelines.append(message(9, client_seq=2), "phone")
        for d in [*answers, resend]:
            self.assertNoResult(d)  # nothing is promised before the turn's write
        self.assertEqual(self.journal_size(), 0)
        self.clock.advance(0)
        self.assertEqual([self.ok(d).seq for d in answers], [1, 2, 3])
        found = self.ok(resend)
        self.assertEqual((found.msg_id, found.new), (2, False))
        self.assertEqual(timelines.counts["journaled"], 3)
        self.assertGreater(self.journal_size(), 0)

    def test_in_a_read_the_write_comes_at_its_end_not_a_turn_later(self) -> None:
        held = HeldWrites()
        timelines = self.timelines()
        timelines.answer_in(held.around, held.at_read_end)
        answers: list[Deferred[Appended]] = []

        def read() -> None:
            answers.extend(timelines.append(message(n), "phone") for n in (1, 2))
            for d in answers:
                self.assertNoResult(d)  # promised only after the write

        held.around(read)  # as a client's read: ends with no reactor turn
        self.assertEqual([self.ok(d).seq for d in answers], [1, 2])
        self.assertGreater(self.journal_size(), 0)
        self.assertEqual(timelines.counts["journaled"], 2)
        # Outside a read, the turn's write as before.
        later = timelines.append(message(3), "phone")
        self.assertNoResult(later)
        self.clock.advance(0)
        self.assertEqual(self.ok(later).seq, 3)

    def test_in_a_read_the_rows_reach_the_copy_after_the_answers_frames(self) -> None:
        held = HeldWrites()
        timelines = self.timelines()
        timelines.answer_in(held.around, held.at_read_end, held.after_flush)
        settled: list[Deferred[None]] = []

        def answered(appended: Appended) -> None:
            # Promised and counted: a read asking now waits for the copy, which gets
            # the row only after this read's frames, then at once (it was asked).
            self.assertEqual(timelines.pending, 1)
            settled.append(timelines.settled())
            self.assertNoResult(settled[0])

        def read() -> None:
            timelines.append(message(1), "phone").addCallback(answered)

        held.around(read)
        self.assertEqual(len(settled), 1)
        self.ok(settled[0])  # no copy wait: the read asked for it
        self.assertEqual(self.rows(), [(AB, 1, 1)])
        self.assertEqual(timelines.pending, 0)

    def test_a_read_asking_with_nothing_on_its_way_does_not_hurry_later_rows(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1)
        self.ok(timelines.settled())  # hurried: copied at once
        self.assertEqual(self.rows(), [(AB, 1, 1)])
        self.append(timelines, 2)  # a later turn's row keeps the copy's pace
        self.assertEqual(self.rows(), [(AB, 1, 1)])
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])

    def test_a_write_forced_inside_the_read_is_not_made_twice(self) -> None:
        held = HeldWrites()
        timelines = self.timelines()
        timelines.answer_in(held.around, held.at_read_end)
        journal = timelines.journal
        assert journal is not None
        results: list[Deferred[Appended]] = []

        def read() -> None:
            results.append(timelines.append(message(1), "phone"))
            journal._write_turn()  # what a stop or an exclusive change does
            self.assertEqual(self.ok(results[0]).seq, 1)

        held.around(read)
        self.assertEqual(timelines.counts["journaled"], 1)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1)])

    def test_group_messages_number_in_their_own_timeline(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1)
        got = self.append(timelines, 2, group=GROUP)
        self.assertEqual((got.seq, got.new), (1, True))

    # --- the read barrier ---------------------------------------------------------------

    def test_a_read_sees_every_promised_message_without_waiting_the_batch_out(self) -> None:
        timelines = self.timelines()
        for n in (1, 2):
            self.append(timelines, n)
        page = self.ok(timelines.conversation_page(AB, None, 0, 10, 1 << 20))
        self.assertEqual([r.seq for r in page.records], [2, 1])
        summary = self.ok(timelines.summary("bob", "phone"))
        self.assertEqual([(s.conversation, s.last_seq) for s in summary], [(AB, 2)])

    def test_a_read_is_refused_while_the_copies_fail(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1)
        real = self.db.run

        def down(*args: Any, **kwargs: Any) -> Deferred[Any]:
            return fail(OperationalError("INSERT", {}, Exception("database is locked")))

        self.db.run = down  # type: ignore[method-assign]
        self.clock.advance(COPY_WAIT)
        self.failureResultOf(timelines.summary("bob", "phone"), TimelineUnavailable)
        # Still taken, and promised: the journal holds it.
        self.assertEqual(self.append(timelines, 2).seq, 2)
        self.db.run = real  # type: ignore[method-assign]
        self.clock.advance(30)  # the retry commits both
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])
        self.ok(timelines.summary("bob", "phone"))

    def test_the_node_is_pressed_by_copies_behind_by_more_than_a_batch(self) -> None:
        timelines = Timelines(self.db, self.clock, TimelineSettings(), journal=self.directory)
        assert timelines.journal is not None
        timelines.journal._copies.batch_size = 2
        self.ok(timelines.start())
        for n in (1, 2):
            self.append(timelines, n)
        self.assertEqual((timelines.waiting, timelines.pending), (0, 2))  # a batch forming
        self.db.run = lambda *a, **k: fail(OperationalError("INSERT", {}, Exception("locked")))  # type: ignore[method-assign]
        self.clock.advance(COPY_WAIT)
        self.append(timelines, 3)
        self.assertEqual((timelines.waiting, timelines.pending), (1, 3))

    def test_a_full_backlog_refuses_new_messages(self) -> None:
        timelines = self.timelines(max_backlog=2)
        for n in (1, 2):
            self.append(timelines, n)
        self.assertGreater(timelines.behind(), 0)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(timelines.behind(), 0.0)

    # --- restarts -----------------------------------------------------------------------

    def test_replay_after_a_kill_then_numbering_goes_on(self) -> None:
        first = self.timelines()
        for n in (1, 2, 3):
            self.append(first, n)
        self.assertEqual(self.rows(), [])
        self.kill(first)  # before any copy
        second = self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2), (AB, 3, 3)])
        self.assertEqual(second.counts["replayed"], 3)
        self.assertEqual(self.append(second, 4).seq, 4)  # no seq given twice

    def test_replay_is_idempotent(self) -> None:
        first = self.timelines()
        for n in (1, 2):
            self.append(first, n)
        self.clock.advance(COPY_WAIT)  # copied, and the journal not yet rolled
        self.assertEqual(len(self.rows()), 2)
        with open(os.path.join(self.directory, self.journal_files()[0]), "rb") as f:
            data = f.read()
        records, _ = read_records(data)
        self.assertEqual(len(records), 2)
        with open(os.path.join(self.directory, "timeline.journal.99"), "wb") as f:
            f.write(data)  # the same records again, as if their copy were not known
        self.kill(first)
        self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])

    def test_a_replay_does_not_bring_back_what_was_deleted_after_its_copy(self) -> None:
        first = self.timelines()
        for n in (1, 2):
            self.append(first, n)
        self.clock.advance(COPY_WAIT)  # copied; the journal file is still the one written
        self.txn(forget_user, "bob")  # an account deleted (the retention purge alike)
        self.assertEqual(self.rows(), [])
        self.append(first, 3)  # promised after, not yet copied
        self.kill(first)
        self.timelines()
        self.assertEqual(self.rows(), [(AB, 3, 3)])
        readers = self.txn(
            lambda c: list(c.execute(select(user_conversations.c.user_name)).scalars())
        )
        self.assertEqual(readers, ["alice"])  # bob's reader row stays deleted

    def test_records_read_back_as_written(self) -> None:
        """Each record decodes to what was encoded, whichever names a message shares
        with the one before (encode caches the encoded names of a conversation)."""
        first = NewMessage(
            "d:alice:bob",
            11,
            "alice",
            "phone",
            1,
            1.5,
            b"one",
            (("alice", "bob"), ("bob", "alice")),
        )
        items = [
            Numbered(1, first),
            Numbered(2, first._replace(msg_id=12, client_seq=2, payload=b"")),
            Numbered(
                3, first._replace(msg_id=13, sender_device="w\u00e4tch", payload=b"\x00" * 300)
            ),
            Numbered(1, NewMessage("g:room", 14, "z\u00fcri", "web", 0, 2.0, b"group", ())),
        ]
        data = b"".join(
            encode(row_of(item.message, item.seq), item.message.readers) for item in items
        )
        self.assertEqual(read_records(data), (items, len(data)))

    def test_a_torn_tail_is_dropped(self) -> None:
        first, second = new(message(1)), new(message(2))
        whole = encode(row_of(first, 1), first.readers)
        torn = encode(row_of(second, 2), second.readers)[:-3]
        with open(os.path.join(self.directory, "timeline.journal.1"), "wb") as f:
            f.write(whole + torn)
        records, used = read_records(whole + torn)
        self.assertEqual((len(records), used), (1, len(whole)))
        damaged = bytearray(encode(row_of(second, 2), second.readers))
        damaged[-1] ^= 0xFF  # a whole length, a wrong CRC
        self.assertEqual(len(read_records(whole + bytes(damaged))[0]), 1)
        timelines = self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1)])
        self.assertEqual(self.journal_files(), ["timeline.journal.2"])  # a fresh file
        self.assertEqual(self.append(timelines, 3).seq, 2)

    def test_a_resend_is_found_again_after_a_restart(self) -> None:
        first = self.timelines()
        self.append(first, 1, client_seq=500)
        self.kill(first)
        second = self.timelines()
        # The receipts knew it: the same id.
        again = self.append(second, 1, client_seq=500)
        self.assertEqual((again.msg_id, again.seq, again.new), (1, 1, False))
        # The receipts were lost: a new id, the same client sequence.
        again = self.append(second, 7, client_seq=500)
        self.assertEqual((again.msg_id, again.seq, again.new), (1, 1, False))
        self.assertEqual(second.counts["looked_up"], 2)
        self.assertEqual(self.append(second, 8, client_seq=501).seq, 2)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 8)])

    def test_resends_without_a_read(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1, client_seq=100)
        self.append(timelines, 2, client_seq=101)
        again = self.append(timelines, 9, client_seq=100)
        self.assertEqual((again.msg_id, again.seq, again.new), (1, 1, False))
        again = self.append(timelines, 2, client_seq=101)
        self.assertEqual((again.msg_id, again.new), (2, False))
        self.assertEqual(timelines.counts["looked_up"], 0)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(len(self.rows()), 2)

    def test_an_old_id_from_a_device_not_yet_seen_is_looked_up_then_taken(self) -> None:
        first = self.timelines()
        self.append(first, 5, client_seq=100)
        self.kill(first)
        second = self.timelines()
        # An id below the highest stored one, from a device this run has not seen.
        got = self.append(second, 3, sender="carol", client_seq=7)
        self.assertEqual((got.seq, got.new), (1, True))
        self.assertEqual(second.counts["looked_up"], 1)
        again = self.append(second, 9, sender="carol", client_seq=7)
        self.assertEqual((again.msg_id, again.new), (3, False))

    def test_a_lower_client_seq_is_looked_up_then_taken(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1, client_seq=100)
        # A device whose clock stepped back: not among its recent ones, not stored.
        got = self.append(timelines, 2, client_seq=50)
        self.assertEqual((got.seq, got.new), (2, True))
        self.assertEqual(timelines.counts["looked_up"], 1)

    def test_a_device_loaded_in_the_turn_of_its_message_still_finds_the_resend(self) -> None:
        first = self.timelines()
        self.append(first, 5, client_seq=100)
        self.kill(first)
        second = self.timelines()
        # Looked up (an id below the highest stored one), then numbered: carol's device
        # is not loaded by that, and its message is not journaled before the turn ends.
        sent = second.append(message(3, sender="carol", client_seq=700), "phone")
        # The same turn: a message of the device with a lower client sequence loads it.
        other = second.append(message(6, sender="carol", to="dave", client_seq=600), "phone")
        self.clock.advance(0)
        self.assertEqual([self.ok(d).new for d in (sent, other)], [True, True])
        # The first resent under a new id (its receipt was lost): the same message.
        again = self.append(second, 9, sender="carol", client_seq=700)
        self.assertEqual((again.msg_id, again.new), (3, False))

    def test_a_resend_past_the_window_is_taken_again(self) -> None:
        timelines = self.timelines(dedup_window=60)
        self.append(timelines, 1, client_seq=100)
        self.clock.advance(61)
        got = self.append(timelines, 2, client_seq=100)
        self.assertEqual((got.seq, got.new), (2, True))

    def test_a_failed_write_whose_new_file_cannot_be_made_promises_nothing_wrong(self) -> None:
        self.cannot_reserve()  # written with os.pwrite, which can fail
        timelines = self.timelines()
        self.append(timelines, 1)
        real_write, real_open = os.pwrite, os.open

        def full(*args: Any) -> Any:
            raise OSError(28, "No space left on device")

        self.patch(os, "pwrite", full)
        self.patch(os, "open", full)  # nor can the next file be made
        d = timelines.append(message(2), "phone")
        self.clock.advance(0)
        self.failureResultOf(d, TimelineUnavailable)
        self.patch(os, "pwrite", real_write)
        self.patch(os, "open", real_open)
        # The disk has room again: message 2 resent is taken (not answered as a message
        # appended before), and what is promised reaches the database.
        again = timelines.append(message(2), "phone")
        self.clock.advance(0)
        taken = self.ok(again)
        self.assertEqual((taken.seq, taken.new), (2, True))
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])

    def test_a_torn_write_that_cannot_be_cut_back_is_not_written_after(self) -> None:
        self.cannot_reserve()  # written with os.pwrite, which can tear
        timelines = self.timelines()
        self.append(timelines, 1)
        real_write, real_ftruncate = os.pwrite, os.ftruncate
        writes: list[int] = []

        def torn(fd: int, data: Any, offset: int) -> int:
            if writes:
                raise OSError(5, "Input/output error")
            writes.append(fd)
            return real_write(fd, bytes(data[:10]), offset)  # part of a record, then the error

        def refused(*args: Any) -> None:
            raise OSError(5, "Input/output error")

        self.patch(os, "pwrite", torn)
        self.patch(os, "ftruncate", refused)
        d = timelines.append(message(2), "phone")
        self.clock.advance(0)
        self.failureResultOf(d, TimelineUnavailable)
        self.patch(os, "pwrite", real_write)
        self.patch(os, "ftruncate", real_ftruncate)
        # Nothing more is taken: seq 2 must not be given before the next start, which
        # copies whatever of the failed write stayed whole.
        self.failureResultOf(timelines.append(message(3), "phone"), TimelineUnavailable)
        self.assertGreater(timelines.behind(), 0)
        self.kill(timelines)
        second = self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1)])  # the torn record is dropped
        self.assertEqual(self.append(second, 3).seq, 2)

    def test_a_mapped_file_is_reserved_and_read_back_to_its_last_record(self) -> None:
        first = self.timelines()
        self.append(first, 1)
        self.append(first, 2)
        self.kill(first)
        [name] = self.journal_files()
        records, used = self.records_in(name)
        self.assertEqual([item.seq for item in records], [1, 2])
        # The space after the records was reserved (zeros), and is not read as records.
        self.assertGreater(os.path.getsize(os.path.join(self.directory, name)), used)
        second = self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])
        self.assertEqual(self.append(second, 3).seq, 3)

    def test_a_full_disk_refuses_the_write_that_needs_a_new_file(self) -> None:
        timelines = Timelines(self.db, self.clock, TimelineSettings(), journal=self.directory)
        assert timelines.journal is not None
        timelines.journal._files.roll_bytes = 200  # one record (about 150 bytes) a file
        self.ok(timelines.start())
        self.append(timelines, 1)
        real_reserve, real_write = os.posix_fallocate, os.pwrite

        def full(*args: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        # No space to reserve: the new file is not mapped (a write there would be
        # SIGBUS) but written, and that write fails as well.
        self.patch(os, "posix_fallocate", full)
        self.patch(os, "pwrite", full)
        d = timelines.append(message(2), "phone")
        self.clock.advance(0)
        self.failureResultOf(d, TimelineUnavailable)
        self.assertEqual(self.journal_size(), self.records_in("timeline.journal.1")[1])
        self.patch(os, "posix_fallocate", real_reserve)
        self.patch(os, "pwrite", real_write)
        # Room again: message 2 resent is new (its seq was given back), and reaches
        # the database with what was promised before.
        taken = self.append(timelines, 2)
        self.assertEqual((taken.seq, taken.new), (2, True))
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])

    def test_a_write_larger_than_a_file_gets_a_file_of_its_own(self) -> None:
        timelines = Timelines(self.db, self.clock, TimelineSettings(), journal=self.directory)
        assert timelines.journal is not None
        timelines.journal._files.roll_bytes = 200
        self.ok(timelines.start())
        self.append(timelines, 1)
        answers = [timelines.append(message(n), "phone") for n in (2, 3, 4)]
        self.clock.advance(0)  # one turn: one write of three records, about 450 bytes
        self.assertEqual([self.ok(d).seq for d in answers], [2, 3, 4])
        first, second = self.journal_files()
        # The file rolled away from is cut back to its records.
        records, used = self.records_in(first)
        self.assertEqual(([item.seq for item in records], used), ([1], self.size_of(first)))
        self.assertEqual([item.seq for item in self.records_in(second)[0]], [2, 3, 4])
        self.ok(timelines.stop())
        self.assertEqual(self.journal_files(), [])
        self.assertEqual(len(self.rows()), 4)

    def test_without_reserved_space_the_journal_appends(self) -> None:
        self.cannot_reserve()
        first = self.timelines()
        self.append(first, 1)
        self.append(first, 2)
        self.kill(first)
        [name] = self.journal_files()
        self.assertEqual(self.records_in(name)[1], self.size_of(name))  # no reserved space
        self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2)])

    def test_a_copy_on_write_file_system_is_not_mapped(self) -> None:
        # btrfs or ZFS may still run out of blocks a mapped write needs (SIGBUS).
        self.patch(journal_file, "file_system_of", lambda path: "btrfs")
        first = self.timelines()
        self.append(first, 1)
        self.kill(first)
        [name] = self.journal_files()
        self.assertEqual(self.records_in(name)[1], self.size_of(name))  # no reserved space
        self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1)])

    def test_the_file_system_is_read_from_the_mounts(self) -> None:
        self.assertEqual(journal_file.file_system_of("/proc/self"), "proc")
        self.assertIn(journal_file.file_system_of(self.directory), journal_file.MAPPABLE)

    def test_a_journal_that_cannot_be_written_fails_the_start_and_lets_go(self) -> None:
        def refused(*args: Any) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        self.patch(journal_file.JournalFiles, "_start_file", refused)
        timelines = Timelines(self.db, self.clock, TimelineSettings(), journal=self.directory)
        failure = self.failureResultOf(timelines.start(), TimelineUnavailable)
        self.assertIn("cannot be written (Permission denied)", failure.getErrorMessage())
        self.patch(journal_file.JournalFiles, "_start_file", real_start_file)
        # The lock was let go: a second start in this process takes the journal.
        self.assertEqual(self.append(self.timelines(), 1).seq, 1)

    def size_of(self, name: str) -> int:
        return os.path.getsize(os.path.join(self.directory, name))

    # --- checkpoints --------------------------------------------------------------------

    def test_files_roll_and_go_once_copied(self) -> None:
        timelines = Timelines(self.db, self.clock, TimelineSettings(), journal=self.directory)
        assert timelines.journal is not None
        timelines.journal._files.roll_bytes = 200  # a record is about 150 bytes
        self.ok(timelines.start())
        for n in range(1, 6):
            self.append(timelines, n)
        self.assertGreater(len(self.journal_files()), 1)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(len(self.journal_files()), 1)  # only the one being written
        self.append(timelines, 6)
        self.ok(timelines.stop())
        self.assertEqual(self.journal_files(), [])
        self.assertEqual(len(self.rows()), 6)

    def test_a_stop_that_cannot_copy_leaves_the_journal_for_the_next_start(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1)
        real = self.db.run
        self.db.run = lambda *a, **k: fail(OperationalError("INSERT", {}, Exception("full")))  # type: ignore[method-assign]
        self.ok(timelines.stop())
        self.db.run = real  # type: ignore[method-assign]
        self.assertEqual(len(self.journal_files()), 1)
        self.timelines()
        self.assertEqual(self.rows(), [(AB, 1, 1)])

    def test_a_member_joins_after_every_promised_message(self) -> None:
        self.txn(add_users_txn, USERS)
        groups = GroupDirectory(self.db, self.clock)
        timelines = self.timelines()
        groups.settled = timelines.settled
        team = self.ok(groups.create("alice", "team", ["bob"]))
        sent = message(1, group=team.id)
        d = timelines.append(sent, "phone")
        self.clock.advance(0)
        self.assertEqual(self.ok(d).seq, 1)  # promised, not yet copied
        self.ok(groups.add("alice", team.id, ["carol"]))
        floor = self.txn(
            lambda c: c.execute(
                select(user_conversations.c.floor_seq).where(
                    user_conversations.c.user_name == "carol"
                )
            ).scalar()
        )
        self.assertEqual(floor, 1)  # the message before the join is not carol's unread

    # --- changes ------------------------------------------------------------------------

    def test_a_change_numbers_between_journaled_messages(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1)
        asked = ChangeAsked("alice", "phone", 1, 1, "", 50, START, 3600.0, 3600.0)
        made = self.ok(timelines.change(asked))
        self.assertEqual(made.appended.seq, 2)
        self.assertEqual(self.append(timelines, 3).seq, 3)
        self.clock.advance(COPY_WAIT)
        self.assertEqual([seq for _, seq, _ in self.rows()], [1, 2, 3])

    def test_a_change_does_not_take_the_seq_of_a_message_numbered_in_its_turn(self) -> None:
        timelines = self.timelines()
        self.append(timelines, 1)
        self.clock.advance(COPY_WAIT)  # copied: the database is current
        sent = timelines.append(message(2), "phone")  # numbered 2, journaled at the turn's end
        asked = ChangeAsked("alice", "phone", 1, 1, "", 50, START, 3600.0, 3600.0)
        made = timelines.change(asked)  # in the same turn
        self.clock.advance(0)
        self.assertEqual(self.ok(sent).seq, 2)
        self.assertEqual(self.ok(made).appended.seq, 3)
        self.clock.advance(COPY_WAIT)
        self.assertEqual(self.rows(), [(AB, 1, 1), (AB, 2, 2), (AB, 3, 50)])

    def test_one_process_per_journal(self) -> None:
        self.timelines()
        second = Timelines(self.db, self.clock, TimelineSettings(), journal=self.directory)
        self.failureResultOf(second.start(), TimelineUnavailable)


class DirectoryTests(TestCase):
    def test_beside_a_sqlite_file_only(self) -> None:
        self.assertEqual(journal_directory("sqlite:////var/lib/cim/cim.db"), "/var/lib/cim")
        self.assertIsNone(journal_directory("sqlite://"))
        self.assertIsNone(journal_directory("sqlite:///:memory:"))
        self.assertIsNone(journal_directory("postgresql://cim@localhost/cim"))
