// Scheduler: statistics, introspection and the full invariant check used by the tests.
#include <string>

#include "errors.h"
#include "scheduler.h"

namespace tokenspeed::sched {

Stats Scheduler::stats() const {
  Stats s;
  s.pages_total = pool_.num_total();
  s.pages_free = pool_.num_free();
  s.pages_used = pool_.num_used();
  s.pages_cached = pool_.num_cached();
  s.num_waiting = static_cast<int32_t>(waiting_.size());
  s.num_running = static_cast<int32_t>(running_.size());
  s.num_inflight_plans = static_cast<int32_t>(inflight_.size());
  s.prefix_hit_tokens = prefix_hit_tokens_;
  s.prefix_lookup_tokens = prefix_lookup_tokens_;
  s.num_retractions = num_retractions_;
  s.num_finished = num_finished_;
  s.num_steps = static_cast<int64_t>(step_);
  return s;
}

RequestInfo Scheduler::request_info(int64_t request_id) const {
  auto it = live_.find(request_id);
  if (it == live_.end()) throw InvalidArgument("request_info: no live request " + std::to_string(request_id));
  const Request& r = *it->second;
  const TokenSeq& seq = seq_of(r.state);
  RequestInfo info;
  info.request_id = r.id;
  info.state = std::string(state_name(r.state));
  info.tokens = seq.tokens();
  info.prompt_len = seq.prompt_len();
  info.max_new_tokens = seq.max_new_tokens();
  info.pending_steps = r.pending;
  if (const Resident* res = resident_of(r.state)) {
    info.slot = res->slot();
    info.sched = res->sched;
    info.cached_pages = res->cached_pages;
    for (const PageHandle& h : res->pages()) info.pages.push_back(h.page());
  }
  return info;
}

std::vector<int32_t> Scheduler::cached_page_tokens(int32_t page) const {
  if (page < 0 || page >= pool_.num_pages()) throw InvalidArgument("cached_page_tokens: no page " + std::to_string(page));
  const int32_t* t = cache_.page_tokens(page);
  if (t == nullptr) return {};
  return std::vector<int32_t>(t, t + cfg_.page_size);
}

void Scheduler::check_invariants() const {
  pool_.check_invariants();
  cache_.check_invariants();
  auto fail = [](const std::string& what) { throw SchedulerError("Scheduler invariant: " + what); };
  const int32_t page = cfg_.page_size;
  std::vector<int32_t> holders(pool_.num_pages(), 0);
  std::vector<uint8_t> slot_seen(slots_.num_slots(), 0);

  const Request* prev = nullptr;
  for (const Request* r : running_) {
    const std::string who = "request " + std::to_string(r->id);
    if (prev != nullptr && prev->arrival >= r->arrival) fail("running list out of arrival order");
    prev = r;
    auto it = live_.find(r->id);
    if (it == live_.end() || it->second.get() != r) fail(who + " is running but not live");
    const Resident* res = resident_of(r->state);
    if (res == nullptr) fail(who + " is running in state " + std::string(state_name(r->state)));
    const TokenSeq& seq = seq_of(r->state);
    // Slot and block-table row mirror the page list.
    const int32_t slot = res->slot();
    if (slot < 0 || slot >= slots_.num_slots() || slot_seen[slot] || slots_.is_free(slot)) fail(who + " has a bad slot");
    slot_seen[slot] = 1;
    if (slots_.row_len(slot) != res->num_pages()) fail(who + ": block-table row length differs from its pages");
    const int32_t* row = slots_.table() + static_cast<size_t>(slot) * slots_.cols();
    for (int32_t i = 0; i < res->num_pages(); ++i) {
      const int32_t p = res->pages()[i].page();
      if (p <= kNullPage || p >= pool_.num_pages()) fail(who + " holds page " + std::to_string(p));
      if (row[i] != p) fail(who + ": block-table row differs from its pages");
      ++holders[p];
      if (i < res->cached_pages) {
        if (!cache_.contains(p)) fail(who + ": prefix-hit page " + std::to_string(p) + " is not cached");
        const int32_t parent = i == 0 ? kNullPage : res->pages()[i - 1].page();
        if (cache_.parent_of(p) != parent) fail(who + ": prefix-hit pages are not one chain");
      }
    }
    if (res->cached_pages > res->num_pages()) fail(who + ": more cached pages than pages");
    if ((res->sched + page - 1) / page > res->num_pages()) fail(who + ": KV positions beyond its pages");
    if (std::holds_alternative<Prefilling>(r->state)) {
      if (r->pending != 0 || res->sched >= seq.size()) fail(who + ": prefilling with nothing left or tokens pending");
    } else {
      const bool exact = cfg_.decode_width == 1 || r->pending == 0;
      if (exact && res->sched != seq.size() + r->pending - 1) fail(who + ": decode position out of step");
    }
  }
  for (int32_t p = 1; p < pool_.num_pages(); ++p) {
    // Every reference is a request's handle: a private page has exactly one holder.
    if (holders[p] != pool_.refcount(p)) {
      fail("page " + std::to_string(p) + " has " + std::to_string(holders[p]) + " holders but refcount " +
           std::to_string(pool_.refcount(p)));
    }
  }
  for (int32_t s = 0; s < slots_.num_slots(); ++s) {
    if (!slot_seen[s] && slots_.row_len(s) != 0) fail("free slot " + std::to_string(s) + " has a non-empty row");
  }
  if (slots_.num_free() + static_cast<int32_t>(running_.size()) != slots_.num_slots()) fail("slot count");
  for (const auto& [arrival, r] : waiting_) {
    if (r->arrival != arrival) fail("waiting queue key mismatch");
    if (!std::holds_alternative<Waiting>(r->state) && !std::holds_alternative<Retracted>(r->state)) {
      fail("request " + std::to_string(r->id) + " queued in state " + std::string(state_name(r->state)));
    }
  }
  if (live_.size() != running_.size() + waiting_.size()) fail("live requests are neither running nor waiting");
  std::unordered_map<const Request*, int32_t> refs;
  for (const InflightPlan& rec : inflight_) {
    for (const SampleRef& s : rec.samples) ++refs[s.req];
  }
  for (const auto& [id, r] : live_) {
    if (r->inflight_refs != (refs.count(r.get()) ? refs[r.get()] : 0)) fail("in-flight refs of request " + std::to_string(id));
    if (r->pending > r->inflight_refs) fail("request " + std::to_string(id) + " pends on more steps than are in flight");
  }
  for (const auto& g : graveyard_) {
    if (!std::holds_alternative<Finished>(g->state) || g->inflight_refs == 0) fail("graveyard holds a live or unreferenced request");
  }
}

}  // namespace tokenspeed::sched
