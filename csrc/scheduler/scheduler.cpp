// Scheduler: construction, submit and the planner (next_plan). advance() and everything
// that ends a request live in scheduler_advance.cpp.
#include "scheduler.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace tokenspeed::sched {
namespace {

int32_t ceil_div(int64_t a, int64_t b) { return static_cast<int32_t>((a + b - 1) / b); }

const TokenSeq& queued_seq(const RequestState& state) {
  if (auto* w = std::get_if<Waiting>(&state)) return w->seq;
  return std::get<Retracted>(state).seq;
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : cfg_((config.validate(), config)),
      pool_(cfg_.num_pages),
      slots_(cfg_.max_running_requests, cfg_.max_pages_per_req()),
      cache_(pool_, cfg_.page_size, cfg_.enable_prefix_cache) {
  running_.reserve(cfg_.max_running_requests);
}

void Scheduler::submit(int64_t id, std::vector<int32_t> tokens, int32_t max_new_tokens) {
  const std::string who = "submit: request " + std::to_string(id);
  if (auto it = live_.find(id); it != live_.end()) {
    throw InvalidArgument(who + " already exists (state " +
                          std::string(state_name(it->second->state)) + ")");
  }
  if (tokens.empty()) throw InvalidArgument(who + " has no prompt tokens");
  if (max_new_tokens < 1) throw InvalidArgument(who + ": max_new_tokens must be >= 1");
  for (int32_t t : tokens) {
    if (t < 0) throw InvalidArgument(who + ": token ids must be >= 0 (got " + std::to_string(t) + ")");
  }
  // Furthest KV position a request can need: its last decode starts at
  // prompt + max_new - 2 and reserves decode_width slots.
  const int64_t extent = static_cast<int64_t>(tokens.size()) + max_new_tokens - 2 + cfg_.decode_width;
  if (extent > cfg_.max_context_len) {
    throw InvalidArgument(who + ": prompt (" + std::to_string(tokens.size()) +
                          ") + max_new_tokens (" + std::to_string(max_new_tokens) +
                          ") + speculative slots exceed max_context_len (" +
                          std::to_string(cfg_.max_context_len) + ")");
  }
  if (ceil_div(extent, cfg_.page_size) > pool_.num_total()) {
    throw InvalidArgument(who + " needs more KV pages than the pool has (" +
                          std::to_string(pool_.num_total()) + ")");
  }
  auto req = std::make_unique<Request>(Request{
      id, next_arrival_++,
      Waiting{TokenSeq(std::move(tokens), max_new_tokens, cfg_.page_size, cfg_.enable_prefix_cache)}});
  waiting_.emplace(req->arrival, req.get());
  live_.emplace(id, std::move(req));
}

Plan Scheduler::next_plan() {
  if (inflight_.size() >= kMaxInflightPlans) {
    throw SchedulerError("next_plan: steps " + std::to_string(inflight_.front().step) + " and " +
                         std::to_string(inflight_.back().step) +
                         " are in flight; call advance() first (overlap is one step deep)");
  }
  Plan plan;
  plan.step = ++step_;
  InflightPlan rec{step_, {}};
  const size_t expect = running_.size() + 8;
  plan.request_ids.reserve(expect);
  plan.slots.reserve(expect);
  plan.prefix_lens.reserve(expect);
  plan.extend_lens.reserve(expect);
  plan.sample.reserve(expect);
  plan.input_ids.reserve(expect * cfg_.decode_width);
  plan.positions.reserve(expect * cfg_.decode_width);
  rec.samples.reserve(expect);

  int64_t budget = cfg_.max_num_batched_tokens;
  schedule_decodes(plan, rec, budget);
  schedule_running_prefills(plan, rec, budget);
  admit_waiting(plan, rec, budget);

  for (const SampleRef& s : rec.samples) ++s.req->inflight_refs;
  inflight_.push_back(std::move(rec));
  return plan;
}

// 1. Every Decoding request that can take a step gets decode_width token slots, oldest
//    first. Pages that run out are won by retracting the newest running request.
void Scheduler::schedule_decodes(Plan& plan, InflightPlan& rec, int64_t& budget) {
  const int32_t width = cfg_.decode_width;
  for (size_t i = 0; i < running_.size();) {
    Request& r = *running_[i];
    auto* d = std::get_if<Decoding>(&r.state);
    // Skipped: a speculative step still in flight (its accepted length, hence the next
    // position, is unknown), or the tokens in flight already reach max_new_tokens.
    if (d == nullptr || (width > 1 && r.pending > 0) ||
        d->seq.generated() + r.pending >= d->seq.max_new_tokens()) {
      ++i;
      continue;
    }
    if (!ensure_pages(r, d->res, d->res.sched + width)) continue;  // r itself was retracted
    emit_decode(plan, rec, r, d->seq, d->res);
    budget -= width;
    ++i;
  }
}

// 2. Running requests still prefilling get their next chunk, oldest first.
void Scheduler::schedule_running_prefills(Plan& plan, InflightPlan& rec, int64_t& budget) {
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Request& r = *running_[i];
    auto* p = std::get_if<Prefilling>(&r.state);
    if (p == nullptr || r.sched_step == step_) {
      ++i;
      continue;
    }
    const int32_t chunk = static_cast<int32_t>(std::min<int64_t>(budget, p->seq.size() - p->res.sched));
    const int32_t end = p->res.sched + chunk;
    if (!ensure_pages(r, p->res, end)) continue;
    emit_chunk(plan, rec, r, p->seq, p->res, end);
    budget -= chunk;
    ++i;
  }
}

// 3. Waiting (and retracted) requests are admitted in arrival order until one does not
//    fit; nobody overtakes the head of the queue.
void Scheduler::admit_waiting(Plan& plan, InflightPlan& rec, int64_t& budget) {
  const int32_t page = cfg_.page_size;
  while (budget > 0 && !waiting_.empty()) {
    Request& r = *waiting_.begin()->second;
    if (r.pending > 0 || r.retracted_step == step_) break;  // tokens in flight / just retracted
    if (static_cast<int32_t>(running_.size()) >= cfg_.max_running_requests) break;
    const TokenSeq& seq = queued_seq(r.state);
    // At most size-1 tokens come from the cache: the last known token is always computed
    // so that the step has something to sample from.
    PrefixCache::Match hit = cache_.match(seq, (seq.size() - 1) / page);
    const int32_t hit_pages = static_cast<int32_t>(hit.pages.size());
    const int32_t hit_tokens = hit_pages * page;
    const int32_t chunk = static_cast<int32_t>(std::min<int64_t>(budget, seq.size() - hit_tokens));
    const int32_t end = hit_tokens + chunk;
    const int32_t need = ceil_div(end, page) - hit_pages;
    if (need > pool_.num_free() + pool_.num_cached() - hit.unheld) break;

    Resident res(*slots_.acquire());
    for (int32_t p : hit.pages) res.push_page(pool_.share(p));  // before allocating: no self-eviction
    for (int32_t k = 0; k < need; ++k) res.push_page(*pool_.allocate());
    res.cached_pages = hit_pages;
    res.sched = hit_tokens;
    prefix_hit_tokens_ += hit_tokens;
    prefix_lookup_tokens_ += seq.size();

    waiting_.erase(waiting_.begin());
    r.state = fire(r.id, std::move(r.state), EvAdmit{std::move(res)});
    insert_running(&r);
    auto& p = std::get<Prefilling>(r.state);
    emit_chunk(plan, rec, r, p.seq, p.res, end);
    budget -= chunk;
  }
}

// Grows `res` to cover KV positions [0, end). When the pool (free + evictable) is empty,
// retracts the newest running request not yet scheduled in this step, which may be `r`
// itself; returns false in that case (and `res` is gone).
bool Scheduler::ensure_pages(Request& r, Resident& res, int32_t end) {
  const int32_t need = ceil_div(end, cfg_.page_size);
  while (res.num_pages() < need) {
    if (auto page = pool_.allocate()) {
      res.push_page(std::move(*page));
      continue;
    }
    Request* victim = newest_unscheduled_running();
    retract(*victim);
    if (victim == &r) return false;
  }
  return true;
}

Scheduler::Request* Scheduler::newest_unscheduled_running() {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    if ((*it)->sched_step != step_) return *it;
  }
  throw SchedulerError("planner: no running request left to retract");
}

