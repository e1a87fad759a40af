"""Continuous batching: many requests decode together, one forward per step over all their draft trees.

Live requests hold the first rows of one KV cache, joining requests the rows after them, first come first. A
step first prefills joining requests, up to ``prefill_chunk`` prompt tokens: every one whose remaining prompt fits
whole (oldest first; it moves before a long prompt that is half in), else, if nothing else was prefilled, whole
chunks of ``decodekit.decoding.PREFILL_CHUNK`` tokens of the oldest one (at least one chunk). So a long prompt is
scored a chunk at a time between the live requests' steps instead of stalling them, and a short one that comes
after it does not wait for it. A request whose prompt is all in goes live where it is. Then every live request
drafts with its own drafter, the trees are padded to one size and scored in one forward, and each row is
verified and committed on its own, so a request's greedy output does not depend on what else is in the batch.
A request leaves between steps: the last live row moves into a live row's place, and the joining rows move down
one (only the oldest may hold entries, so both moves cost at most one copy of a row's entries each).

Load-aware speculation (SmartSpec's goodput): before drafting, the batch picks one tree width ``w`` (nodes per
row, root included) for the step, the one with the most expected committed tokens per second::

    goodput(w) = sum_b E_b(w) / (step seconds(B rows, w nodes) + drafting seconds if w > 1)

``E_b(w)`` sums request b's running rate of each of the first ``w`` node indices lying on its accepted path (the
root's rate is 1: it stands for the bonus token). A step's seconds come from :class:`StepCost`: forwards timed at
start, corrected by the steps since measured at each batch size and width. Drafts are
cut to their first ``w`` nodes (still a tree). At ``w = 1`` no drafter proposes (each still observes the step):
plain decoding. Rates come from scoring each whole draft against the text that followed it, which greedy
verification would have accepted node for node, so nodes cut off (or never verified) are scored too; in steps
at ``w = 1`` each drafter still proposes every ``max(SHADOW_EVERY, B)`` steps, only to be scored, the rows taking
turns, so a step carries about one such proposal at most rather than every row's at once. Under load-aware
speculation only a request that decodes alone when its prefill completes (or a pinned one) gets prompt logits:
they cost a vocabulary-wide projection per prompt token, batch of one, and only seed drafters such as recycling,
whose pooled state is warm from earlier requests anyway.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from decodekit.decoding import Chunk, Decoding
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Tree
from decodekit.runtime.kv_cache import GROWTH, KVCache, rounded_capacity
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.model import Transformer
from decodekit.verify import continuation_matches

REQUEST_RATE = 0.25  # weight of a scored draft in its request's node rates
METHOD_RATE = 0.05  # ... in its method's rates (the plain mean over the method's first 20 drafts)
WARMUP_DRAFTS = 8  # a method drafts its whole tree until this many of its drafts were scored
# goodput a wider tree may give up when one request decodes alone: its drafter learns from every verified node
# (Token Recycling's matrix), which the estimate leaves out; under load, ties go to the narrower tree
WIDTH_TOLERANCE = 0.03
SHADOW_EVERY = 8  # in steps without drafts, a row proposes anyway every so many steps (or B), to keep scoring
DRAFT_COST_RATE = 0.2  # weight of a step in a request's running drafting seconds
MAX_METHODS = 64  # method specs whose rates are kept (the oldest is forgotten first)
COST_RATE = 0.1  # weight of a step in the running ratio of measured to table seconds at its batch size and width


def best_width(
    node_rates: torch.Tensor, forward_seconds: torch.Tensor, draft_seconds: float, tolerance: float = 0.0
) -> int:
    """The widest tree whose expected committed tokens per second are within ``tolerance`` of the best.

    ``node_rates`` float ``[B, W]``: row b's chance that node i lies on its accepted path (column 0, the root,
    is 1: it stands for the bonus token). ``forward_seconds`` float ``[W]``: a step's forward at width 1..W.
    ``draft_seconds``: what drafting adds to a step of width > 1. Returns w in [1, W].
    """
    expected = node_rates.cumsum(dim=1).sum(dim=0)
    seconds = forward_seconds + draft_seconds * (torch.arange(forward_seconds.numel()) > 0)
    goodput = expected / seconds
    return int((goodput >= goodput.max() * (1 - tolerance)).nonzero().max()) + 1


def interpolate(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``y(x)`` through the points ``(xs, ys)`` (``xs`` increasing, at least two), extended
    linearly past both ends."""
    i = torch.searchsorted(xs, x).clamp(1, xs.numel() - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class StepCost:
    """Predicted seconds of a step over ``B`` rows of ``w`` nodes, drafting left out. The prior is a table of
    forwards, ``t1(B w) + tB(B) - t1(B)``, where ``t1(T)`` is a one-row forward of T tokens and ``tB(B)`` a
    forward of B rows of one token (measured by :meth:`calibrate`, interpolated in between). The table leaves out
    context lengths, masks and each row's verification, so :meth:`observe` keeps, per batch size and width, a
    running ratio of measured to table seconds that scales the table; a width not yet measured at a batch size
    borrows the ratio of the nearest narrower one that was."""

    def __init__(
        self, token_counts: list[int], token_seconds: list[float], rows: list[int], row_seconds: list[float]
    ) -> None:
        """Measured points: one-row forwards of ``token_counts`` tokens, one-token forwards of ``rows`` rows. More
        work never costs less: timing noise that says otherwise is flattened."""
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float64).cummax(0).values  # noqa: E731
        self.token_counts, self.token_seconds = as_tensor(token_counts), as_tensor(token_seconds)
        self.rows, self.row_seconds = as_tensor(rows), as_tensor(row_seconds)
        self.ratios: dict[int, torch.Tensor] = {}  # batch size -> float64 [MAX_DRAFT_NODES], NaN where unmeasured

    @staticmethod
    def calibrate(
        transformer: Transformer, cache: KVCache, max_tokens: int = 256, context: int = 512, repeats: int = 3
    ) -> StepCost:
        """Time forwards into ``cache``'s empty rows, each posing as a sequence of about ``context`` tokens (rows
        of different lengths, as in a live batch, so attention takes its masked path); nothing is committed."""
        assert max(cache.lengths) == 0, "calibrate before any request joins"
        context = max(0, min(context, cache.capacity - max_tokens - cache.batch))

        def seconds(rows: int, n: int) -> float:
            tokens = torch.zeros(rows, n, dtype=torch.int64, device=transformer.device)
            view = cache.rows(0, rows)
            view.lengths = [context + row for row in range(rows)]
            times = []
            for _ in range(repeats + 1):  # the first run warms up
                start = time.perf_counter()
                transformer(tokens, view, Tree.chain(n))
                times.append(time.perf_counter() - start)
            view.reset()
            return min(times[1:])

        token_counts = _powers_of_two(min(max_tokens, cache.capacity - context))
        token_seconds = [seconds(1, n) for n in token_counts]
        rows = _powers_of_two(cache.batch)
        row_seconds = [seconds(b, 1) for b in rows]
        if len(rows) == 1:  # one row: the row term is always zero, but interpolation needs two points
            rows, row_seconds = [1, 2], row_seconds * 2
        return StepCost(token_counts, token_seconds, rows, row_seconds)

    def table(self, rows: int, widths: torch.Tensor) -> torch.Tensor:
        """The calibrated forward seconds over ``rows`` rows at each width in ``widths`` (int ``[W]``)."""
        t1 = interpolate(rows * widths.double(), self.token_counts, self.token_seconds)
        b = torch.tensor([float(rows)], dtype=torch.float64)
        row_extra = interpolate(b, self.rows, self.row_seconds) - interpolate(b, self.token_counts, self.token_seconds)
        return (t1 + row_extra).clamp(min=1e-6)

    def predict(self, rows: int, widths: torch.Tensor) -> torch.Tensor:
        """Seconds of a step over ``rows`` rows at each width in ``widths`` (int ``[W]``, each in 1..256)."""
        ratios = self.ratios.get(rows)
        if ratios is None:
            return self.table(rows, widths)
        measured = ~ratios.isnan()
        nearest = torch.where(measured, torch.arange(ratios.numel()), -1).cummax(0).values[widths - 1]
        scale = torch.where(nearest >= 0, ratios[nearest.clamp(min=0)], 1.0)
        return self.table(rows, widths) * scale

    def observe(self, rows: int, width: int, seconds: float) -> None:
        """A step over ``rows`` rows of ``width`` nodes took ``seconds`` (drafting left out)."""
        ratios = self.ratios.setdefault(rows, torch.full((MAX_DRAFT_NODES,), float("nan"), dtype=torch.float64))
        measured = seconds / float(self.table(rows, torch.tensor([width]))[0])
        old = ratios[width - 1]
        ratios[width - 1] = measured if old.isnan() else old + COST_RATE * (measured - old)


