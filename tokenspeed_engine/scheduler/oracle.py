"""Pure-Python reference planner: the policy of the C++ scheduler, written for clarity.

It is a test oracle: on random workloads the C++ plans (request ids, slots, inputs,
positions, lengths, page ids in the block table) and statistics must equal this one's.
The policy is documented in csrc/scheduler/README.md; every rule below mirrors one there.
Only plain lists and dicts are used; the prefix cache is keyed by exact token tuples, so
it needs no hash and can never have a false hit.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

NULL_PAGE = 0
MAX_INFLIGHT_PLANS = 2

# Legal FSM transitions: (state, event) -> next state.
TRANSITIONS = {
    ("Waiting", "Admit"): "Prefilling",
    ("Retracted", "Admit"): "Prefilling",
    ("Prefilling", "PrefillDone"): "Decoding",
    ("Prefilling", "Retract"): "Retracted",
    ("Decoding", "Retract"): "Retracted",
    **{(s, "Finish"): "Finished" for s in ("Waiting", "Prefilling", "Decoding", "Retracted")},
}


def fire(request_id: int, state: str, event: str) -> str:
    nxt = TRANSITIONS.get((state, event))
    if nxt is None:
        raise RuntimeError(f"request {request_id}: event '{event}' is illegal in state '{state}'")
    return nxt


@dataclass
class OraclePlan:
    step: int
    request_ids: np.ndarray
    slots: np.ndarray
    prefix_lens: np.ndarray
    extend_lens: np.ndarray
    sample: np.ndarray
    input_ids: np.ndarray
    positions: np.ndarray
    block_table: np.ndarray

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass
class OracleStats:
    pages_total: int
    pages_free: int
    pages_used: int
    pages_cached: int
    num_waiting: int
    num_running: int
    num_inflight_plans: int
    prefix_hit_tokens: int
    prefix_lookup_tokens: int
    num_retractions: int
    num_finished: int
    num_steps: int


class _Pool:
    """Free stack (pop from the end), refcounts, LRU of cached pages nobody holds."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.refcount = [0] * num_pages
        self.cached = [False] * num_pages
        self.free = list(range(num_pages - 1, 0, -1))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.used = 0
        self.on_evict = lambda page: None

    def allocate(self) -> int | None:
        if self.free:
            page = self.free.pop()
        elif self.lru:
            page, _ = self.lru.popitem(last=False)
            self.cached[page] = False
            self.on_evict(page)
        else:
            return None
        self.refcount[page] = 1
        self.used += 1
        return page

    def share(self, page: int) -> int:
        assert self.cached[page]
        if self.refcount[page] == 0:
            del self.lru[page]
            self.used += 1
        self.refcount[page] += 1
        return page

    def unref(self, page: int) -> None:
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            self.used -= 1
            if self.cached[page]:
                self.lru[page] = None
            else:
                self.free.append(page)


class _PrefixCache:
    """Entries keyed by (parent page, page token tuple): exactly the C++ chain."""

    def __init__(self, pool: _Pool, page_size: int) -> None:
        self.pool, self.page_size = pool, page_size
        self.entries: dict[tuple[int, tuple[int, ...]], int] = {}
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.children = [0] * pool.num_pages
        pool.on_evict = self.on_evict

    def match(self, tokens: list[int], max_pages: int) -> list[int]:
        pages, prev, size = [], NULL_PAGE, self.page_size
        for i in range(max_pages):
            page = self.entries.get((prev, tuple(tokens[i * size : (i + 1) * size])))
            if page is None:
                break
            pages.append(page)
            prev = page
        return pages

    def insert(self, page: int, parent: int, tokens: tuple[int, ...]) -> None:
        key = (parent, tokens)
        assert key not in self.entries
        self.pool.cached[page] = True
        self.entries[key] = page
        self.key_of[page] = key
        if parent != NULL_PAGE:
            self.children[parent] += 1

    def on_evict(self, page: int) -> None:
        assert self.children[page] == 0, "evicting a page with cached children"
        key = self.key_of.pop(page)
        del self.entries[key]
        if key[0] != NULL_PAGE:
            self.children[key[0]] -= 1