void Scheduler::retract(Request& r) {
  erase_running(&r);
  r.state = fire(r.id, std::move(r.state), EvRetract{});
  r.retracted_step = step_;
  waiting_.emplace(r.arrival, &r);  // back at its arrival position
  ++num_retractions_;
}

void Scheduler::emit_decode(Plan& plan, InflightPlan& rec, Request& r, const TokenSeq& seq,
                            Resident& res) {
  const int32_t width = cfg_.decode_width;
  const int32_t pos = res.sched;
  plan.request_ids.push_back(r.id);
  plan.slots.push_back(res.slot());
  plan.prefix_lens.push_back(pos);
  plan.extend_lens.push_back(width);
  plan.sample.push_back(1);
  // The last token is known unless the step in flight is producing it.
  plan.input_ids.push_back(pos < seq.size() ? seq[pos] : -1);
  plan.positions.push_back(pos);
  for (int32_t j = 1; j < width; ++j) {  // draft slots, filled by the executor
    plan.input_ids.push_back(-1);
    plan.positions.push_back(pos + j);
  }
  res.sched = pos + width;
  ++r.pending;
  r.sched_step = step_;
  rec.samples.push_back({&r, width, true});
}

void Scheduler::emit_chunk(Plan& plan, InflightPlan& rec, Request& r, const TokenSeq& seq,
                           Resident& res, int32_t end) {
  const int32_t start = res.sched;
  const bool last = end == seq.size();
  plan.request_ids.push_back(r.id);
  plan.slots.push_back(res.slot());
  plan.prefix_lens.push_back(start);
  plan.extend_lens.push_back(end - start);
  plan.sample.push_back(last ? 1 : 0);
  plan.input_ids.insert(plan.input_ids.end(), seq.data() + start, seq.data() + end);
  for (int32_t pos = start; pos < end; ++pos) plan.positions.push_back(pos);
  res.sched = end;
  r.sched_step = step_;
  if (last) {  // this chunk samples the next token: the request is decoding from now on
    ++r.pending;
    rec.samples.push_back({&r, 1, false});
    r.state = fire(r.id, std::move(r.state), EvPrefillDone{});
  }
}

void Scheduler::insert_running(Request* r) {
  auto pos = std::lower_bound(running_.begin(), running_.end(), r,
                              [](const Request* a, const Request* b) { return a->arrival < b->arrival; });
  running_.insert(pos, r);
}

void Scheduler::erase_running(Request* r) {
  auto pos = std::lower_bound(running_.begin(), running_.end(), r,
                              [](const Request* a, const Request* b) { return a->arrival < b->arrival; });
  if (pos == running_.end() || *pos != r) {
    throw SchedulerError("planner: request " + std::to_string(r->id) + " is not running");
  }
  running_.erase(pos);
}

}  // namespace tokenspeed::sched