def padded_tokens(draft: Draft, size: int) -> torch.Tensor:
    """int64 ``[size]``: the draft's tokens, then copies of its root for the leaves ``Tree.padded`` adds."""
    missing = size - draft.tree.size
    return draft.tokens if missing == 0 else torch.cat([draft.tokens, draft.tokens[:1].expand(missing)])


def _powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, then ``limit``."""
    return [1 << i for i in range(limit.bit_length()) if 1 << i < limit] + [limit]


@dataclass
class Row:
    """A request in the batch: its decoding, node rates (None until its method has data, or while it joins),
    drafting seconds, and the drafts it proposed whose outcome the text has not yet shown."""

    decoding: Decoding
    pinned: bool  # always drafts its whole tree (a seeded sample must not depend on the load)
    node_rates: torch.Tensor | None  # float64 [MAX_DRAFT_NODES]
    draft_seconds: float = 0.0  # running seconds of its drafter per drafting step
    unscored: list[tuple[int, Draft]] = field(default_factory=list)  # (sequence length when proposed, draft)


class Batch:
    """Up to ``max_rows`` requests, live or joining, over one KV cache of ``capacity`` slots per row (None: as
    many as the requests need, the cache growing as they join).

    ``adaptive``: choose each step's tree width by goodput (else every drafter's whole tree, always); it needs a
    ``capacity``, to time forwards when it starts. ``prefill_chunk``: prompt tokens a step may prefill (whole
    chunks of ``decodekit.decoding.PREFILL_CHUNK``, at least one; None: every joining prompt whole).
    Invariant: ``rows`` (live) hold cache rows ``[0, len(rows))``, ``joining`` the next ones in order, and only
    ``joining[0]`` may be partly prefilled.
    """

    def __init__(
        self,
        model: LoadedModel,
        max_rows: int,
        capacity: int | None = None,
        adaptive: bool = False,
        prefill_chunk: int | None = None,
    ) -> None:
        assert capacity is not None or not adaptive, "load-aware speculation times a cache of fixed capacity"
        self.model, self.adaptive, self.prefill_chunk = model, adaptive, prefill_chunk
        self.growing = capacity is None
        self.cache = model.transformer.new_cache(capacity or GROWTH, max_rows)  # grown as requests join
        self.rows: list[Row] = []
        self.joining: list[Row] = []  # first come first, prefilled a few chunks a step
        self.method_rates: dict[str, torch.Tensor] = {}  # node rates a method's next request starts from
        self.method_drafts: dict[str, int] = {}  # scored drafts behind them
        self.cost = StepCost.calibrate(model.transformer, self.cache) if adaptive else None
        self.last_width = 0  # the width of the last step (metrics)
        self.steps = 0

    @property
    def size(self) -> int:
        """Requests in the batch, live and joining."""
        return len(self.rows) + len(self.joining)

    @property
    def full(self) -> bool:
        return self.size >= self.cache.batch

    def join(self, decoding: Decoding, pinned: bool = False) -> None:
        """Queue ``decoding`` to be prefilled into the next free row by the coming steps. Raises PromptTooLong
        when it would not fit."""
        assert not self.full
        if self.growing and decoding.capacity > self.cache.capacity:
            window = self.model.cfg.context_window + MAX_DRAFT_NODES
            self.cache.grow(min(window, rounded_capacity(decoding.capacity)))
        view = self.cache.rows(self.size, self.size + 1)
        view.reset()
        view.check_room(decoding.capacity)
        self.joining.append(Row(decoding, pinned, None))

    def leave(self, decoding: Decoding) -> bool:
        """Free ``decoding``'s row, live or joining (see the invariant); False if it holds none."""
        index = next((i for i, row in enumerate(self.rows + self.joining) if row.decoding is decoding), None)
        if index is None:
            return False
        if index < len(self.rows):
            last = len(self.rows) - 1
            if index != last:
                self.cache.move_row(last, index)
                self.rows[index] = self.rows[last]
            self.rows.pop()
            index = last
        else:
            del self.joining[index - len(self.rows)]
        for row in range(index, self.size):  # the joining rows after the freed one move down
            self.cache.move_row(row + 1, row)
        return True

    def step(self) -> list[tuple[Decoding, Chunk | Exception]]:
        """Prefill joining rows, then one forward over every live row; each live row's committed chunk, or the
        error that failed a row, live or joining (the row stays until the caller makes it leave)."""
        failed = self._prefill()
        if not self.rows:
            return failed
        with self._target_threads():
            return failed + self._decode()

    @contextmanager
    def _target_threads(self) -> Iterator[None]:
        """Run the decode step on one thread fewer while a live row's drafter drafts on a thread of its own
        (PEARL); prefills keep every thread (such a drafter catches up on a prompt in ``begin``, on the caller's)."""
        threads = torch.get_num_threads()
        spare = threads > 1 and any(row.decoding.drafter.drafts_in_parallel for row in self.rows)
        if not spare:
            yield
            return
        torch.set_num_threads(threads - 1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _prefill(self) -> list[tuple[Decoding, Chunk | Exception]]:
        """Spend up to ``prefill_chunk`` prompt tokens on the joining rows (see the module docstring); each whose
        prompt is all in goes live where it is. Returns the error of a row whose prefill failed."""
        spent, budget = 0, self.prefill_chunk
        while self.joining and (budget is None or spent < budget):
            left = None if budget is None else budget - spent
            fits = next(
                (j for j, row in enumerate(self.joining) if left is None or row.decoding.prompt_left <= left), None
            )
            if fits is None and spent:
                break  # the oldest goes on next step
            if fits:
                self._to_front(fits)
            row, index = self.joining[0], len(self.rows)
            seeds = row.pinned or not self.adaptive or not self.rows  # prompt logits, if it completes now
            try:
                spent += row.decoding.prefill(self.cache.rows(index, index + 1), left, seeds)
            except Exception as err:  # a failing prefill fails its own request only
                return [(row.decoding, err)]
            if not row.decoding.prefilled:
                break
            warm = self.method_drafts.get(row.decoding.method, 0) >= WARMUP_DRAFTS
            row.node_rates = self.method_rates[row.decoding.method].clone() if warm else None
            self.rows.append(self.joining.pop(0))
        return []

    def _to_front(self, j: int) -> None:
        """Move ``joining[j]`` (nothing prefilled yet) before the other joining rows, which move up one."""
        first = len(self.rows)
        for row in range(first + j, first, -1):
            self.cache.move_row(row - 1, row)
        self.cache.rows(first, first + 1).reset()
        self.joining.insert(0, self.joining.pop(j))

    def _decode(self) -> list[tuple[Decoding, Chunk | Exception]]:
        """One forward over every live row."""
        step_start = time.perf_counter()
        width = self._width()
        shadow_every = max(SHADOW_EVERY, len(self.rows))
        self.steps += 1
        drafts: list[Draft] = []
        proposed: list[bool] = []
        failed: dict[int, Exception] = {}
        spent_before = [row.decoding.stats.draft_s for row in self.rows]
        for b, row in enumerate(self.rows):
            draft = row.decoding.root_draft()
            shadow = self.cost is not None and (self.steps + b) % shadow_every == 0  # rows take turns
            if row.pinned or width > 1 or shadow:
                try:
                    whole = row.decoding.propose()
                except Exception as err:  # a drafter's bug fails its own request only
                    failed[b] = err
                else:
                    draft = whole if row.pinned else whole.prefix(width)
                    if self.cost is not None and not row.pinned:
                        row.unscored.append((row.decoding.length, whole))
            drafts.append(draft)
            proposed.append((row.pinned or width > 1 or shadow) and b not in failed)

        size = max(draft.tree.size for draft in drafts)
        tokens = torch.stack([padded_tokens(draft, size) for draft in drafts])
        cache = self.cache.rows(0, len(self.rows))
        wanted = {layer for row in self.rows for layer in row.decoding.drafter.wants_hidden}
        capture = dict.fromkeys(wanted) if wanted else None
        start = time.perf_counter()
        try:
            trees = [draft.tree.padded(size) for draft in drafts]
            logits = self.model.transformer(tokens.to(self.model.device), cache, trees, capture=capture)
        except Exception as err:  # the shared forward failed: every live row fails, the batch lives on
            return [(row.decoding, err) for row in self.rows]
        forward_s = time.perf_counter() - start
        self.last_width = size

        results: list[tuple[Decoding, Chunk | Exception]] = []
        for b, (row, draft) in enumerate(zip(self.rows, drafts, strict=True)):
            if b in failed:
                results.append((row.decoding, failed[b]))
                continue
            n, wants = draft.tree.size, row.decoding.drafter.wants_hidden
            hidden = {layer: capture[layer][b, :n] for layer in wants} if wants else None
            try:
                chunk = row.decoding.accept(draft, logits[b, :n], cache, b, forward_s, hidden)
            except Exception as err:
                results.append((row.decoding, err))
                continue
            self._score(row)
            results.append((row.decoding, chunk))
        drafting = [row.decoding.stats.draft_s - spent for row, spent in zip(self.rows, spent_before, strict=True)]
        for row, seconds, drafted in zip(self.rows, drafting, proposed, strict=True):  # propose and observe
            if drafted:
                row.draft_seconds += DRAFT_COST_RATE * (seconds - row.draft_seconds)
        if self.cost is not None:  # the whole step but its drafting: the forward, masks, verification, scoring
            self.cost.observe(len(self.rows), size, time.perf_counter() - step_start - sum(drafting))
        return results

    def _width(self) -> int:
        """This step's tree width: the best by goodput over the unpinned rows; every drafter's whole tree when
        not adaptive or while a row's method has too little data."""
        rows = [row for row in self.rows if not row.pinned]
        if self.cost is None or not rows or any(row.node_rates is None for row in rows):
            return MAX_DRAFT_NODES
        rates = torch.stack([row.node_rates for row in rows])
        widths = torch.arange(1, MAX_DRAFT_NODES + 1)
        forward = self.cost.predict(len(self.rows), widths)
        tolerance = WIDTH_TOLERANCE if len(self.rows) == 1 else 0.0
        return best_width(rates, forward, sum(row.draft_seconds for row in rows), tolerance)

    def _score(self, row: Row) -> None:
        """Score the row's drafts whose continuation is now known (as deep as the draft, or the request ended)
        and fold them into its node rates and its method's. A draft node counts as accepted when the text went
        its way, whether or not the step verified it (greedy verification accepts exactly those)."""
        decoding = row.decoding
        while row.unscored:
            start, draft = row.unscored[0]
            depth = int(draft.tree.depth.max())
            if decoding.length - start < depth and not decoding.done:
                return
            row.unscored.pop(0)
            continuation = decoding.sequence[start : min(decoding.length, start + depth)].tolist()
            _, matches = continuation_matches(draft.tokens.tolist(), draft.tree.parents.tolist(), continuation)
            matched = torch.tensor(matches)
            if draft.candidates is not None:
                matched &= draft.candidates
            accepted = torch.zeros(MAX_DRAFT_NODES, dtype=torch.float64)  # nodes the draft lacked count as rejected
            accepted[: matched.numel()] = matched.double()
            self._learn(row, accepted)

    def _learn(self, row: Row, accepted: torch.Tensor) -> None:
        method = row.decoding.method
        seen = self.method_drafts.get(method, 0)
        if method not in self.method_rates and len(self.method_rates) >= MAX_METHODS:
            oldest = next(iter(self.method_rates))
            del self.method_rates[oldest], self.method_drafts[oldest]
        prior = self.method_rates.setdefault(method, torch.zeros(MAX_DRAFT_NODES, dtype=torch.float64))
        prior += max(1 / (seen + 1), METHOD_RATE) * (accepted - prior)
        self.method_drafts[method] = seen + 1
        if row.node_rates is not None:
            row.node_rates += REQUEST_RATE * (accepted - row.node_rates)
        elif seen + 1 >= WARMUP_DRAFTS:
            row.node_rates = prior.clone()
