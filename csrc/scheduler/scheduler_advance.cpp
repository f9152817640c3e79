// Scheduler: advance() (the executor's report of a step) and the ways a request ends.
#include <algorithm>
#include <string>
#include <unordered_map>

#include "errors.h"
#include "scheduler.h"

namespace tokenspeed::sched {

std::vector<FinishedRequest> Scheduler::advance(const StepEvents& ev) {
  if (inflight_.empty()) throw SchedulerError("advance: no plan in flight; call next_plan() first");
  InflightPlan& rec = inflight_.front();
  const std::string at_step = " in step " + std::to_string(rec.step);
  const size_t n_events = ev.request_ids.size();
  if (ev.num_tokens.size() != n_events) {
    throw InvalidArgument("advance: request_ids and num_tokens differ in length");
  }
  std::vector<size_t> offset(n_events);
  size_t total = 0;
  for (size_t e = 0; e < n_events; ++e) {
    if (ev.num_tokens[e] < 0) throw InvalidArgument("advance: negative token count");
    offset[e] = total;
    total += static_cast<size_t>(ev.num_tokens[e]);
  }
  if (total != ev.tokens.size()) {
    throw InvalidArgument("advance: num_tokens sum to " + std::to_string(total) + " but " +
                          std::to_string(ev.tokens.size()) + " tokens were given");
  }

  // Map reported ids to the plan's token-producing entries. Executors report in plan
  // order, so a cursor finds almost every entry; a hash index covers any other order.
  const size_t n = rec.samples.size();
  std::unordered_map<int64_t, int32_t> index;
  auto find_entry = [&](int64_t id, size_t& cursor) -> int32_t {
    if (cursor < n && rec.samples[cursor].req->id == id) return static_cast<int32_t>(cursor++);
    if (index.empty()) {
      for (size_t k = 0; k < n; ++k) index.emplace(rec.samples[k].req->id, static_cast<int32_t>(k));
    }
    auto it = index.find(id);
    if (it == index.end()) return -1;
    cursor = static_cast<size_t>(it->second) + 1;
    return it->second;
  };
  auto describe = [this](int64_t id) {
    auto it = live_.find(id);
    return "request " + std::to_string(id) +
           (it == live_.end() ? std::string(" (not live)")
                              : " (state " + std::string(state_name(it->second->state)) + ")");
  };
  auto dead = [](const Request& r) { return std::holds_alternative<Finished>(r.state); };

  // Validate everything before changing anything.
  std::vector<int32_t> event_of(n, -1);
  size_t cursor = 0;
  for (size_t e = 0; e < n_events; ++e) {
    const int64_t id = ev.request_ids[e];
    const int32_t k = find_entry(id, cursor);
    if (k < 0) throw InvalidArgument("advance: " + describe(id) + " has no token-producing entry" + at_step);
    if (event_of[k] != -1) throw InvalidArgument("advance: request " + std::to_string(id) + " reported twice" + at_step);
    event_of[k] = static_cast<int32_t>(e);
    const SampleRef& s = rec.samples[k];
    if (dead(*s.req)) continue;  // finished after this plan was issued: its tokens are dropped
    const int32_t got = ev.num_tokens[e];
    if (got < 1 || got > s.width) {
      throw InvalidArgument("advance: " + describe(id) + " reported " + std::to_string(got) +
                            " tokens" + at_step + ", expected " +
                            (s.width == 1 ? std::string("1") : "1.." + std::to_string(s.width)));
    }
    for (int32_t j = 0; j < got; ++j) {
      if (ev.tokens[offset[e] + j] < 0) throw InvalidArgument("advance: " + describe(id) + " reported a negative token id");
    }
  }
  std::vector<uint8_t> stop(n, 0);
  cursor = 0;
  for (int64_t id : ev.finished) {
    const int32_t k = find_entry(id, cursor);
    if (k < 0) throw InvalidArgument("advance: finished " + describe(id) + " has no token-producing entry" + at_step);
    stop[k] = 1;
  }
  for (size_t k = 0; k < n; ++k) {
    const Request& r = *rec.samples[k].req;
    if (dead(r) || event_of[k] != -1 || stop[k]) continue;
    if (std::find(ev.aborted.begin(), ev.aborted.end(), r.id) != ev.aborted.end()) continue;
    throw InvalidArgument("advance: " + describe(r.id) + " reported no tokens" + at_step);
  }

  // Apply, in plan order (so the order of the report never changes the outcome).
  std::vector<FinishedRequest> finished;
  for (size_t k = 0; k < n; ++k) {
    const SampleRef& s = rec.samples[k];
    Request& r = *s.req;
    if (dead(r)) continue;
    --r.pending;
    TokenSeq& seq = seq_of(r.state);
    if (const int32_t e = event_of[k]; e >= 0) {
      const int32_t got = ev.num_tokens[e];
      const int32_t keep = std::min(got, seq.max_new_tokens() - seq.generated());
      seq.append(ev.tokens.data() + offset[e], keep);
      // Rejected draft slots are not KV: the next step starts after the accepted tokens.
      if (auto* d = std::get_if<Decoding>(&r.state); d != nullptr && s.decode) d->res.sched -= s.width - got;
    }
    if (seq.generated() >= seq.max_new_tokens()) {
      finish(r, FinishReason::kLength, &finished);
    } else if (stop[k]) {
      finish(r, FinishReason::kStop, &finished);
    }
  }
  for (int64_t id : ev.aborted) {
    auto it = live_.find(id);
    if (it != live_.end()) finish(*it->second, FinishReason::kAbort, &finished);
  }
  release_record(rec);
  inflight_.pop_front();
  return finished;
}

bool Scheduler::abort(int64_t request_id) {
  auto it = live_.find(request_id);
  if (it == live_.end()) return false;
  finish(*it->second, FinishReason::kAbort, nullptr);
  return true;
}

// Ends a live request. A resident request first offers its full KV pages to the prefix
// cache (prompt and generated tokens alike: the next turn of a conversation reuses them).
// `r` may be destroyed on return.
void Scheduler::finish(Request& r, FinishReason reason, std::vector<FinishedRequest>* out) {
  if (Resident* res = resident_of(r.state)) {
    if (cache_.enabled()) cache_pages(*res, seq_of(r.state));
    erase_running(&r);
  } else {
    waiting_.erase(r.arrival);
  }
  r.state = fire(r.id, std::move(r.state), EvFinish{reason});
  ++num_finished_;
  if (out != nullptr) out->push_back({r.id, std::string(finish_reason_name(reason))});
  auto it = live_.find(r.id);
  std::unique_ptr<Request> owner = std::move(it->second);
  live_.erase(it);
  if (owner->inflight_refs > 0) graveyard_.push_back(std::move(owner));  // an issued plan names it
}

// Inserts the request's full pages into the prefix cache. Only tokens whose KV is written
// or scheduled count (min(sched, size)): the final sampled token has KV only if a plan in
// flight already feeds it. Where another request cached the same tokens first, the
// request swaps its private copy for a reference to the cached page, so its page list is
// exactly the cached chain and releasing it last-first keeps parents behind children on
// the LRU list.
void Scheduler::cache_pages(Resident& res, const TokenSeq& seq) {
  const int32_t page = cfg_.page_size;
  const int32_t full = std::min(std::min(res.sched, seq.size()) / page, res.num_pages());
  int32_t prev = res.cached_pages > 0 ? res.pages()[res.cached_pages - 1].page() : kNullPage;
  for (int32_t i = res.cached_pages; i < full; ++i) {
    const int32_t* tokens = seq.data() + static_cast<size_t>(i) * page;
    const uint64_t hash = seq.page_hashes()[i];
    const PrefixCache::Found found = cache_.find(hash, prev, tokens);
    if (found.kind == PrefixCache::Lookup::kConflict) break;  // 64-bit collision: stop the chain
    if (found.kind == PrefixCache::Lookup::kAbsent) {
      const int32_t mine = res.pages()[i].page();
      cache_.insert(hash, mine, prev, tokens);
      prev = mine;
    } else {
      res.replace_page(i, pool_.share(found.page));
      prev = found.page;
    }
  }
}

void Scheduler::release_record(InflightPlan& rec) {
  for (const SampleRef& s : rec.samples) {
    if (--s.req->inflight_refs > 0 || !std::holds_alternative<Finished>(s.req->state)) continue;
    auto it = std::find_if(graveyard_.begin(), graveyard_.end(),
                           [&](const std::unique_ptr<Request>& g) { return g.get() == s.req; });
    if (it != graveyard_.end()) {
      std::swap(*it, graveyard_.back());
      graveyard_.pop_back();
    }
  }
}

}  // namespace tokenspeed::sched
