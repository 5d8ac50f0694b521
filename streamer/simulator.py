"""A simulated file processor for `streamer demo`.

It does what any real worker would: plain SQL on `files`, nothing else. The feed's
triggers turn every statement into the events the demo page shows, which is the point:
the writer knows nothing of the streamer.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections import deque
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    """A kind of file: its extensions and MIME types, the stages a processor runs, its failures."""

    types: dict[str, str]
    stages: tuple[str, ...]
    errors: tuple[str, ...]


KINDS: dict[str, Kind] = {
    "image": Kind(
        {".jpg": "image/jpeg", ".png": "image/png", ".heic": "image/heic"},
        ("upload", "scanning", "thumbnails", "optimization"),
        (
            "Image is corrupt: unexpected end of JPEG data",
            "Thumbnail generation timed out after 30 s",
            "Image dimensions exceed the 20000 px limit",
        ),
    ),
    "video": Kind(
        {".mp4": "video/mp4", ".mov": "video/quicktime"},
        ("upload", "scanning", "transcoding", "thumbnails"),
        (
            "Unsupported codec: HEVC Main 10 is not enabled for this workspace",
            "Transcoding failed: audio stream is missing",
            "Video is longer than the 2 h limit",
        ),
    ),
    "document": Kind(
        {
            ".pdf": "application/pdf",
            ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        },
        ("upload", "scanning", "text extraction", "preview"),
        (
            "Document is password-protected",
            "Virus scan found a threat: EICAR-Test-File",
            "Preview rendering failed on page 12",
        ),
    ),
    "archive": Kind(
        {".zip": "application/zip", ".tar.gz": "application/gzip"},
        ("upload", "scanning", "extraction", "indexing"),
        (
            "Archive is encrypted and cannot be scanned",
            "Checksum mismatch after upload; please upload again",
            "Archive contains more than 10000 entries",
        ),
    ),
    "audio": Kind(
        {".mp3": "audio/mpeg", ".wav": "audio/wav"},
        ("upload", "scanning", "compression", "waveform"),
        ("Audio stream could not be decoded", "Upload was interrupted by the client"),
    ),
    "spreadsheet": Kind(
        {
            ".csv": "text/csv",
            ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        },
        ("upload", "scanning", "parsing", "indexing"),
        ("Row 4812 has 14 columns, expected 12", "File is not valid UTF-8 at byte 90211"),
    ),
}

STEMS: dict[str, tuple[str, ...]] = {
    "image": ("IMG_{n}", "product-shot-{n:02d}", "team-photo-{n}", "Screenshot 2024-05-{d:02d}"),
    "video": ("product-demo-v{v}", "onboarding-recording-{n}", "team-offsite-{n}", "webinar-q{q}"),
    "document": (
        "Q{q}-financial-report",
        "invoice-{n}",
        "contract-signed-{n}",
        "brand-guidelines-v{v}",
    ),
    "archive": ("design-assets-{n}", "backup-2024-05-{d:02d}", "source-export-v{v}"),
    "audio": ("podcast-ep-{n}", "voice-memo-{n}", "interview-{n}"),
    "spreadsheet": ("customers-export-{n}", "budget-2024-q{q}", "inventory-{n}"),
}

STEP_FAILURE = 0.008  # per progress step; about one file in ten fails somewhere
LIVE_MIN, LIVE_MAX = 3, 6  # files in flight at once
KEEP_FINISHED = 14  # older finished files are deleted, as a user tidying up would


@dataclass
class Job:
    id: uuid.UUID
    kind: str
    progress: int = 0
    started: bool = False
    queued_ticks: int = 0

    @property
    def stages(self) -> tuple[str, ...]:
        return KINDS[self.kind].stages

    @property
    def stage(self) -> str:
        # Stages share the 0-100 range evenly; the stage follows from the progress.
        index = min(len(self.stages) - 1, self.progress * len(self.stages) // 100)
        return self.stages[index]


class Simulator:
    """The processor's state between ticks: files in flight and finished ones, oldest first."""

    def __init__(
        self, conn: psycopg.Connection[tuple[object, ...]], user_id: uuid.UUID, rng: random.Random
    ) -> None:
        self.conn = conn
        self.user_id = user_id
        self.rng = rng
        self.jobs: list[Job] = []
        self.finished: deque[uuid.UUID] = deque()

    def resume(self) -> None:
        """Adopt the user's files left by an earlier run, so none stays stuck in progress."""
        rows = self.conn.execute(
            "select id, filename, status, progress from files"
            " where user_id = %s order by created_at",
            (self.user_id,),
        ).fetchall()
        for file_id, filename, status, progress in rows:
            assert isinstance(file_id, uuid.UUID) and isinstance(filename, str)
            assert isinstance(progress, int)
            if status in ("ready", "failed"):
                self.finished.append(file_id)
            else:
                job = Job(file_id, kind_of(filename), progress, started=status == "processing")
                self.jobs.append(job)
        if not rows:
            # Something to look at on the first page load: a little history.
            for _ in range(3):
                self.insert_finished()

    def tick(self) -> None:
        live = len(self.jobs)
        if live < LIVE_MIN or (live < LIVE_MAX and self.rng.random() < 0.3):
            self.insert()
        for job in list(self.jobs):
            if self.rng.random() < 0.8:
                self.advance(job)
        self.tidy()

    def insert(self) -> None:
        kind = self.rng.choice(list(KINDS))
        filename, file_type = self.name(kind)
        row = self.conn.execute(
            "insert into files (user_id, filename, file_type) values (%s, %s, %s) returning id",
            (self.user_id, filename, file_type),
        ).fetchone()
        assert row is not None and isinstance(row[0], uuid.UUID)
        self.jobs.append(Job(row[0], kind, queued_ticks=self.rng.randint(1, 3)))

    def insert_finished(self) -> None:
        filename, file_type = self.name(self.rng.choice(list(KINDS)))
        row = self.conn.execute(
            "insert into files (user_id, filename, file_type, status, progress)"
            " values (%s, %s, %s, 'ready', 100) returning id",
            (self.user_id, filename, file_type),
        ).fetchone()
        assert row is not None and isinstance(row[0], uuid.UUID)
        self.finished.append(row[0])

    def advance(self, job: Job) -> None:
        if not job.started:
            if job.queued_ticks > 0:
                job.queued_ticks -= 1
                return
            job.started = True
            self.update(
                job,
                "update files set status = 'processing', processing_stage = %s, progress = %s"
                " where id = %s",
                (job.stage, job.progress, job.id),
            )
            return
        # Scanning is where most uploads are rejected.
        risk = STEP_FAILURE * 3 if job.stage == "scanning" else STEP_FAILURE
        if self.rng.random() < risk:
            message = self.rng.choice(KINDS[job.kind].errors)
            self.update(
                job,
                "update files set status = 'failed', error_message = %s where id = %s",
                (message, job.id),
            )
            self.finish(job)
            return
        job.progress = min(100, job.progress + self.rng.randint(3, 11))
        if job.progress == 100:
            self.update(
                job,
                "update files set status = 'ready', progress = 100, processing_stage = null,"
                " error_message = null where id = %s",
                (job.id,),
            )
            self.finish(job)
        else:
            self.update(
                job,
                "update files set progress = %s, processing_stage = %s where id = %s",
                (job.progress, job.stage, job.id),
            )

    def update(self, job: Job, sql: str, params: tuple[object, ...]) -> None:
        # Someone may delete the row meanwhile (psql, the page): then the job is over.
        if self.conn.execute(sql, params).rowcount == 0:
            self.jobs.remove(job)

    def finish(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
            self.finished.append(job.id)

    def tidy(self) -> None:
        doomed: list[uuid.UUID] = []
        while len(self.finished) > KEEP_FINISHED:
            doomed.append(self.finished.popleft())
        if len(self.finished) > 5 and self.rng.random() < 0.03:
            # Now and then a user deletes an older file, not only the oldest.
            victim = self.finished[self.rng.randrange(len(self.finished) - 3)]
            self.finished.remove(victim)
            doomed.append(victim)
        for file_id in doomed:
            self.conn.execute("delete from files where id = %s", (file_id,))

    def name(self, kind: str) -> tuple[str, str]:
        """A realistic file name of that kind, and its MIME type."""
        stem = self.rng.choice(STEMS[kind]).format(
            n=self.rng.randint(1, 9999) if kind == "image" else self.rng.randint(1, 120),
            d=self.rng.randint(1, 28),
            v=self.rng.randint(1, 5),
            q=self.rng.randint(1, 4),
        )
        extension, file_type = self.rng.choice(list(KINDS[kind].types.items()))
        return stem + extension, file_type


def kind_of(filename: str) -> str:
    for name, kind in KINDS.items():
        if filename.lower().endswith(tuple(kind.types)):
            return name
    return "document"


def run_simulator(
    database_url: str,
    user_id: uuid.UUID,
    *,
    stop: threading.Event,
    interval: float = 0.7,
    seed: int | None = None,
) -> None:
    """Insert, process and delete files of `user_id` until `stop` is set.

    Each tick waits about `interval` seconds. A lost connection is retried, so the demo
    outlives a database restart; when `stop` is set the function returns.
    """
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                simulator = Simulator(conn, user_id, rng)
                simulator.resume()
                while not stop.wait(interval * rng.uniform(0.6, 1.4)):
                    simulator.tick()
        except psycopg.OperationalError as exc:
            if stop.is_set():
                return
            log.warning("simulator lost its database connection, retrying: %s", exc)
            stop.wait(2.0)
