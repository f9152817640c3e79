// The batch planner: owns the request FSMs, the block pool, the slots and the prefix
// cache, and turns them into one Plan per step. The policy is documented in README.md
// ("Planner policy"); tokenspeed_engine/scheduler/oracle.py implements the same policy in
// Python and the tests require both to produce identical plans.
//
// Overlap: up to two plans may be in flight (issued by next_plan, not yet reported by
// advance). While step N runs, step N+1 can be planned: its positions are known, but a
// decode input that step N is still producing is -1, and the executor fills it from step
// N's output. advance() always reports the oldest plan in flight.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <unordered_map>
#include <vector>

#include "block_pool.h"
#include "config.h"
#include "plan.h"
#include "prefix_cache.h"
#include "request_fsm.h"
#include "slot_pool.h"

namespace tokenspeed::sched {

class Scheduler {
 public:
  static constexpr int kMaxInflightPlans = 2;

  explicit Scheduler(const SchedulerConfig& config);
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request (state Waiting). Token ids must be >= 0; max_new_tokens >= 1.
  void submit(int64_t request_id, std::vector<int32_t> tokens, int32_t max_new_tokens);
  // Plans the next step (see README.md). Throws SchedulerError if two plans are in flight.
  Plan next_plan();
  // Applies the executor's report for the oldest plan in flight; returns the requests
  // that finished (length limit, stop, abort). Validates everything before changing
  // anything: on InvalidArgument the scheduler is unchanged.
  std::vector<FinishedRequest> advance(const StepEvents& events);
  // Finishes a request in any live state (its KV pages go to the prefix cache, like a
  // normal finish). Returns false if no live request has this id.
  bool abort(int64_t request_id);

  Stats stats() const;
  const SchedulerConfig& config() const { return cfg_; }
  // The persistent block table: block_table_rows() x block_table_cols() int32, row-major;
  // row = slot. A row is valid for the requests of the latest plan until the next call to
  // next_plan() or advance(): the executor copies it before calling either again.
  const int32_t* block_table() const { return slots_.table(); }
  int32_t block_table_rows() const { return slots_.num_slots(); }
  int32_t block_table_cols() const { return slots_.cols(); }

  bool has_request(int64_t request_id) const { return live_.count(request_id) != 0; }
  RequestInfo request_info(int64_t request_id) const;  // InvalidArgument if not live
  std::vector<int32_t> cached_page_tokens(int32_t page) const;  // empty if not cached
  // Full consistency check (pool, cache, holders, queues, block table); throws
  // SchedulerError naming the broken invariant. O(pages + tokens); for tests.
  void check_invariants() const;

 private:
  struct Request {
    int64_t id;
    uint64_t arrival;           // FCFS order; a retracted request keeps its place
    RequestState state;
    int32_t pending = 0;        // issued plans that will still report tokens for it
    int32_t inflight_refs = 0;  // issued plans whose records point at this object
    uint64_t sched_step = 0;    // last step that scheduled it
    uint64_t retracted_step = 0;
  };
  // A token-producing entry of an issued plan.
  struct SampleRef {
    Request* req;
    int32_t width;  // tokens it may report: decode_width for a decode, 1 for a last chunk
    bool decode;
  };
  struct InflightPlan {
    uint64_t step;
    std::vector<SampleRef> samples;
  };

  // Planning (scheduler.cpp).
  void schedule_decodes(Plan& plan, InflightPlan& rec, int64_t& budget);
  void schedule_running_prefills(Plan& plan, InflightPlan& rec, int64_t& budget);
  void admit_waiting(Plan& plan, InflightPlan& rec, int64_t& budget);
  bool ensure_pages(Request& r, Resident& res, int32_t end);
  Request* newest_unscheduled_running();
  void retract(Request& r);
  void emit_decode(Plan& plan, InflightPlan& rec, Request& r, const TokenSeq& seq, Resident& res);
  void emit_chunk(Plan& plan, InflightPlan& rec, Request& r, const TokenSeq& seq, Resident& res,
                  int32_t end);
  void insert_running(Request* r);
  void erase_running(Request* r);

  // Finishing (scheduler_advance.cpp).
  void finish(Request& r, FinishReason reason, std::vector<FinishedRequest>* out);
  void cache_pages(Resident& res, const TokenSeq& seq);
  void release_record(InflightPlan& rec);

  SchedulerConfig cfg_;
  BlockPool pool_;  // declared first: destroyed last, after every handle
  SlotPool slots_;
  PrefixCache cache_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> live_;
  std::vector<std::unique_ptr<Request>> graveyard_;  // finished, still named by an issued plan
  std::vector<Request*> running_;                    // Prefilling/Decoding, by arrival
  std::map<uint64_t, Request*> waiting_;             // Waiting/Retracted, by arrival
  std::deque<InflightPlan> inflight_;
  uint64_t next_arrival_ = 0;
  uint64_t step_ = 0;
  int64_t prefix_hit_tokens_ = 0, prefix_lookup_tokens_ = 0;
  int64_t num_retractions_ = 0, num_finished_ = 0;
};

}  // namespace tokenspeed::sched
