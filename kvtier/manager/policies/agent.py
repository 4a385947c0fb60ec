"""The agent-aware default policy: sessions, the blocks they share and learned call gaps.

What it uses, all of it known to a real server at request time:
- the session a request belongs to (``begin_request``: the client's session id, plus the model, since KV is
  never shared across models) and the arrival time of each request;
- the client's ``next_call_delay_s`` hint when one is sent (e.g. "a tool call is running");
- when each response ended and why (``end_request``: the server produced it, so it knows): after a tool call
  the client comes back in seconds, after an ended turn a person answers first; and when the client says a
  request was its session's last (``final``): that session is not expected back, so its blocks go first;
- which sessions hold each block: used it and have not let it go (seen as requests arrive);
- statistics learned online: each session's past gaps between calls (a geometric mean, by stop reason when
  ends are reported) and all sessions', and the share of sessions that called again after each stop reason.
No constant in it is fitted to a trace (the defaults below only seed what is learned). It never sees a
trace's future. On the Weka traces a session's next call is not predictable much better than
that (the log-spread of the gap after a tool call stays about 1.06 whatever the server conditions on), which is
what keeps this policy below Belady at the smallest capacities; see issue 4's note.

How it evicts:
1. A session's stale branch (the blocks its latest request left out) before its live context, each stale
   block predicted to stay unused for as long as it has been unused: a new request of an agent usually
   re-sends its whole context (v8's Claude Code sessions: 4% of stale blocks are ever asked for again), but
   some sessions alternate between branches (Weka's v6 release: 69% come back, half of them within 13 s),
   so a branch left out a moment ago is not thrown away ahead of contexts idle for minutes (nor taken in one
   batch with the session's older stale blocks).
2. Whole sessions in order of their predicted next call, furthest first. A session that has been quiet
   for longer than its usual gap is predicted to stay quiet for as long again (heavy-tailed pauses). A session
   whose request has arrived and waits in the server's queue (it has read and stored nothing yet) is needed
   first, the earliest arrival before later ones: served behind the router its context sat in the queue as a
   stale branch of a request that ended minutes ago and was evicted just before it was read (at a capacity
   cliff the policy then served no more from cache than LRU).
3. Within a session, leaves first: the deepest blocks of its context go before their ancestors, so what is
   kept is always a usable prefix.
4. A block is held by every session whose latest request used it (a common system prompt and tools, the
   context a forked, resumed or subagent session re-sends from another): it leaves the cache only once every
   session holding it has let it go, so it is needed when the soonest of them calls again. Evicting a session
   releases its blocks; the ones another session holds stay, as the prefix that session needs.

What it admits: a missed block displaces a held one only if its session is predicted to call again before the
session it would evict from (its own stale blocks always make room). When more sessions are live than fit, storing
every miss would push out a context that is needed sooner, over and over (LRU's cliff); instead the sessions
that fit stay resident and the others recompute, shallow blocks kept first. Only blocks a session holds alone
count as room it would give up.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Collection, Hashable, Sequence

from kvtier.manager.policies.base import Key, Policy, pop_front

DEFAULT_GAP_S = 30.0
_GAP_WEIGHT = 0.3  # EMA weight of the newest gap (in log space)
_MIN_GAP_S = 0.05
_RETURN_WINDOW = 1000  # responses of one stop reason the share of returning sessions is learned over
# sessions that hold no block are remembered (what was learned of their gaps) up to this many, the least recently
# active forgotten first: a server sees ever more sessions (every conversation is one), memory must not grow with them
MAX_IDLE_SESSIONS = 65_536
_NOBODY = object()


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class _Session:
    __slots__ = ("order", "fresh", "live", "alone", "last_arrival", "log_gap", "hinted_delay", "last_end",
                 "last_stop", "log_gap_after", "final", "waiting")

    def __init__(self) -> None:
        # the blocks it holds, leaf-first (oldest / deepest first) -> when a request last used it
        self.order: OrderedDict[Key, float] = OrderedDict()
        self.fresh = 0                        # entries (at the end of order) touched by the latest request
        self.live = 0                         # ``fresh`` as the latest request left it (before the current one)
        self.alone = 0                        # entries no other session holds (what evicting it frees)
        self.last_arrival: float | None = None
        self.log_gap: float | None = None
        self.hinted_delay: float | None = None
        self.last_end: float | None = None    # when its latest response ended (None: still generating)
        self.last_stop: str | None = None
        self.log_gap_after: dict[str | None, float] = {}  # log gap from a response's end to the next call
        self.final = False                    # the client said its latest request was the last
        self.waiting = False                  # its latest request arrived and has not read or stored a block yet


class AgentAware(Policy):
    name = "agent"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._sessions: dict[Hashable, _Session] = {}
        self._holding: dict[Hashable, _Session] = {}   # sessions with at least one entry
        self._idle: OrderedDict[Hashable, None] = OrderedDict()   # the others, least recently active first
        # every cached block -> its session (any one of them when several hold it); blocks several sessions hold
        # -> all of them. A set per block would cost ~200 B each where most blocks have one holder.
        self._holder: dict[Key, Hashable] = {}
        self._holders: dict[Key, set[Hashable]] = {}
        self._now = 0.0
        self._global_log_gap: float | None = None
        self._log_gap_after: dict[str | None, float] = {}   # all sessions, by stop reason
        self._log_busy: float | None = None                # log time from arrival to response end
        self._ended: Counter[str | None] = Counter()       # responses by stop reason (decaying counts)
        self._returned: Counter[str | None] = Counter()    # ... after which the session called again

    def _session(self, sid: Hashable) -> _Session:
        s = self._sessions.get(sid)
        if s is None:
            s = self._sessions[sid] = _Session()
            self._went_idle(sid)
        return s

    def _went_idle(self, sid: Hashable) -> None:
        """``sid`` holds no block (now, or since it was first seen); forget the longest idle beyond the bound."""
        self._idle[sid] = None
        while len(self._idle) > MAX_IDLE_SESSIONS:
            del self._sessions[self._idle.popitem(last=False)[0]]

    # --- request context ---------------------------------------------------------------------------------
    def begin_request(self, session: Hashable, now: float, next_call_delay_s: float | None = None) -> None:
        s = self._session(session)
        if s.last_arrival is not None:
            log_gap = math.log(max(_MIN_GAP_S, now - s.last_arrival))
            s.log_gap = _ema(s.log_gap, log_gap, _GAP_WEIGHT)
            self._global_log_gap = _ema(self._global_log_gap, log_gap, 0.01)
        if s.last_end is not None and not s.final:
            self._returned[s.last_stop] += 1
            log_gap = math.log(max(_MIN_GAP_S, now - s.last_end))
            s.log_gap_after[s.last_stop] = _ema(s.log_gap_after.get(s.last_stop), log_gap, _GAP_WEIGHT)
            self._log_gap_after[s.last_stop] = _ema(self._log_gap_after.get(s.last_stop), log_gap, 0.01)
        s.last_arrival, s.last_end, s.final, s.waiting = now, None, False, True
        s.hinted_delay = None if next_call_delay_s is None else max(0.0, next_call_delay_s)
        s.live = s.fresh   # until the request reads or stores, its context is what the previous one used
        self._now = max(self._now, now)
        if session in self._idle:
            self._idle.move_to_end(session)

    def end_request(self, session: Hashable, now: float, stop_reason: str | None = None, final: bool = False) -> None:
        s = self._session(session)
        s.waiting = False
        if s.last_arrival is not None and s.last_end is None:
            self._log_busy = _ema(self._log_busy, math.log(max(_MIN_GAP_S, now - s.last_arrival)), 0.01)
        s.last_end, s.last_stop, s.final = now, stop_reason, final
        self._now = max(self._now, now)
        if final:  # known not to return: nothing to learn about returns from it
            return
        self._ended[stop_reason] += 1
        if self._ended[stop_reason] > _RETURN_WINDOW:
            self._ended[stop_reason] /= 2
            self._returned[stop_reason] /= 2

    def _gap_after(self, s: _Session, stop: str | None) -> float | None:
        """Expected log gap from a response's end to the session's next call, for that stop reason."""
        for table in (s.log_gap_after, self._log_gap_after):
            if stop in table:
                return table[stop]
        return self._global_log_gap

    @staticmethod
    def _stale_back(used: float, now: float) -> float:
        """When a stale block last used at ``used`` is expected back: unused for as long again."""
        return now + (now - used)

    def _stale_prediction(self, s: _Session, now: float) -> float:
        """When the oldest of ``s``'s stale blocks is expected back (never, once its session is over)."""
        return math.inf if s.final else self._stale_back(next(iter(s.order.values())), now)

    def _front_prediction(self, s: _Session, now: float) -> float:
        """The predicted next use of the entries ``evict`` would take next from ``s``: stale ones first."""
        return self._stale_prediction(s, now) if len(s.order) > s.fresh else self.predicted_next_call(s, now)

    def predicted_next_call(self, s: _Session, now: float) -> float:
        """The client's hint while it holds; else the session's typical gap after its last response (by why
        that response stopped: a tool call comes back in seconds, a finished turn waits for a person) or,
        where ends are not reported, after its last arrival. A session quiet for longer than its usual gap
        is predicted to stay quiet for as long again (heavy-tailed pauses)."""
        if s.last_arrival is None or s.final:
            return math.inf
        if s.waiting:  # queued in the server: its context is read as soon as the scheduler reaches it
            return s.last_arrival
        if s.hinted_delay is not None and now <= s.last_arrival + s.hinted_delay:
            return s.last_arrival + s.hinted_delay
        if self._log_busy is not None:  # the server reports when responses end and why
            if s.last_end is None:      # still generating: its context is needed again after this response
                after = self._gap_after(s, "tool_use")
                return max(now, s.last_arrival + math.exp(self._log_busy)) + \
                    (math.exp(after) if after is not None else DEFAULT_GAP_S)
            since, log_gap = s.last_end, self._gap_after(s, s.last_stop)
            returning = self._share_returning(s.last_stop)
        else:
            since, log_gap = s.last_arrival, s.log_gap if s.log_gap is not None else self._global_log_gap
            returning = 1.0
        gap = math.exp(log_gap) if log_gap is not None else DEFAULT_GAP_S
        elapsed = now - since
        quiet_for = since + gap - now if elapsed < gap else elapsed
        return now + quiet_for / returning

    def _share_returning(self, stop: str | None) -> float:
        """How many of the sessions whose response stopped for ``stop`` called again (learned online; the
        gaps above are learned only from those that did, so a stop that ends most sessions, as a finished
        subagent's last turn does, would otherwise promise a return that never comes)."""
        return min(1.0, (self._returned[stop] + 1) / (self._ended[stop] + 1))

    # --- membership --------------------------------------------------------------------------------------
    def _hold(self, sid: Hashable, s: _Session, key: Key) -> None:
        """``s`` holds ``key`` as its newest entry (moved there if it held it already)."""
        if key in s.order:
            s.order.move_to_end(key)
            s.order[key] = self._now
            return
        s.order[key] = self._now
        holder = self._holder.get(key, _NOBODY)
        if holder is _NOBODY:
            self._holder[key] = sid
            s.alone += 1
        elif (holders := self._holders.get(key)) is not None:
            holders.add(sid)
        else:
            self._sessions[holder].alone -= 1
            self._holders[key] = {holder, sid}
        if sid not in self._holding:
            self._holding[sid] = s
            self._idle.pop(sid, None)

    def _let_go(self, sid: Hashable, s: _Session, key: Key) -> bool:
        """``s`` no longer holds ``key`` (already out of its order); True when no session holds it now."""
        holders = self._holders.get(key)
        if holders is None:
            del self._holder[key]
            s.alone -= 1
            return True
        holders.discard(sid)
        if len(holders) == 1:
            last = holders.pop()
            del self._holders[key]
            self._holder[key] = last
            self._sessions[last].alone += 1
        return False

    @staticmethod
    def _started(s: _Session) -> None:
        """``s``'s queued request stores without having read: it waits in no queue now, and what it did not read is
        stale (reading, ``touch_request`` recounts its fresh blocks instead)."""
        if s.waiting:
            s.waiting, s.fresh = False, 0

    def insert(self, key: Key, session: Hashable = None) -> None:
        """``session`` holds ``key`` as its newest entry (a demoted key too: victims arrive leaf-first, so
        appending keeps that order)."""
        s = self._session(session)
        self._started(s)
        self._hold(session, s, key)
        s.fresh = min(s.fresh + 1, len(s.order))

    def access(self, key: Key, session: Hashable = None) -> None:
        self.insert(key, session)

    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        s, hold = self._session(session), self._hold
        for key in reversed(keys):
            hold(session, s, key)
        s.fresh, s.waiting = min(len(keys), len(s.order)), False

    def remove(self, key: Key) -> None:
        for sid in self._holders.get(key, {self._holder[key]}).copy():
            s = self._sessions[sid]
            del s.order[key]
            s.fresh = min(s.fresh, len(s.order))
            self._let_go(sid, s, key)
            if not s.order:
                del self._holding[sid]
                self._went_idle(sid)

    # --- admission ---------------------------------------------------------------------------------------
    def admit(self, keys: Sequence[Key], session: Hashable = None) -> Sequence[Key]:
        """The leading part of a request's new ``keys`` worth the room it takes (see the module)."""
        room = self.capacity - len(self._holder)
        if len(keys) <= room or session is None:  # without a session there is no next call to predict
            return keys
        now = self._now
        cur = self._session(session)
        self._started(cur)   # a request that stores has been computed
        mine = self.predicted_next_call(cur, now)
        parts = []   # (predicted next use, blocks evicting it frees): each session's stale and live blocks
        for sid, s in self._holding.items():
            if sid != session:
                n_stale = min(len(s.order) - s.fresh, s.alone)
                if n_stale:
                    parts.append((self._stale_prediction(s, now), n_stale))
                parts.append((self.predicted_next_call(s, now), s.alone - n_stale))
        parts.sort(reverse=True)
        # the session's own blocks that its previous request left out are stale: they always make room
        admitted = max(room, 0) + min(max(0, len(cur.order) - cur.live), cur.alone)
        for next_use, n_freed in parts:
            if admitted >= len(keys) or next_use <= mine:
                break
            admitted += n_freed
        return keys[:admitted]

    # --- eviction ----------------------------------------------------------------------------------------
    def _to_take(self, s: _Session, wanted: int, runner_up: float, now: float) -> int:
        """How many blocks the victim ``s`` gives up now. Its stale blocks were left out at different times: it
        takes those expected back after the runner-up's front (at least one), not a whole batch on the strength
        of the oldest. Live blocks were all used by its latest request: as many as wanted."""
        stale = len(s.order) - s.fresh
        if stale <= 0 or s.final:
            return wanted
        limit, take = min(wanted, stale), 0
        for used in s.order.values():
            if take == limit or (take and self._stale_back(used, now) < runner_up):
                break
            take += 1
        return take

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        """Sessions let their blocks go, furthest predicted first; a block leaves once nobody holds it.

        Within one call only the victim's prediction changes (its front moves), so the sessions are ranked once
        in a heap and the victim is pushed back with its new front: a call costs O(sessions) rather than
        O(sessions) per victim, which with thousands of sessions holding a few blocks each is the difference
        between a replay of minutes and one of hours."""
        out: list[Key] = []
        now = self._now
        # (-prediction, rank in _holding, session): ties go to the session listed first, as a scan would
        heap = [(-self._front_prediction(s, now), rank, sid) for rank, (sid, s) in enumerate(self._holding.items())]
        heapq.heapify(heap)
        while len(out) < n and heap:
            _, rank, sid = heapq.heappop(heap)
            runner_up = -heap[0][0] if heap else -math.inf
            s = self._holding[sid]
            stale = len(s.order) - s.fresh
            want = self._to_take(s, n - len(out), runner_up, now)
            got = pop_front(s.order, want, busy)
            taken_stale = min(len(got), max(0, stale))
            s.fresh = min(max(0, s.fresh - (len(got) - taken_stale)), len(s.order))
            out.extend(key for key in got if self._let_go(sid, s, key))
            if not s.order:
                del self._holding[sid]
                self._went_idle(sid)
            elif len(got) == want:   # otherwise the rest of its blocks are busy: not a victim in this call
                heapq.heappush(heap, (-self._front_prediction(s, now), rank, sid))
        return out

    def __len__(self) -> int:
        return len(self._holder)

    def __contains__(self, key: Key) -> bool:
        return key in self._holder

