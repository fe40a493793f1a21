"""Thumbnails under one memory budget (issue 16, Seen 9): estimates, waiting, refusals."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
from typing import Any

from PIL import Image
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.threads import ThreadPoolRunner
from cim.files.thumbnails import (
    OVERHEAD,
    ImageRefused,
    ThumbnailBudget,
    Thumbnailer,
    estimate,
    make_thumbnail,
)
from tests.unit.test_files import FileServiceTestCase, bomb_png

MIB = 1 << 20


class HeldWork:
    """A runner whose work runs only when the test says so, in order."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.queue.append((work, done))
        return done

    def run_one(self) -> None:
        work, done = self.queue.pop(0)
        maybeDeferred(work).chainDeferred(done)


class BudgetTests(SynchronousTestCase):
    def test_grants_in_order_and_waits_for_room(self) -> None:
        budget = ThumbnailBudget(100)
        first, second, third = budget.acquire(60), budget.acquire(50), budget.acquire(10)
        self.assertIsNone(self.successResultOf(first))
        # The 50 does not fit; the 10 behind it would, but does not overtake it.
        self.assertNoResult(second)
        self.assertNoResult(third)
        budget.release(60)
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual((budget.in_use, budget.peak), (60, 60))

    def test_a_cancelled_wait_leaves_the_line(self) -> None:
        budget = ThumbnailBudget(100)
        budget.acquire(90)
        waiting = budget.acquire(50)
        behind = budget.acquire(10)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.successResultOf(behind)
        self.assertEqual(budget.waiting, 0)

    def test_more_than_the_whole_budget_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            ThumbnailBudget(100).acquire(101)


def save(image: Image.Image, path: str, fmt: str, **options: Any) -> str:
    image.save(path, fmt, **options)
    return path


class EstimateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def test_a_png_costs_its_decoded_size(self) -> None:
        path = self.path("bomb.png")
        with open(path, "wb") as handle:
            handle.write(bomb_png(4000, 3000))
        cost = estimate(path, "image/png", 256, 100_000_000)
        assert cost is not None
        self.assertEqual((cost.format, cost.width, cost.height), ("PNG", 4000, 3000))
        self.assertEqual(cost.memory, 4000 * 3000 + OVERHEAD)  # one byte a pixel
        rgba = save(Image.new("RGBA", (400, 300)), self.path("a.png"), "PNG")
        cost = estimate(rgba, "image/png", 256, 100_000_000)
        assert cost is not None
        self.assertEqual(cost.memory, 400 * 300 * 4 + OVERHEAD)

    def test_a_jpeg_is_decoded_at_a_fraction_unless_progressive(self) -> None:
        image = Image.new("RGB", (4000, 4000), (1, 2, 3))
        baseline = estimate(save(image, self.path("b.jpg"), "JPEG"), "image/jpeg", 256, 10**8)
        assert baseline is not None
        self.assertEqual(baseline.memory, 500 * 500 * 4 + OVERHEAD)  # draft at 1/8
        progressive = estimate(
            save(image, self.path("p.jpg"), "JPEG", progressive=True), "image/jpeg", 256, 10**8
        )
        assert progressive is not None
        # 4:2:0: every luma coefficient, a quarter of each chroma one, 2 bytes each.
        coefficients = 4000 * 4000 * 2 * (1 + 0.25 + 0.25)
        self.assertEqual(progressive.memory, 500 * 500 * 4 + coefficients + OVERHEAD)

    def test_non_images_cost_nothing_and_bombs_are_refused_from_the_header(self) -> None:
        self.assertIsNone(estimate(self.path("whatever"), "application/pdf", 256, 100))
        path = self.path("bomb.png")
        with open(path, "wb") as handle:
            handle.write(bomb_png(2000, 2000))
        with self.assertRaises(ImageRefused) as caught:
            estimate(path, "image/png", 256, 1_000_000)
        self.assertEqual(caught.exception.code, "image_too_large")

    def test_thumbnails_of_every_mode(self) -> None:
        cases = [
            (Image.new("P", (3000, 1000), 1), {"transparency": 0}, "png", (256, 85)),
            (Image.new("1", (1000, 3000), 1), {}, "jpeg", (85, 256)),
            (Image.new("I;16", (2000, 2000), 300), {}, "jpeg", (256, 256)),
            (Image.new("LA", (2000, 1000), (9, 200)), {}, "png", (256, 128)),
            (Image.new("RGB", (300, 200), (9, 9, 9)), {}, "jpeg", (256, 171)),
        ]
        for n, (image, options, fmt, size) in enumerate(cases):
            source = save(image, self.path(f"{n}.png"), "PNG", **options)
            info = make_thumbnail(
                source, lambda f, n=n: self.path(f"{n}-thumb.{f}"), "image/png", 256, 10**8
            )
            assert info is not None
            self.assertEqual(info.thumbnail, fmt, image.mode)
            with Image.open(self.path(f"{n}-thumb.{fmt}")) as thumbnail:
                self.assertEqual(thumbnail.size, size, image.mode)


class ThumbnailerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.held = HeldWork()
        self.work = ThreadPoolRunner("test-files", 1, None, runner=self.held)
        self.budget = ThumbnailBudget(OVERHEAD + 3 * MIB)
        self.thumbnails = Thumbnailer(self.work, self.budget, 64, 10**8)

    def image(self, name: str, size: tuple[int, int]) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as handle:
            handle.write(bomb_png(*size))
        return path

    def make(self, source: str) -> Deferred[Any]:
        target = source + ".thumb"
        return Deferred.fromCoroutine(
            self.thumbnails.make(source, lambda fmt: f"{target}.{fmt}", "image/png")
        )

    def test_images_wait_for_the_budget_instead_of_decoding_together(self) -> None:
        first = self.make(self.image("a.png", (2000, 1000)))  # 2 MB decoded
        second = self.make(self.image("b.png", (2000, 1000)))
        self.held.run_one()  # estimate a
        self.held.run_one()  # estimate b
        # a decodes; b waits: both would need 2 x (2 MiB + overhead).
        self.assertEqual(len(self.held.queue), 1)
        self.assertEqual(self.budget.waiting, 1)
        self.held.run_one()  # a's thumbnail
        self.assertEqual(self.successResultOf(first).width, 2000)
        self.assertEqual(self.budget.waiting, 0)
        self.held.run_one()  # b's thumbnail
        self.successResultOf(second)
        self.assertEqual(self.budget.in_use, 0)
        self.assertLessEqual(self.budget.peak, self.budget.total)

    def test_an_image_over_the_whole_budget_is_refused(self) -> None:
        made = self.make(self.image("big.png", (4000, 1000)))
        self.held.run_one()
        failure = self.failureResultOf(made, ImageRefused)
        self.assertEqual(failure.value.code, "image_too_large")
        self.assertIn("MiB", failure.value.message)
        self.assertEqual(self.held.queue, [])

    def test_the_budget_is_returned_when_decoding_fails(self) -> None:
        path = os.path.join(self.dir, "cut.png")
        with open(path, "wb") as handle:
            handle.write(bomb_png(2000, 1000)[:-200])
        made = self.make(path)
        self.held.run_one()
        self.held.run_one()
        self.assertEqual(self.failureResultOf(made, ImageRefused).value.code, "bad_image")
        self.assertEqual(self.budget.in_use, 0)


class StoreBudgetTests(FileServiceTestCase):
    config = dataclasses.replace(
        FileServiceTestCase.config, max_image_pixels=100_000_000, thumbnail_memory=64 * MIB
    )

    def test_an_image_whose_thumbnail_needs_more_than_the_budget_is_refused(self) -> None:
        # 64 megapixels of one byte each, and the overhead: over 64 MiB.
        response = self.upload(bomb_png(8000, 8000), name="wide.png", mime="image/png")
        body = self.assertError(response, 422, "image_too_large")
        self.assertIn("the server allows 64 MiB", body["message"])
        self.assertEqual(self.files_on_disk(), [])

    def test_images_within_the_budget_get_thumbnails(self) -> None:
        out = io.BytesIO()
        Image.new("RGB", (1000, 500), (1, 2, 3)).save(out, "PNG")
        body = self.stored(out.getvalue(), name="ok.png", mime="image/png")
        self.assertTrue(body["thumbnail_url"])