class _Request:
    def __init__(self, rid: int, arrival: int, tokens: list[int], max_new: int) -> None:
        self.id, self.arrival = rid, arrival
        self.tokens, self.prompt_len, self.max_new = tokens, len(tokens), max_new
        self.state = "Waiting"
        self.pending = 0  # issued plans that will still report tokens for it
        self.inflight_refs = 0
        self.sched_step = 0
        self.retracted_step = 0
        # Resident fields (Prefilling / Decoding only).
        self.slot: int | None = None
        self.pages: list[int] = []
        self.sched = 0
        self.cached_pages = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def _arrival(r: _Request) -> int:
    return r.arrival


class OracleScheduler:
    def __init__(self, config) -> None:
        self.cfg = config
        self.P = config.page_size
        self.pool = _Pool(config.num_pages)
        self.cache = _PrefixCache(self.pool, self.P) if config.enable_prefix_cache else None
        cols = -(-config.max_context_len // self.P)
        self.block_table = np.zeros((config.max_running_requests, cols), dtype=np.int32)
        self.row_len = [0] * config.max_running_requests
        self.free_slots = list(range(config.max_running_requests - 1, -1, -1))
        self.live: dict[int, _Request] = {}
        self.running: list[_Request] = []  # by arrival
        self.waiting: list[_Request] = []  # by arrival
        self.inflight: list[tuple[int, list[tuple[_Request, int, bool]]]] = []
        self.next_arrival = 0
        self.step = 0
        self.hit_tokens = self.lookup_tokens = self.retractions = self.finished = 0

    # ---- submit ---------------------------------------------------------------
    def submit(self, rid: int, tokens, max_new_tokens: int) -> None:
        tokens = [int(t) for t in tokens]
        if rid in self.live:
            raise ValueError(f"submit: request {rid} already exists (state {self.live[rid].state})")
        if not tokens or max_new_tokens < 1 or min(tokens) < 0:
            raise ValueError(f"submit: request {rid}: bad tokens or max_new_tokens")
        extent = len(tokens) + max_new_tokens - 2 + self.cfg.decode_width
        if extent > self.cfg.max_context_len or -(-extent // self.P) > self.pool.num_pages - 1:
            raise ValueError(f"submit: request {rid} does not fit")
        r = _Request(rid, self.next_arrival, tokens, max_new_tokens)
        self.next_arrival += 1
        self.waiting.append(r)
        self.live[rid] = r

    # ---- planning ---------------------------------------------------------------
    def next_plan(self) -> OraclePlan:
        if len(self.inflight) >= MAX_INFLIGHT_PLANS:
            raise RuntimeError("next_plan: two plans are in flight; call advance() first")
        self.step += 1
        out = {k: [] for k in ("ids", "slots", "prefix", "extend", "sample", "inputs", "positions")}
        rec: list[tuple[_Request, int, bool]] = []
        budget = self.cfg.max_num_batched_tokens
        w = self.cfg.decode_width

        i = 0  # 1. decodes, oldest first
        while i < len(self.running):
            r = self.running[i]
            if r.state != "Decoding" or (w > 1 and r.pending > 0) or r.generated + r.pending >= r.max_new:
                i += 1
                continue
            if not self._ensure_pages(r, r.sched + w):
                continue
            self._emit(out, r, r.sched, w, True)
            inputs = out["inputs"]
            inputs[-w] = r.tokens[r.sched] if r.sched < len(r.tokens) else -1
            r.sched += w
            r.pending += 1
            rec.append((r, w, True))
            budget -= w
            i += 1

        i = 0  # 2. running prefills, oldest first
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            if r.state != "Prefilling" or r.sched_step == self.step:
                i += 1
                continue
            end = r.sched + min(budget, len(r.tokens) - r.sched)
            if not self._ensure_pages(r, end):
                continue
            budget -= end - r.sched
            self._emit_chunk(out, rec, r, end)
            i += 1

        while budget > 0 and self.waiting:  # 3. admission, strict FCFS
            r = self.waiting[0]
            if r.pending > 0 or r.retracted_step == self.step:
                break
            if len(self.running) >= self.cfg.max_running_requests:
                break
            n = len(r.tokens)
            hit = self.cache.match(r.tokens, (n - 1) // self.P) if self.cache else []
            hit_tokens = len(hit) * self.P
            end = hit_tokens + min(budget, n - hit_tokens)
            need = -(-end // self.P) - len(hit)
            unheld = sum(1 for p in hit if self.pool.refcount[p] == 0)
            if need > len(self.pool.free) + len(self.pool.lru) - unheld:
                break
            r.slot = self.free_slots.pop()
            for p in hit:
                self._push_page(r, self.pool.share(p))
            for _ in range(need):
                self._push_page(r, self.pool.allocate())
            r.cached_pages, r.sched = len(hit), hit_tokens
            self.hit_tokens += hit_tokens
            self.lookup_tokens += n
            self.waiting.pop(0)
            r.state = fire(r.id, r.state, "Admit")
            bisect.insort(self.running, r, key=_arrival)
            budget -= end - hit_tokens
            self._emit_chunk(out, rec, r, end)

        for r, _, _ in rec:
            r.inflight_refs += 1
        self.inflight.append((self.step, rec))
        i32 = np.int32
        return OraclePlan(
            self.step, np.array(out["ids"], np.int64), np.array(out["slots"], i32),
            np.array(out["prefix"], i32), np.array(out["extend"], i32),
            np.array(out["sample"], np.uint8), np.array(out["inputs"], i32),
            np.array(out["positions"], i32), self.block_table,
        )  # fmt: skip

    def _emit(self, out, r: _Request, start: int, n: int, sample: bool) -> None:
        out["ids"].append(r.id)
        out["slots"].append(r.slot)
        out["prefix"].append(start)
        out["extend"].append(n)
        out["sample"].append(1 if sample else 0)
        out["inputs"].extend([-1] * n)
        out["positions"].extend(range(start, start + n))
        r.sched_step = self.step

    def _emit_chunk(self, out, rec, r: _Request, end: int) -> None:
        last = end == len(r.tokens)
        self._emit(out, r, r.sched, end - r.sched, last)
        out["inputs"][len(out["inputs"]) - (end - r.sched) :] = r.tokens[r.sched : end]
        r.sched = end
        if last:
            r.pending += 1
            rec.append((r, 1, False))
            r.state = fire(r.id, r.state, "PrefillDone")

    def _push_page(self, r: _Request, page: int) -> None:
        self.block_table[r.slot, len(r.pages)] = page
        self.row_len[r.slot] = max(self.row_len[r.slot], len(r.pages) + 1)
        r.pages.append(page)

    def _ensure_pages(self, r: _Request, end: int) -> bool:
        need = -(-end // self.P)
        while len(r.pages) < need:
            page = self.pool.allocate()
            if page is not None:
                self._push_page(r, page)
                continue
            victim = next(q for q in reversed(self.running) if q.sched_step != self.step)
            self._retract(victim)
            if victim is r:
                return False
        return True

    def _release_resident(self, r: _Request) -> None:
        for page in reversed(r.pages):  # last page first, like the C++ Resident
            self.pool.unref(page)
        r.pages = []
        self.block_table[r.slot, : self.row_len[r.slot]] = 0
        self.row_len[r.slot] = 0
        self.free_slots.append(r.slot)
        r.slot, r.sched, r.cached_pages = None, 0, 0

    def _retract(self, r: _Request) -> None:
        self.running.remove(r)
        r.state = fire(r.id, r.state, "Retract")
        self._release_resident(r)
        r.retracted_step = self.step
        bisect.insort(self.waiting, r, key=_arrival)
        self.retractions += 1

    # ---- advance / finish ---------------------------------------------------------
    def advance(self, events=(), finished=(), aborted=()) -> list[tuple[int, str]]:
        if not self.inflight:
            raise RuntimeError("advance: no plan in flight; call next_plan() first")
        step, rec = self.inflight[0]
        items = events.items() if isinstance(events, dict) else events
        index = {r.id: k for k, (r, _, _) in enumerate(rec)}
        reported: dict[int, list[int]] = {}
        for rid, toks in items:
            k = index.get(int(rid))
            if k is None:
                raise ValueError(f"advance: request {rid} has no token-producing entry in step {step}")
            if k in reported:
                raise ValueError(f"advance: request {rid} reported twice in step {step}")
            toks = [int(t) for t in toks]
            r, width, _ = rec[k]
            if r.state != "Finished" and (not 1 <= len(toks) <= width or min(toks) < 0):
                raise ValueError(f"advance: request {rid} (state {r.state}) reported {len(toks)} tokens")
            reported[k] = toks
        stop = set()
        for rid in finished:
            if int(rid) not in index:
                raise ValueError(f"advance: finished request {rid} has no token-producing entry in step {step}")
            stop.add(index[int(rid)])
        aborted = [int(a) for a in aborted]
        for k, (r, _, _) in enumerate(rec):
            if r.state != "Finished" and k not in reported and k not in stop and r.id not in aborted:
                raise ValueError(f"advance: request {r.id} (state {r.state}) reported no tokens in step {step}")

        done: list[tuple[int, str]] = []
        for k, (r, width, decode) in enumerate(rec):
            if r.state == "Finished":
                continue
            r.pending -= 1
            if k in reported:
                toks = reported[k]
                r.tokens.extend(toks[: r.max_new - r.generated])
                if decode and r.state == "Decoding":
                    r.sched -= width - len(toks)
            if r.generated >= r.max_new:
                self._finish(r, "length", done)
            elif k in stop:
                self._finish(r, "stop", done)
        for rid in aborted:
            if rid in self.live:
                self._finish(self.live[rid], "abort", done)
        for r, _, _ in rec:
            r.inflight_refs -= 1
        self.inflight.pop(0)
        return done

    def advance_arrays(self, request_ids, num_tokens, tokens, finished=None, aborted=None):
        events, off = [], 0
        for rid, n in zip(request_ids, num_tokens, strict=True):
            events.append((int(rid), tokens[off : off + int(n)]))
            off += int(n)
        return self.advance(events, finished or (), aborted or ())

    def abort(self, rid: int) -> bool:
        if rid not in self.live:
            return False
        self._finish(self.live[rid], "abort", [])
        return True

    def _finish(self, r: _Request, reason: str, done: list) -> None:
        if r.state in ("Prefilling", "Decoding"):
            if self.cache is not None:
                self._cache_pages(r)
            self.running.remove(r)
            r.state = fire(r.id, r.state, "Finish")
            self._release_resident(r)
        else:
            self.waiting.remove(r)
            r.state = fire(r.id, r.state, "Finish")
        self.finished += 1
        done.append((r.id, reason))
        del self.live[r.id]

    def _cache_pages(self, r: _Request) -> None:
        P = self.P
        full = min(min(r.sched, len(r.tokens)) // P, len(r.pages))
        prev = r.pages[r.cached_pages - 1] if r.cached_pages > 0 else NULL_PAGE
        for i in range(r.cached_pages, full):
            toks = tuple(r.tokens[i * P : (i + 1) * P])
            found = self.cache.entries.get((prev, toks))
            if found is None:
                self.cache.insert(r.pages[i], prev, toks)
                prev = r.pages[i]
            else:  # same tokens cached by another request: hold that page, drop our copy
                self.pool.share(found)
                self.block_table[r.slot, i] = found
                self.pool.unref(r.pages[i])
                r.pages[i] = found
                prev = found

    # ---- introspection ---------------------------------------------------------------
    def stats(self) -> OracleStats:
        return OracleStats(
            pages_total=self.pool.num_pages - 1, pages_free=len(self.pool.free),
            pages_used=self.pool.used, pages_cached=len(self.pool.lru),
            num_waiting=len(self.waiting), num_running=len(self.running),
            num_inflight_plans=len(self.inflight), prefix_hit_tokens=self.hit_tokens,
            prefix_lookup_tokens=self.lookup_tokens, num_retractions=self.retractions,
            num_finished=self.finished, num_steps=self.step,
        )  # fmt: skip

    def has_request(self, rid: int) -> bool:
        return rid in self.live

    def request_info(self, rid: int) -> dict:
        r = self.live[rid]
        return dict(
            request_id=r.id, state=r.state, tokens=list(r.tokens), prompt_len=r.prompt_len,
            max_new_tokens=r.max_new, pending_steps=r.pending,
            slot=-1 if r.slot is None else r.slot, sched=r.sched,
            cached_pages=r.cached_pages, pages=list(r.pages),
        )  # fmt: skip

    def cached_page_tokens(self, page: int) -> list[int]:
        if self.cache is None or page not in self.cache.key_of:
            return []
        return list(self.cache.key_of[page][1])

    def check_invariants(self) -> None:
        pool = self.pool
        assert pool.used + len(pool.free) + len(pool.lru) == pool.num_pages - 1
        holders = [0] * pool.num_pages
        for r in self.running:
            for page in r.pages:
                holders[page] += 1
        for page in range(1, pool.num_pages):
            assert holders[page] == pool.refcount[page], f"page {page} holders/refcount"
            assert holders[page] <= 1 or pool.cached[page], f"private page {page} owned twice"
        assert len(set(pool.free)) == len(pool.free) and NULL_PAGE not in pool.free
